"""GGUF export time: qat's writer (codes from the QAT model) vs llama.cpp's own quantizer from an F16
GGUF, same machine, same thread count, side by side.

    python bench/export_time.py --type q4_0 --threads 2 --out bench/results/export_time.json

Both write the same tensor types, checked tensor by tensor with ``gguf.GGUFReader`` after the runs (the
script fails on any mismatch): every Linear in ``--type`` (mixes: llama.cpp's per-tensor types), the
embedding in F16 and no separate output tensor (SmolLM2 ties ``lm_head`` to ``embed_tokens``; llama.cpp
keeps the tied embedding F16 when asked, so our plan leaves both float too).
The qat side is the full ``export_gguf`` (codes from ``qat.convert``, packing, tokenizer metadata,
writing); the llama.cpp side is ``llama_model_quantize`` of the F16 file (reading, quantizing, writing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.common import gguf_tensor_types, llama_quantize, warn_type_mismatch  # noqa: E402
from bench.quality import load_base, smollm2_gguf  # noqa: E402
from qat.export.gguf import export_gguf  # noqa: E402

TYPES = ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q3_k_m")


def measure(args, model, tok, work: Path) -> dict:
    f16 = export_gguf(model, tok, work / "model.F16.gguf", float_type="f16", force=True, progress=False)
    # the embedding and the head tied to it stay float on both sides (llama.cpp: token_embedding_type and
    # output_tensor_type F16 below); without the "lm_head" rule a mix would plan the head as Q8_0/Q6_K
    qat.prepare(model, args.type, rules={"*.embed_tokens": None, "lm_head": None})
    ours, theirs = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        export_gguf(model, tok, work / "ours.gguf", float_type="f16", force=True, progress=False)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llama_quantize(f16, work / "llama.gguf", args.type, args.threads)
        theirs.append(time.perf_counter() - t0)
    mismatches = warn_type_mismatch("qat", gguf_tensor_types(work / "ours.gguf"),
                                    "llama.cpp", gguf_tensor_types(work / "llama.gguf"))
    return dict(type=args.type, threads=args.threads, qat_s=statistics.median(ours), llamacpp_s=statistics.median(theirs),
                ratio=statistics.median(ours) / statistics.median(theirs),
                qat_mib=(work / "ours.gguf").stat().st_size / 2**20, llamacpp_mib=(work / "llama.gguf").stat().st_size / 2**20,
                all_qat_s=ours, all_llamacpp_s=theirs, type_mismatches=mismatches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="q4_0", choices=sorted(TYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_base(smollm2_gguf())
    with tempfile.TemporaryDirectory(prefix="qat-export-time-") as tmp:  # ~0.5 GB of GGUF files per run
        res = measure(args, model, tok, Path(tmp))
    mismatches = res["type_mismatches"]
    print(json.dumps(res, indent=1))
    print(f"\n{args.type}, {args.threads} threads: qat {res['qat_s']:.2f} s, llama.cpp {res['llamacpp_s']:.2f} s "
          f"-> {res['ratio']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    if mismatches:
        print(f"\n{len(mismatches)} tensors have different types in the two files:\n  " + "\n  ".join(mismatches))
        sys.exit(1)
    print("tensor types: identical in both files")


if __name__ == "__main__":
    main()
