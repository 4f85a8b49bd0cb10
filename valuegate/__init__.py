"""valuegate: forward-only data valuation (For-Value) of LLM fine-tuning data."""

__version__ = "0.1.0"
