"""The k-quant Triton kernel alone (qat/kernels/triton_kquant.py): time per call of one k-quant group
(SmolLM2's 30 ``ffn_down`` weights concatenated, as the training step's group calls it), for each type and
a grid of launch shapes (``LANES`` sub-blocks per program, ``NUM_WARPS``). Every shape's output is checked
bitwise against the default's: a launch shape may only change the speed.

    python bench/kquant_kernel.py [--types q4_k,q6_k] [--lanes 32,64,128] [--warps 1,2,4] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="q2_k,q3_k,q4_k,q5_k,q6_k")
    p.add_argument("--lanes", default="32,64,128,256")
    p.add_argument("--warps", default="1,2,4,8")
    p.add_argument("--layers", type=int, default=15, help="ffn_down-sized weights (576 x 1536) per call")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from qat.formats import get_format
    from qat.kernels import triton_kquant as tk

    torch.manual_seed(0)
    w = (torch.randn(args.layers * 576, 1536, device="cuda") * 0.02).to(torch.bfloat16)
    default = (tk.LANES, tk.NUM_WARPS)
    rows = []
    for t in args.types.split(","):
        fmt = get_format(t)
        ref = tk.kquant_fake(w, fmt)
        for lanes in map(int, args.lanes.split(",")):
            for warps in map(int, args.warps.split(",")):
                if lanes < 32 * warps // 4:  # fewer lanes than a quarter of the threads: idle warps
                    continue
                tk.LANES, tk.NUM_WARPS = lanes, warps
                try:
                    y = tk.kquant_fake(w, fmt)  # compiles
                    same = bool(torch.equal(y.view(torch.int32), ref.view(torch.int32)))
                    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                    torch.cuda.synchronize()
                    ev[0].record()
                    for _ in range(args.repeats):
                        tk.kquant_fake(w, fmt)
                    ev[1].record()
                    torch.cuda.synchronize()
                    ms = ev[0].elapsed_time(ev[1]) / args.repeats
                except Exception as e:  # a shape the compiler rejects (registers): keep the others
                    ms, same = float("nan"), repr(e)[:120]
                finally:
                    tk.LANES, tk.NUM_WARPS = default
                r = dict(type=t, lanes=lanes, warps=warps, ms=ms, bitwise_default=same, elements=w.numel(),
                         device=torch.cuda.get_device_name())
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{'type':6} {'lanes':>5} {'warps':>5} {'ms/call':>8} bitwise")
    for r in rows:
        print(f"{r['type']:6} {r['lanes']:5} {r['warps']:5} {r['ms']:8.3f} {r['bitwise_default']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
