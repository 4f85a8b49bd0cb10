"""Tests of storage/ (docs/ARCHITECTURE.md §2)."""
