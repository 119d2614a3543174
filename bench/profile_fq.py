"""Where the fake-quant time goes on GPU: profiler table of one training step, plus a check that
torch.compile of the eager formulation keeps llama.cpp's bits.

    python bench/profile_fq.py --variant qat:q4_0
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.speed import profiled_step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="qat:q4_0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    args = p.parse_args()
    _, step = profiled_step("smollm2", args.variant, args.batch, args.seq, "cuda")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))

    # host (CPU) microseconds per call of each piece, one 1536x576 bf16 layer: what a CPU-bound eager step pays
    import time

    import torch.nn.functional as F

    from qat.observers import WeightQuantizer

    def host_us(fn, n=300):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e6

    w = (torch.randn(1536, 576, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    x = torch.randn(64, 576, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(64, 1536, device="cuda", dtype=torch.bfloat16)
    for name in ["q4_0", "int4_g32"]:
        wq = WeightQuantizer(name, w.detach().float()).cuda()
        from qat.kernels.triton_fq import fused_fake_quant
        s, z = wq.scale, wq.zero
        rows = {
            "aten mul (one launch)": lambda: w.detach() * 2,
            "fused_fake_quant (raw kernel)": lambda: fused_fake_quant(w.detach(), wq.fmt, s, z, True),
            "WeightQuantizer forward": lambda: wq(w.detach()),
            "linear fwd+bwd, float": lambda: F.linear(x, w).backward(g),
            "linear fwd+bwd, fake quant": lambda: F.linear(x, wq(w)).backward(g),
        }
        for k, fn in rows.items():
            print(f"host us/call {name:9} {k:32} {host_us(fn):8.1f}", flush=True)

    # inductor vs eager numerics of the fake quant alone
    from qat.formats import get_format
    from qat.formats.base import to_blocks
    os.environ["QAT_DISABLE_TRITON"] = "1"
    for name in ["q4_0", "q8_0", "q4_1", "int4_g32"]:
        fmt = get_format(name)

        def fq(w):
            b = to_blocks(w, fmt.block)
            s, z = fmt.choose_params(b)
            return fmt.decode(fmt.encode(b, s, z), s, z)
        w = torch.randn(1536, 576, device="cuda") * 0.02
        a, b = fq(w), torch.compile(fq)(w)
        print(name, "inductor differs from eager on", int((a != b).sum()), "of", a.numel())


if __name__ == "__main__":
    main()
