"""Tests of flows/ (docs/ARCHITECTURE.md §2)."""
