"""The embedded demo, shipped as package data of ``valuegate.demo``: ``demo.toml`` and ``data/*.jsonl``
(what ``valuegate run`` runs with no --config; read with :mod:`importlib.resources`)."""
