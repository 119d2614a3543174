"""Where the packed refresh's time goes (Q4_0, one 8192 x 2048 bf16 weight): variants of the pack kernel, each
checked bitwise against the library's refresh first, timed at 3 launch shapes (device time, profiler). Session
11 adopted V1's rule (``triton_fq._signed_max``, which V1-V7 and fq here call) and 32 rows / 1 warp a
program.
  V0: the library's arithmetic (3 reductions for the signed max) in a single-weight kernel
  V1: max and min (2 reductions), the index rule only in programs with a tie (or nan)
  V2: V1 + codes to integers by the 2^23 trick (no F2I)
  V3: V2 without the clip words (where the words' cost goes)
  V4: V2 with codes stored one per byte (where the nibble packing's cost goes)
  V5: V2 without the parameter computation (scale loaded: where the reductions' cost goes)
  V6: V2 with Q4_0's clip bits from x * inv + 8.5 >= 16 (it clamps only at the top)
  V7: V2 with the clip bits summed in two steps (8, then 4)
  V8: V2 with floor() by the 2^23 trick (no FRND: t = (y + 2^23) - 2^23, floor = t - (t > y))
  V9: V8 + V6's clip bits
  PF: V1's arithmetic, each program TILES tiles of ROWS blocks in a loop, the next tile's load issued before
      the current tile's arithmetic (by hand: more loads in flight while a warp computes)
  fq: the library's fake quant kernel against one with V1's rule
The signed max keeps a -0 element's sign (a max over -inf elsewhere, not a sum with +0), as the library does.
    TRITON_INTERPRET=1 python bench/pack_variants.py   (bitwise checks only, CPU)
    python bench/pack_variants.py                      (CUDA)"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch, triton, triton.language as tl
from torch import nn
import qat
from qat.kernels import triton_fq as tfq
from qat.kernels.triton_fq import _add, _div, _mul, _signed_max

dev = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def pack_v(W, C, PS, WD, n_blocks, VAR: tl.constexpr, ROWS: tl.constexpr):
    BLOCK: tl.constexpr = 32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_blocks
    cols = tl.arange(0, BLOCK)
    x = tl.load(W + rows[:, None].to(tl.int64) * BLOCK + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    if VAR == 0:
        ax = tl.abs(x)
        amax = tl.max(ax, axis=1)
        first = tl.min(tl.where(ax == amax[:, None], cols[None, :], BLOCK), axis=1)
        mx = tl.max(tl.where(cols[None, :] == first[:, None], x, float("-inf")), axis=1)
        scale = _div(mx, -8.0)
    elif VAR == 5:
        scale = tl.load(PS + rows, mask=rmask, other=1.0).to(tl.float32)
    else:
        scale = _div(_signed_max(x, cols, BLOCK), -8.0)
    s_st = scale.to(tl.float16).to(tl.float32)
    inv = tl.where(scale == 0.0, 0.0, _div(1.0, tl.where(scale == 0.0, 1.0, scale)))
    if VAR >= 8:
        y = _add(_mul(x, inv[:, None]), 8.5)
        t = _add(_add(y, 8388608.0), -8388608.0)
        raw = tl.where(t > y, _add(t, -1.0), t)
    else:
        raw = tl.floor(_add(_mul(x, inv[:, None]), 8.5))
    codes = tl.minimum(tl.maximum(raw, 0.0), 15.0) + 0.0
    if VAR != 5:
        tl.store(PS + rows, s_st.to(tl.float16), mask=rmask)
    if VAR == 0 or VAR == 1:
        lo4, hi4 = tl.split(tl.reshape(codes.to(tl.uint8), (ROWS, BLOCK // 2, 2)))
        half = tl.arange(0, BLOCK // 2)
        tl.store(C + rows[:, None].to(tl.int64) * (BLOCK // 2) + half[None, :], lo4 | (hi4 << 4), mask=rmask[:, None])
    elif VAR == 4:
        ci = (codes + 8388608.0).to(tl.int32, bitcast=True) & 15
        tl.store(C + rows[:, None].to(tl.int64) * BLOCK + cols[None, :], ci.to(tl.uint8), mask=rmask[:, None])
    else:
        ci = (codes + 8388608.0).to(tl.int32, bitcast=True) & 15
        lo4, hi4 = tl.split(tl.reshape(ci, (ROWS, BLOCK // 2, 2)))
        half = tl.arange(0, BLOCK // 2)
        tl.store(C + rows[:, None].to(tl.int64) * (BLOCK // 2) + half[None, :], (lo4 | (hi4 << 4)).to(tl.uint8),
                 mask=rmask[:, None])
    if VAR == 6 or VAR == 9:  # Q4_0 clamps only at the top
        y = _add(_mul(x, inv[:, None]), 8.5)
        bits = tl.where(y >= 16.0, 1, 0).to(tl.uint32) << cols.to(tl.uint32)[None, :]
        words = tl.sum(bits, axis=1).to(tl.int32, bitcast=True)
        tl.store(WD + rows, words, mask=rmask)
    elif VAR == 7:
        bits = (raw != codes).to(tl.uint32) << cols.to(tl.uint32)[None, :]
        words = tl.sum(tl.sum(tl.reshape(bits, (ROWS, 4, 8)), axis=2), axis=1).to(tl.int32, bitcast=True)
        tl.store(WD + rows, words, mask=rmask)
    elif VAR != 3:
        bits = (raw != codes).to(tl.uint32) << cols.to(tl.uint32)[None, :]
        words = tl.sum(bits, axis=1).to(tl.int32, bitcast=True)
        tl.store(WD + rows, words, mask=rmask)


@triton.jit
def _v1_tile(x, rows, rmask, C, PS, WD, ROWS: tl.constexpr):
    BLOCK: tl.constexpr = 32
    cols = tl.arange(0, BLOCK)
    scale = _div(_signed_max(x, cols, BLOCK), -8.0)
    s_st = scale.to(tl.float16).to(tl.float32)
    inv = tl.where(scale == 0.0, 0.0, _div(1.0, tl.where(scale == 0.0, 1.0, scale)))
    raw = tl.floor(_add(_mul(x, inv[:, None]), 8.5))
    codes = tl.minimum(tl.maximum(raw, 0.0), 15.0) + 0.0
    tl.store(PS + rows, s_st.to(tl.float16), mask=rmask)
    lo4, hi4 = tl.split(tl.reshape(codes.to(tl.uint8), (ROWS, BLOCK // 2, 2)))
    half = tl.arange(0, BLOCK // 2)
    tl.store(C + rows[:, None].to(tl.int64) * (BLOCK // 2) + half[None, :], lo4 | (hi4 << 4), mask=rmask[:, None])
    bits = (raw != codes).to(tl.uint32) << cols.to(tl.uint32)[None, :]
    tl.store(WD + rows, tl.sum(bits, axis=1).to(tl.int32, bitcast=True), mask=rmask)


@triton.jit
def pack_pf(W, C, PS, WD, n_blocks, ROWS: tl.constexpr, TILES: tl.constexpr):
    BLOCK: tl.constexpr = 32
    cols = tl.arange(0, BLOCK)
    first = tl.program_id(0) * ROWS * TILES
    end = tl.minimum(first + ROWS * TILES, n_blocks)
    rows = first + tl.arange(0, ROWS)
    x_next = tl.load(W + rows[:, None].to(tl.int64) * BLOCK + cols[None, :], mask=(rows < end)[:, None], other=0.0)
    for t in range(TILES):
        x = x_next.to(tl.float32)
        cur = rows
        rows = rows + ROWS
        x_next = tl.load(W + rows[:, None].to(tl.int64) * BLOCK + cols[None, :], mask=(rows < end)[:, None], other=0.0)
        _v1_tile(x, cur, cur < end, C, PS, WD, ROWS)


@triton.jit
def fq_v(W, OUT, MASK, S, n_blocks, ROWS: tl.constexpr):
    BLOCK: tl.constexpr = 32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_blocks
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None].to(tl.int64) * BLOCK + cols[None, :]
    x = tl.load(W + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
    scale = _div(_signed_max(x, cols, BLOCK), -8.0)
    tl.store(S + rows, scale, mask=rmask)
    s_st = scale.to(tl.float16).to(tl.float32)
    inv = tl.where(scale == 0.0, 0.0, _div(1.0, tl.where(scale == 0.0, 1.0, scale)))
    raw = tl.floor(_add(_mul(x, inv[:, None]), 8.5))
    codes = tl.minimum(tl.maximum(raw, 0.0), 15.0) + 0.0
    tl.store(OUT + offs, ((codes - 8.0) * s_st[:, None]).to(OUT.dtype.element_ty), mask=rmask[:, None])
    tl.store(MASK + offs, (raw == codes).to(MASK.dtype.element_ty), mask=rmask[:, None])


def main():
    shape = (8192, 2048) if dev == "cuda" else (64, 256)
    torch.manual_seed(0)
    w = torch.randn(shape, device=dev).to(torch.bfloat16)
    w[0, :32] = 0.0  # an all-zero block (a tie)
    w[1, :32] = -0.0
    w[2, 0], w[2, 5] = 3.0, -3.0  # a +-max tie, first positive
    w[3, 0], w[3, 5] = -3.0, 3.0
    n = w.numel(); nb = n // 32
    model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)).to(dev, torch.bfloat16)
    with torch.no_grad():
        model[0].weight.copy_(w)
    os.environ["QAT_RECOMPUTE"] = "1"
    qat.prepare(model, "q4_0", rules={"*": "q4_0"})
    from qat.step_cache import StepCache
    from qat.modules import FakeQuantLinear
    layer = next(m for m in model.modules() if isinstance(m, FakeQuantLinear))
    cache = StepCache(model); cache.refresh(); buf = layer._w_packed.buf
    ref = (buf.codes.clone(), buf.ps.clone(), buf.words.clone())
    out = {}

    def measure(name, f, c, ps, wd, packed=True, words=True):
        """Run ``f`` once, compare its outputs bitwise with the library's refresh (``packed``: codes two per byte,
        else one per byte; ``words``: the clip words too), time it on CUDA, record and print it."""
        f()
        ok = bool(torch.equal(ps.view(torch.int16), ref[1].view(torch.int16)))
        ok &= bool(torch.equal(c if packed else c[0::2] | (c[1::2] << 4), ref[0]))
        if words:
            ok &= bool(torch.equal(wd, ref[2]))
        us = None
        if dev == "cuda":
            from kernel_bw import timed
            us = timed(f) * 1e3
        out[name] = dict(ok=ok, us=us)
        print(f"{name}: bitwise {ok}  {us}", flush=True)
    for var in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        for rows, warps in ((32, 1), (64, 2), (128, 4)):
            c = torch.zeros(n if var == 4 else n // 2, dtype=torch.uint8, device=dev)
            ps = ref[1].clone() if var == 5 else torch.zeros(nb, dtype=torch.float16, device=dev)
            wd = torch.zeros(nb, dtype=torch.int32, device=dev)
            f = lambda: pack_v[(triton.cdiv(nb, rows),)](w, c, ps, wd, nb, VAR=var, ROWS=rows, num_warps=warps,
                                                          **tfq.launch_opts())
            measure(f"V{var} rows {rows} warps {warps}", f, c, ps, wd, packed=var != 4, words=var != 3)
            if dev != "cuda":
                break
    for rows, tiles, warps in ((32, 2, 1), (32, 4, 1), (32, 8, 1), (16, 4, 1), (16, 8, 1), (64, 4, 2), (16, 1, 1)):
        c = torch.zeros(n // 2, dtype=torch.uint8, device=dev)
        ps = torch.zeros(nb, dtype=torch.float16, device=dev)
        wd = torch.zeros(nb, dtype=torch.int32, device=dev)
        f = lambda: pack_pf[(triton.cdiv(nb, rows * tiles),)](w, c, ps, wd, nb, ROWS=rows, TILES=tiles, num_warps=warps,
                                                               **tfq.launch_opts())
        measure(f"PF rows {rows} tiles {tiles} warps {warps}", f, c, ps, wd)
        if dev != "cuda":
            break
    o1 = torch.empty_like(w); m1 = torch.empty(w.shape, dtype=torch.bool, device=dev)
    o2 = torch.empty_like(w); m2 = torch.empty(w.shape, dtype=torch.bool, device=dev)
    s1 = torch.empty(nb, device=dev); s2 = torch.empty(nb, device=dev)
    for rows, warps in ((32, 1), (64, 2), (128, 4)):
        g0 = lambda: tfq._fq_kernel[(triton.cdiv(nb, rows),)](w, o1, m1, s1, s1, nb, 0.0, 15.0, 8.0, BLOCK=32, ROWS=rows,
            KIND=0, DYNAMIC=True, HAS_ZERO=False, SCALE_F16=True, num_warps=warps, **tfq.launch_opts())
        g1 = lambda: fq_v[(triton.cdiv(nb, rows),)](w, o2, m2, s2, nb, ROWS=rows, num_warps=warps, **tfq.launch_opts())
        g0(); g1()
        ok = bool(torch.equal(o1.view(torch.int16), o2.view(torch.int16)) and torch.equal(m1, m2) and torch.equal(s1, s2))
        t0 = t1 = None
        if dev == "cuda":
            from kernel_bw import timed
            t0, t1 = timed(g0) * 1e3, timed(g1) * 1e3
        out[f"fq rows{rows} w{warps}"] = dict(ok=ok, lib_us=t0, v1_us=t1)
        print(f"fq rows {rows} warps {warps}: bitwise {ok}  lib {t0}  v1 {t1}", flush=True)
        if dev != "cuda":
            break
    if dev == "cuda":
        from kernel_bw import timed
        cp = torch.empty_like(w)
        out["copy"] = timed(lambda: cp.copy_(w)) * 1e3
        print("copy", out["copy"])
    open(os.path.join(os.environ.get("OUT", "/tmp"), "pack_var.json"), "w").write(json.dumps(out, indent=1))


main()
