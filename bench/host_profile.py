"""Where a training step's host (Python) time goes: a step small enough that the GPU waits for the host
(batch 1 x 32 tokens by default), timed, then profiled with cProfile. An eager step of a small model at
real batch sizes is host-bound, so this is what its speed hangs on.

    python bench/host_profile.py --variant qat:q4_0 [--compile] [--steps 20] [--rows 40]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.speed import MODELS, profiled_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="qat:q4_0")
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=40)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, step = profiled_step(args.model, args.variant, args.batch, args.seq, device, compiled=args.compile)
    for _ in range(5):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    print(f"{args.variant} compile={args.compile}: {ms:.2f} ms/step (batch {args.batch} x {args.seq})")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    sync()
    prof.disable()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(args.rows)
        print(s.getvalue())


if __name__ == "__main__":
    main()
