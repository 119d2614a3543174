"""Bandwidth of the fake-quant kernels on one weight, against a plain copy (what a bandwidth-bound kernel
can reach on this GPU): the forward kernel (``qat::fake_quant_dynamic``: read w, write w_hat and the mask),
the STE's ``grad * mask``, the step cache's refresh (MODE 1) and flush (MODE 2) over the same weight, and
the packed cache's refresh (codes, parameters, clip bits), unpack (w_hat) and clip mask.

    python bench/kernel_bw.py --shape 8192,2048 --fmt q4_0 --dtype bf16

Device time from the profiler (kernels only, host time left out).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import device_ms  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8192,2048")
    p.add_argument("--fmt", default="q4_0")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bw.py times CUDA kernels: run it on a machine with a GPU")
    from torch import nn

    import qat
    from qat.kernels import triton_fq as tfq
    from qat.modules import FakeQuantLinear
    from qat.step_cache import StepCache

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    out_f, in_f = map(int, args.shape.split(","))
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    qat.prepare(model, args.fmt, rules={"*": args.fmt})
    model.to("cuda", dtype)
    layer = next(m for m in model.modules() if isinstance(m, FakeQuantLinear))
    w = layer.weight.detach()
    n, es = w.numel(), w.element_size()
    grad = torch.randn_like(w)
    _, mask = tfq._fq_dynamic_op(w, args.fmt)
    import os
    os.environ["QAT_RECOMPUTE"] = "0"
    cache = StepCache(model)
    cache.refresh()
    layer._w_cache.grad = grad.clone()

    def flush():
        layer._w_cache.grad = grad  # masked in place, moved to weight.grad
        layer.weight.grad = None
        cache.flush()

    os.environ["QAT_RECOMPUTE"] = "1"  # the same layer as a large one: the packed cache
    packed = StepCache(model)
    packed.refresh()
    pk = layer._w_packed
    os.environ.pop("QAT_RECOMPUTE")
    fmt = layer.weight_fake_quant.fmt
    params = n // fmt.block * (pk.buf.ps.element_size() + (0 if pk.buf.pz is None else pk.buf.pz.element_size()))
    g2 = grad.clone()
    clip_tables: dict = {}

    rows = []
    for name, fn, nbytes in [
        ("packed refresh (w -> codes, params, clip bits)", packed.refresh, n * es + n // 2 + params + n // 8),
        ("packed unpack (codes, params -> w_hat)", lambda: pk.w_hat(w), n // 2 + params + n * es),
        ("packed clip mask (bits -> grad)", lambda: tfq.clip_zero([g2], pk.buf.words, [0], clip_tables), n // 8),
        ("copy (w.clone)", lambda: w.clone(), 2 * n * es),
        ("fake quant forward (w -> w_hat, mask)", lambda: tfq._fq_dynamic_op(w, args.fmt), n * (2 * es + 1)),
        ("STE grad * mask", lambda: grad * mask, n * (2 * es + 1)),
        ("step cache refresh (w -> w_hat)", cache.refresh, 2 * n * es),
        ("step cache flush (w, grad -> grad)", flush, 3 * n * es),
    ]:
        ms = device_ms(fn)
        rows.append(dict(kernel=name, ms=ms, gb_per_s=nbytes / ms / 1e6, shape=args.shape, fmt=args.fmt,
                         dtype=args.dtype, device=torch.cuda.get_device_name()))
        print(f"{name:48s} {ms * 1e3:9.1f} us  {nbytes / ms / 1e6:8.0f} GB/s")
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
