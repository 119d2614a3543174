#!/usr/bin/env python
"""Perplexity of a finished run: float twin, PTQ (round to nearest) and QAT, as a table and eval.json.

    python scripts/eval.py runs/quickstart
    python scripts/eval.py runs/quickstart --data configs/data/shakespeare.yaml data.val_max_blocks=64
    python scripts/eval.py runs/quickstart --out /tmp/eval.json

Overrides (key.sub=value) apply to the run's saved config.yaml, e.g. data.seq_len=512 eval.batch_size=4.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.cli import UserError, run_main  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory written by scripts/train.py, e.g. runs/quickstart")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override the run's config (data., eval.)")
    parser.add_argument("--data", help="a data preset name or YAML file to evaluate on instead of the run's data")
    parser.add_argument("--out", help="where to write the JSON (default: <run>/eval.json)")
    args = parser.parse_args(argv)

    from qat.recipe import load_recipe
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml); runs are under runs/<name>/")
    overrides = ([f"data={args.data}"] if args.data else []) + list(args.overrides)
    config = load_recipe(run / "config.yaml", overrides)

    from qat.lm.run import evaluate_run
    report = evaluate_run(run, config)
    out = Path(args.out) if args.out else run / "eval.json"
    report.save(out)
    print(report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
