"""valuegate.tasks: see DESIGN §2."""
