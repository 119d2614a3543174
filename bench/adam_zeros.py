"""Adam's step with exact zeros in its second moments, with and without ``qat/adam_floor.py``'s floor.

A clip mask gives some weight elements a gradient of exactly 0 in every step, so their ``exp_avg_sq`` stays 0;
CUDA's Adam kernels then take IEEE ``sqrt``'s slow path for them. For each fraction of such elements: 16
bf16 weights of 2048 x 8192 (268M elements), gradients ~N(0, 1e-3) with that fraction zeroed at fixed places,
three warm steps, then ``opt.step()`` timed (CUDA events, median of ``--reps``), once as PyTorch leaves the
states and once after ``SecondMomentFloor.apply()``.

    python bench/adam_zeros.py [--fractions 0,0.001,0.004,0.02] [--impl fused|foreach] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import release, rows_report, time_steps, zero_second_moments  # noqa: E402
from qat.adam_floor import FLOOR, SecondMomentFloor  # noqa: E402


def measure(fraction: float, impl: str, shapes: list, reps: int, device: str, floor_value: float = FLOOR) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device=device, generator=g, dtype=torch.bfloat16)) for s in shapes]
    for p in ps:
        keep = torch.rand(p.shape, device=device, generator=g) >= fraction
        p.grad = (torch.randn(p.shape, device=device, generator=g) * 1e-3 * keep).to(p.dtype)
    opt = torch.optim.AdamW(ps, lr=1e-5, **{impl: True})
    floor = SecondMomentFloor(opt, ps, floor=floor_value)
    floor.remove()  # applied below, by hand
    for _ in range(3):
        opt.step()
    row = dict(fraction=fraction, impl=impl, floor=floor_value, elements=sum(p.numel() for p in ps),
               zero_second_moments=zero_second_moments(opt),
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    row["step_ms"] = statistics.median(time_steps(opt.step, 0, reps, device)[0])
    floor.apply()
    row["zero_second_moments_floored"] = zero_second_moments(opt)
    row["step_ms_floored"] = statistics.median(time_steps(opt.step, 0, reps, device)[0])
    del ps, opt, floor
    release(device)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="0,0.001,0.004,0.02")
    p.add_argument("--impl", choices=("fused", "foreach"), default="fused")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--floor", type=float, default=FLOOR, help="the floor's value (qat/adam_floor.py: %(default)g)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # 268M elements on a GPU; a small set on the CPU (the plumbing: the CPU's sqrt has no slow path to show)
    shapes = [(2048, 8192)] * 16 if device == "cuda" else [(256, 512)] * 4
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        sys.exit(f"adam_zeros: bad --fractions {args.fractions!r}: give numbers in [0, 1), e.g. 0,0.001,0.02")
    rows_report(fractions, lambda f: measure(f, args.impl, shapes, args.reps, device, args.floor),
                f"{'zeros':>8s} {'zero v':>12s} {'opt.step ms':>12s} {'floored ms':>11s} {'ratio':>7s}",
                lambda r: (f"{r['fraction']:8.3%} {r['zero_second_moments']:12d} {r['step_ms']:12.3f} "
                           f"{r['step_ms_floored']:11.3f} {r['step_ms'] / r['step_ms_floored']:7.3f}"),
                args.out)


if __name__ == "__main__":
    main()
