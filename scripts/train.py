#!/usr/bin/env python
"""Fine-tune a causal LM with quantization-aware training, evaluate float / PTQ / QAT, export.

    python scripts/train.py recipes/quickstart.yaml
    python scripts/train.py recipes/smollm2_qat_q4_0.yaml train.max_steps=200 quant.start_step=50
    python scripts/train.py recipes/quickstart.yaml --print-config
    python scripts/train.py recipes/quickstart.yaml train.checkpoint_every_n_steps=50 --resume

A bad recipe or override is reported in full (every problem, with file, line and key) and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qat.cli import run_main  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a recipe YAML, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys (values are YAML)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last checkpoint (same recipe and overrides; "
                             "train.checkpoint_every_n_steps sets how often one is saved)")
    args = parser.parse_args(argv)

    from qat.recipe import dump_config, load_recipe  # light: validate before importing Lightning and transformers
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(dump_config(recipe), end="")
        return 0
    from qat.lm.run import train_run
    train_run(recipe, resume=args.resume)
    return 0


if __name__ == "__main__":
    run_main(main)
