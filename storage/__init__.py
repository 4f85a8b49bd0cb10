"""valuegate.storage: see DESIGN §2."""
