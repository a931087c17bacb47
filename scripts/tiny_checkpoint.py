"""Write a tiny random LLaVA-NeXT checkpoint (the one the tests use) to try the pipeline without 7B weights.

    python scripts/tiny_checkpoint.py weights/tiny-random [--layout hub|tf5|tf4new|original]

Needs transformers (the `test` extra). The weights are random, so answers are noise; the point is
to see every stage run, in seconds, on any machine.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import tiny  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory to write (config.json, safetensors, tokenizer.model)")
    p.add_argument("--layout", choices=list(tiny.LAYOUTS), default="hub", help="key layout (default hub)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny.train_tokenizer(Path(tmp) / "tokenizer.model")
        tiny.save_checkpoint(tiny.hf_model(args.seed), args.out, args.layout, tok)
    print(f"wrote a tiny random LLaVA-NeXT ({args.layout} layout) to {args.out}")


if __name__ == "__main__":
    main()
