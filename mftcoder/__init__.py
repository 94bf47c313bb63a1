"""mftcoder: multi-task fine-tuning of code LLMs, config-driven, on Accelerate."""

__version__ = "0.1.0"
