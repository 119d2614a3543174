"""The packed cache's clip mask (the STE's mask from the clip bits, in place on the gradients) on a ~1B Llama's 80
packed layers (48 of 8192 x 2048, 32 of 2048 x 2048, bf16): one launch per layer (session 10's kernel) against
the one-launch table kernel (``triton_fq._clip_table_kernel``), over words per program and warps. The clip
words are synthetic: 63 % nonzero with one bit, as Q4_0 gives on random weights. Device time, profiler.

    python bench/clip_launch.py"""
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch, triton, triton.language as tl
from qat.kernels import triton_fq as tfq
from kernel_bw import timed


@triton.jit
def old_clip(G, WD, n_words, WORDS: tl.constexpr):
    w_idx = tl.program_id(0) * WORDS + tl.arange(0, WORDS)
    words = tl.load(WD + w_idx, mask=w_idx < n_words, other=0)
    lanes = tl.arange(0, 32)
    hit = ((words[:, None] >> lanes[None, :]) & 1) != 0
    offs = w_idx[:, None].to(tl.int64) * 32 + lanes[None, :]
    g = tl.load(G + offs, mask=hit, other=0.0)
    tl.store(G + offs, g * 0.0, mask=hit)


torch.manual_seed(0)
shapes = [(8192, 2048)] * 48 + [(2048, 2048)] * 32
grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
total = sum(g.numel() for g in grads) // 32
bit = torch.randint(0, 32, (total,), device="cuda")
words = torch.where(torch.rand(total, device="cuda") < 0.63, (1 << bit), 0)
words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
offs = [0]
for g in grads[:-1]:
    offs.append(offs[-1] + g.numel() // 32)
for per, warps in ((64, 4), (128, 4), (256, 4), (256, 8)):
    def old():
        for g, o in zip(grads, offs):
            n = g.numel() // 32
            old_clip[(triton.cdiv(n, per),)](g, words[o:o + n], n, WORDS=per, num_warps=warps, **tfq.launch_opts())
    nw = torch.tensor([g.numel() // 32 for g in grads])
    per_layer = (nw + per - 1) // per
    pl = torch.repeat_interleave(torch.arange(len(grads)), per_layer)
    pr = (torch.arange(pl.numel()) - (torch.cumsum(per_layer, 0) - per_layer)[pl]) * per
    woff = torch.tensor(offs, device="cuda"); nwd = nw.cuda().int(); pl = pl.cuda().int(); pr = pr.cuda().int()
    gp, al = tfq.rel_offsets(grads)
    def new():
        tfq._clip_table_kernel[(pl.numel(),)](grads[0], gp, words, woff, nwd, pl, pr, WORDS=per, ALIGNED=al,
                                              num_warps=warps, **tfq.launch_opts())
    print(f"words {per} warps {warps}: per-layer {timed(old) * 1e3:.1f} us, table {timed(new) * 1e3:.1f} us", flush=True)
