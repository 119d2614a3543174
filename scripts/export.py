"""Export a trained run (or checkpoint) to the files runtimes load, exactly as it was trained.

    python scripts/export.py runs/<run> --to gguf --out model.Q4_0.gguf
    python scripts/export.py runs/<run>/checkpoints/last.ckpt --to gguf:bf16 --out model.gguf --force
    python scripts/export.py runs/<run> --to compressed-tensors --out int4-w-g128/

``--to gguf[:type]``: a quantized type must be the one the run was trained with (nothing is re-quantized);
f16/bf16/f32 choose how the layers left in float are stored. ``--out`` defaults to a name that says
what the file holds, inside the run's exports/ directory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.cli import UserError, run_main  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (runs/<name>) or a .ckpt file")
    ap.add_argument("--to", required=True, help="gguf[:type] | compressed-tensors | torchao")
    ap.add_argument("--out", help="output file (gguf) or directory; default: <run>/exports/<what it holds>")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    ap.add_argument("--float-type", default="f16", choices=["f16", "bf16", "f32"],
                    help="GGUF storage of layers left in float (default f16)")
    args = ap.parse_args(argv)

    from qat.export.run import default_name, export_to, parse_target
    kind, sub = parse_target(args.to)  # a bad target fails before the model is loaded
    src = Path(args.run)
    if not src.exists():
        raise UserError(f"{src} does not exist: give a run directory (runs/<name>) or a .ckpt file")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise UserError(f"{out} already exists; pass --force to overwrite it")

    from qat.lm.run import load_run
    t0 = time.time()
    module, tokenizer, _ = load_run(src)
    print(f"loaded {src} in {time.time() - t0:.1f}s", flush=True)
    if out is None:
        run_dir = src.parent.parent if src.is_file() and src.parent.name == "checkpoints" else (src.parent if src.is_file() else src)
        out = run_dir / "exports" / default_name(module, kind, sub)
        out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    path = export_to(module, tokenizer, args.to, out, force=args.force, float_type=args.float_type)
    size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
