"""The packed cache's clip mask (the STE's mask from the clip bits, in place on the gradients) on a ~1B Llama's 80
packed layers (48 of 8192 x 2048, 32 of 2048 x 2048, bf16), device time from the profiler:
  dense:  session 11's one-launch table kernel (kept here): every word's 32 bits tested in 32 lanes
  sparse: the library's ``triton_fq._clip_table_kernel`` (session 13): one word a lane, its set bits one at a
          time, as many rounds as the program's fullest word has bits
over words per program and warps, on two sets of clip words: synthetic (63 % of the words with one bit, as
before) and Q4_0's own on random normal weights (the bits torch's reference rule gives: some words have 2+).
Each sparse launch is checked bitwise against the dense one first.

    python bench/clip_launch.py [--out results.json]"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch, triton, triton.language as tl
from qat.formats import get_format
from qat.formats.base import to_blocks
from qat.kernels import triton_fq as tfq
from kernel_bw import timed


@triton.jit
def dense_clip(G0, GP, WD, WOFF, NW, PL, PR, WORDS: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(PL + pid)
    w_idx = tl.load(PR + pid) + tl.arange(0, WORDS)
    G = tfq._table_ptr(G0, GP, layer, ALIGNED)
    words = tl.load(WD + tl.load(WOFF + layer) + w_idx, mask=w_idx < tl.load(NW + layer), other=0)
    lanes = tl.arange(0, 32)
    hit = ((words[:, None] >> lanes[None, :]) & 1) != 0
    offs = w_idx[:, None].to(tl.int64) * 32 + lanes[None, :]
    g = tl.load(G + offs, mask=hit, other=0.0)
    tl.store(G + offs, g * 0.0, mask=hit)


def q4_0_words(shape, gen, device="cuda") -> torch.Tensor:
    """Q4_0's clip words of a random normal bf16 weight: bit j of word i set where element 32i+j's code is clamped
    by the library's reference rule (``qat.formats``: what the pack kernel reproduces bitwise)."""
    fmt = get_format("q4_0")
    blocks = to_blocks(torch.randn(shape, device=device, generator=gen).to(torch.bfloat16), fmt.block).reshape(-1, 32)
    scale, zero = fmt.choose_params(blocks)
    raw = fmt.raw_codes(blocks, scale, zero)
    bits = (raw != fmt.clamp_codes(raw)).to(torch.int64) << torch.arange(32, device=device)
    words = bits.sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(8192, 2048)] * 48 + [(2048, 2048)] * 32
    grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]
    total = sum(g.numel() for g in grads) // 32
    bit = torch.randint(0, 32, (total,), device="cuda", generator=gen)
    synth = torch.where(torch.rand(total, device="cuda", generator=gen) < 0.63, (1 << bit), 0)
    synth = torch.where(synth >= 2**31, synth - 2**32, synth).to(torch.int32)
    real = torch.cat([q4_0_words(s, gen) for s in shapes])
    offs = [0]
    for g in grads[:-1]:
        offs.append(offs[-1] + g.numel() // 32)
    gp, al = tfq.rel_offsets(grads)
    rows = []
    for name, words in (("synthetic", synth), ("q4_0 random", real)):
        nz = (words != 0).float().mean().item()
        pop = torch.stack([(words >> b) & 1 for b in range(32)]).sum(0)
        print(f"{name}: {nz:.1%} of words nonzero, {pop.float().mean().item():.3f} bits a word, max {pop.max().item()}",
              flush=True)
        for per, warps in ((64, 4), (128, 4), (256, 4), (256, 8), (512, 4), (1024, 4), (1024, 8)):
            nw = torch.tensor([g.numel() // 32 for g in grads])
            pl, pr = tfq.program_runs(nw, per)
            woff = torch.tensor(offs, device="cuda")
            nwd, pl, pr = nw.cuda().int(), pl.cuda().int(), pr.cuda().int()
            dense = lambda: dense_clip[(pl.numel(),)](grads[0], gp, words, woff, nwd, pl, pr, WORDS=per, ALIGNED=al,
                                                      num_warps=warps, **tfq.launch_opts())
            sparse = lambda: tfq._clip_table_kernel[(pl.numel(),)](grads[0], gp, words, woff, nwd, pl, pr, WORDS=per,
                                                                   ALIGNED=al, num_warps=warps, **tfq.launch_opts())
            keep = [g.clone() for g in grads[:3]]
            dense()
            a = [g.clone() for g in grads[:3]]
            for g, k in zip(grads[:3], keep):
                g.copy_(k)
            sparse()
            same = all(torch.equal(x.view(torch.int16), g.view(torch.int16)) for x, g in zip(a, grads[:3]))
            td, ts = timed(dense) * 1e3, timed(sparse) * 1e3
            rows.append(dict(words=name, per=per, warps=warps, dense_us=td, sparse_us=ts, bitwise=same))
            print(f"  {per:5d} words {warps} warps: dense {td:7.1f} us  sparse {ts:7.1f} us  bitwise {same}", flush=True)
    out = dict(device=torch.cuda.get_device_name(), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
