"""Tests of valuegate/engine/ (docs/ARCHITECTURE.md §2)."""
