"""Tests of tasks/ (docs/ARCHITECTURE.md §2)."""
