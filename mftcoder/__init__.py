"""mftcoder: multi-task fine-tuning of code LLMs, config-driven, on Accelerate."""

import logging

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, importing bitsandbytes warns that an optional kernel from the HF hub is
# missing; it falls back to its built-in one, and mftcoder never fetches code from the hub at run time.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
