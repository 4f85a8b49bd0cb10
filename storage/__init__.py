"""valuegate.storage: see docs/ARCHITECTURE.md §2 and §3."""
