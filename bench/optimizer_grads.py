"""Fused AdamW's step alone, on the gradients a compiled training step left, and on fresh copies of them:
does the optimizer read the QAT step's gradients slower than bf16's? (It did: BENCHMARKS.md, session 14.)

For each variant, in one process: build the model as ``bench/speed.py`` does, compile it, run three steps
(with ``+step-cache``: the cache's flush too, as the callback), keep the last step's gradients, then time
``opt.step()`` alone (CUDA events, median of ``--reps``), replace every gradient by a clone and time it again,
then the weights and the optimizer's states too, and time it a third time. A ``+pad=G`` suffix holds G GiB
from before the first step (a bf16 run whose states are placed as a step cache's buffers would place them).
It also lists what could make two sets of gradients read differently: dtype, contiguity, 16-byte alignment,
storage offsets, shared storages; and the exact zeros in ``exp_avg_sq``, which were the cause (session 17:
CUDA's Adam kernels take a slow ``sqrt`` on them; ``qat/adam_floor.py`` raises them, ``+no-floor`` does not).

    python bench/optimizer_grads.py --variants bf16,qat:q4_0+step-cache,bf16 [--model llama1b] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import release, rows_report, time_steps, zero_second_moments  # noqa: E402
from bench.speed import MODELS, apply_switches, batch_start, build, optimizer_step, callback_setup  # noqa: E402


def timed(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls (``bench.common.time_steps``: CUDA events on a GPU,
    the host clock on the CPU)."""
    return statistics.median(time_steps(fn, 0, reps, device)[0])


def grad_layout(model) -> dict:
    g = [p.grad for p in model.parameters() if p.grad is not None]
    return dict(grads=len(g), dtypes=sorted({str(x.dtype) for x in g}),
                non_contiguous=sum(not x.is_contiguous() for x in g),
                misaligned_16=sum(x.data_ptr() % 16 != 0 for x in g),
                storage_offset=sum(x.storage_offset() != 0 for x in g),
                shared_storage=len(g) - len({x.untyped_storage().data_ptr() for x in g}))


def split_pad(variant: str) -> tuple[str, float]:
    """``"bf16+pad=0.8"`` -> ``("bf16", 0.8)``; no suffix: ``(variant, 0.0)``."""
    base, sep, gib = variant.partition("+pad=")
    if not sep:
        return variant, 0.0
    try:
        return base, float(gib)
    except ValueError:
        sys.exit(f"optimizer_grads: bad +pad= suffix in {variant!r}: give GiB as a number, e.g. bf16+pad=0.8")


def measure(model_name: str, variant: str, batch: int, seq: int, reps: int, device: str = "cuda",
            compiled: bool = True) -> dict:
    variant_build, pad = split_pad(variant)
    model = build(model_name, apply_switches(variant_build), device).train()
    # ``+pad=G``: G GiB held from before the optimizer's first step, so its states land where a step cache's
    # buffers would push them (does placement alone slow the step? session 16 asks)
    padding = torch.empty(int(pad * 2**30), dtype=torch.uint8, device=device) if pad else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    f = torch.compile(model) if compiled else model
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    cache = callback_setup(model, opt)
    for i in range(3):
        batch_start(cache)
        f(input_ids=ids, labels=ids).loss.backward()
        if i < 2:
            optimizer_step(opt, cache)
        elif cache is not None:
            cache.flush()  # the last step's gradients, as the optimizer would read them
    if device == "cuda":
        torch.cuda.synchronize()
    row = dict(model=model_name, variant=variant, compiled=compiled, **grad_layout(model))
    # exact zeros in the second moments: CUDA's Adam kernels take a slow sqrt there (qat/adam_floor.py)
    row["zero_second_moments"] = zero_second_moments(opt)
    row["step_ms"] = timed(opt.step, reps, device)
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()
    row["step_ms_cloned_grads"] = timed(opt.step, reps, device)
    with torch.no_grad():  # and fresh copies of the weights and the optimizer's states: new places for all of it
        for p in model.parameters():
            p.data = p.data.clone()
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.device.type == torch.device(device).type:
                    st[k] = v.clone()
    row["step_ms_fresh_all"] = timed(opt.step, reps, device)
    row["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if cache is not None:
        cache.close()
    del model, opt, f, cache, padding
    release(device)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama1b")
    p.add_argument("--variants", default="bf16,qat:q4_0+step-cache,bf16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("optimizer_grads: needs a CUDA GPU (fused AdamW's kernel time is what it measures)")
    rows_report(args.variants.split(","), lambda v: measure(args.model, v, args.batch, args.seq, args.reps),
                f"{'variant':34s} {'opt.step ms':>11s} {'cloned grads':>12s} {'all fresh':>10s} {'misaligned':>10s} "
                f"{'non-contig':>10s} {'zero v':>10s}",
                lambda r: (f"{r['variant']:34s} {r['step_ms']:11.3f} {r['step_ms_cloned_grads']:12.3f} "
                           f"{r['step_ms_fresh_all']:10.3f} {r['misaligned_16']:10d} {r['non_contiguous']:10d} "
                           f"{r['zero_second_moments']:10d}"),
                args.out)


if __name__ == "__main__":
    main()
