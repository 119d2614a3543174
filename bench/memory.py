"""Where a training step's memory goes: bf16 against qat's fake quant (and torchao's QAT), eager, one fresh
process per variant so that one variant's peak cannot hide another's.

    python bench/memory.py --model smollm2 --batch 8 --seq 2048 --variants bf16,qat:q4_0,qat:q4_0+no-recompute
    python bench/memory.py --model tiny --batch 3 --seq 50     # seconds, on a CPU

Per variant, in bytes (pure bf16 weights and AdamW, as bench/speed.py builds them; the suffixes are
speed.py's environment switches, e.g. ``+recompute``, ``+no-recompute``, ``+per-layer``):

* ``params``, ``grads``, ``optimizer``: the tensors themselves (grads after a backward, AdamW's state after
  a step); ``buffers``: every buffer (the quantizers' scales, the rotary tables);
* ``saved``: what one forward hands to autograd for the backward, as saved-tensor hooks see it (unique
  storages, Parameters excluded), and ``saved_weight_shaped``, the part of it shaped like a quantized
  weight: the ``w_hat`` a matmul keeps and the STE's clip masks, what fake quant adds to bf16 training.
  The one-launch group (kernels/batch.py, CUDA) keeps its flat masks on its autograd node, out of the hooks'
  sight: they are found on the graph and counted in both. On CUDA ``forward_kept`` is the allocated memory
  after the forward minus before;
* ``cache``: the step cache's ``w_hat`` tensors (``+step-cache``: qat/step_cache.py), held for the whole step;
  a matmul's ``saved`` entry for them is the same storage, so they also count there;
* ``peak``: CUDA: the step's peak allocated memory; CPU: the process's peak resident set (libraries
  included, so compare the differences between variants).

torch.compile is not measured here (the hooks do not see inside a compiled graph); bench/speed.py reports
its peak. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import PeakRSS, write_json  # noqa: E402
from bench.speed import MODELS, apply_switches, batch_start, build, optimizer_step, callback_setup  # noqa: E402

FIELDS = ("params", "buffers", "grads", "optimizer", "saved", "saved_weight_shaped", "cache", "forward_kept",
          "peak")


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure(model_name: str, variant: str, batch: int, seq: int, device: str) -> dict:
    """One variant's figures (see the module docstring); runs in the process that calls it."""
    model = build(model_name, apply_switches(variant), device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    def step(hooks=None):
        batch_start(cache)
        if hooks is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                loss = model(input_ids=ids, labels=ids).loss
        return loss

    cache = callback_setup(model, opt)  # None unless +step-cache
    loss = step()  # the first step creates the gradients and AdamW's state
    loss.backward()
    optimizer_step(opt, cache)
    del loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # every Linear/Embedding weight's shape, ours and torchao's alike (keep batch x seq off these numbers: a
    # matmul saves its 2-D input, tokens x features, which would then count as weight-shaped)
    shapes = set()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            shapes |= {tuple(m.weight.shape), tuple(m.weight.shape)[::-1]}
    saved: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            entry = saved.setdefault(st.data_ptr(), [st.nbytes(), False])
            entry[1] |= tuple(t.shape) in shapes
        return t

    row = dict(model=model_name, variant=variant, batch=batch, seq=seq,
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() if device == "cpu" else nullcontext() as rss:
        loss = step((pack, lambda t: t))
        if device == "cuda":
            row["forward_kept"] = torch.cuda.memory_allocated() - before
        for mask in group_masks(loss):
            saved.setdefault(mask.untyped_storage().data_ptr(), [mask.untyped_storage().nbytes(), True])
        loss.backward()
        if cache is not None:
            cache.flush()  # the weights' gradients, as the optimizer will read them
        row["grads"] = nbytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer_step(opt, cache)
        del loss
    row["peak"] = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    row["params"] = nbytes(model.parameters())
    row["buffers"] = nbytes(model.buffers())
    row["optimizer"] = nbytes(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim())
    row["saved"] = sum(b for b, _ in saved.values())
    row["saved_weight_shaped"] = sum(b for b, w in saved.values() if w)
    row["cache"] = nbytes(m._w_cache for m in cache.modules if m._w_cache is not None) if cache is not None else 0
    return row


def group_masks(loss) -> list:
    """The flat clip masks the one-launch group's autograd nodes hold (``ctx.masks``, kernels/batch.py)."""
    found, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        masks = getattr(fn, "masks", None)
        if isinstance(masks, tuple) and masks and isinstance(masks[0], torch.Tensor):
            found.append(masks[0])
        todo += [f for f, _ in fn.next_functions]
    return found


HEADS = ("params", "buffers", "grads", "optim", "saved", "saved_w", "cache", "fwd_kept", "peak")


def table(rows: list[dict]) -> str:
    """MiB per field (saved_w: the weight-shaped part of saved; fwd_kept: CUDA only), and peak x bf16's."""
    base = next((r for r in rows if r["variant"] == "bf16" and "error" not in r), None)
    out = [f"{'variant':26} " + " ".join(f"{h:>9}" for h in HEADS) + f" {'peak x bf16':>11}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['variant']:26} error: {r['error'][:100]}")
            continue
        cells = " ".join(f"{r[f] / 2 ** 20:9.1f}" if r.get(f) is not None and r[f] == r[f] else f"{'-':>9}"
                         for f in FIELDS)
        ratio = r["peak"] / base["peak"] if base and base["peak"] == base["peak"] else float("nan")
        out.append(f"{r['variant']:26} {cells} {ratio:11.3f}")
    return "MiB\n" + "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--variants", default="bf16,qat:q4_0,qat:q4_0+no-recompute,qat:q4_0+recompute,torchao")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure this variant, print its row
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        print("ROW " + json.dumps(measure(args.model, args.one, args.batch, args.seq, device)))
        return
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", v, "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--device", device]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:  # keep the other rows
            err = (r.stderr.strip().splitlines() or ["no output"])[-1]
            row = dict(model=args.model, variant=v, error=err[:300])
        else:
            row = json.loads(line[4:])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, rows)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
