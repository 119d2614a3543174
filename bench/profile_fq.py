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
from bench.speed import build  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="qat:q4_0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    args = p.parse_args()
    model = build("smollm2", args.variant, "cuda").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, 49152, (args.batch, args.seq), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))

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
