"""The host time of the step cache's bookkeeping per training step, on a CPU: what ``QATCallback`` calls around
one optimizer step (its schedule and ``refresh_if_stale`` before the batch, ``flush`` after the backward and
before the optimizer step, the schedule and ``refresh_if_stale`` after it), timed without the work itself: the
kernel launches are no-ops and the k-quant search returns zeros, so what is left is the per-layer Python
around them, which a compiled step of a small model can wait for (BENCHMARKS.md, session 12).

Model: a 30-layer Llama of width 256 (210 quantized layers, as SmolLM2; 256-wide so the ``_k_m`` mixes have
k-quant layers). ``--root DIR`` imports ``qat`` from another checkout (A/B against an older commit).

    python bench/step_cache_host.py [--schemes q4_0,q4_k_m] [--steps 200] [--root DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default="q4_0,q4_k_m")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of --steps steps; the median is reported")
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to import qat from")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sys.path.insert(0, args.root)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import qat
    import qat.step_cache as sc
    from qat.kernels import triton_fq as tfq

    class _NoLaunch:  # ``kernel[grid](...)`` that launches nothing
        def __getitem__(self, grid):
            return lambda *a, **k: None

    tfq._fq_table_kernel = tfq._pack_table_kernel = _NoLaunch()
    sc._fusable = lambda q, w: True  # the group path, as on a GPU with Triton
    sc._kquant_flat = lambda fmt, ws: (torch.zeros(sum(w.numel() for w in ws), dtype=ws[0].dtype), 1)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=30, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    rows = []
    for scheme in args.schemes.split(","):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
        qat.prepare(model, scheme)
        cb = qat.QATCallback(scheme)
        if hasattr(cb, "_quantizers"):  # what on_train_start lists (session 12 on)
            from qat.prepare import quantizers

            cb._quantizers = quantizers(model)
        cache = sc.StepCache(model)
        cache.refresh()
        grads = {id(m): torch.zeros_like(m.weight) for m in cache.modules}
        weights = [m.weight for m in cache.modules + cache.packed]

        def step(i: int) -> float:
            t = 0.0
            t0 = time.perf_counter()
            cb._apply_schedule(model, i)
            cache.refresh_if_stale()
            t += time.perf_counter() - t0
            for m in cache.modules:  # the backward: every cache takes a gradient (not timed)
                m._w_cache.grad = grads[id(m)]
            t0 = time.perf_counter()
            cache.flush()  # on_after_backward
            cache.flush()  # on_before_optimizer_step
            t += time.perf_counter() - t0
            with torch.no_grad():  # the optimizer step: every weight a new version (not timed)
                for w in weights:
                    w.grad = None
                    w.add_(0)
            t0 = time.perf_counter()
            cb._apply_schedule(model, i + 1)  # on_train_batch_end
            cache.refresh_if_stale()
            return t + time.perf_counter() - t0

        for i in range(10):
            step(i)
        per_round = []
        for r in range(args.rounds):
            per_round.append(sum(step(i) for i in range(args.steps)) / args.steps * 1e3)
        row = dict(scheme=scheme, layers=len(cache.modules), ms_per_step=statistics.median(per_round),
                   rounds=[round(x, 4) for x in per_round], root=args.root, machine=platform.processor() or platform.machine(),
                   torch=torch.__version__)
        rows.append(row)
        print(json.dumps(row))
    print(f"{'scheme':10s} {'layers':>6s} {'host ms/step':>12s}")
    for r in rows:
        print(f"{r['scheme']:10s} {r['layers']:6d} {r['ms_per_step']:12.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
