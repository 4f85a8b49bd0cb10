"""valuegate.tasks: see docs/ARCHITECTURE.md §2."""
