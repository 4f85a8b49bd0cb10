"""valuegate.flows: see DESIGN §2."""
