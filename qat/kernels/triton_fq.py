"""One fused Triton kernel per fake-quant forward: parameters (the format's reference rule, or given
ones), codes, the reconstructed weight and the STE clip mask in a single pass over the weight.

Why our own kernel: the eager formulation launches ~12 kernels per layer and per step, and
``torch.compile`` of that formulation changes the rounding (measured on an H200: inductor's output
differed from eager in ~90% of the Q4_0 weights of a 1536x576 layer), which breaks "what was trained is
bit-for-bit what llama.cpp runs". Here every product feeding a sum is ``mul_rn``/``add_rn`` (never
contracted into an FMA) and every division is IEEE ``div_rn``, so the kernel reproduces the eager
CPU numerics exactly (tests/test_triton_fq.py), eager or under torch.compile (as a ``triton_op``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import os

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False

# TRITON_INTERPRET=1 runs the kernels on CPU tensors through numpy (tests/test_triton_interpret.py), where
# libdevice does not exist: there, IEEE numpy operations stand in for the correctly rounded intrinsics.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

from ..formats import AffineFormat
from ..formats.ggml import GGMLFormat
from ..formats.intx import IntFormat

def launch_opts() -> dict:
    """Compiler options for every launch: libdevice's ``*_rn`` functions flush denormals to zero under
    Triton's default ``enable_reflect_ftz=True`` (``mul.rn.ftz.f32``), which C and torch do not (a Q4_0 block
    of amax 3e-38 has a denormal scale); nothing contracted into an FMA either (we call ``*_rn`` anyway)."""
    return {} if INTERPRET else {"enable_reflect_ftz": False, "enable_fp_fusion": False}


# kinds of parameter rule / code rounding
SYM_MAX, Q8, MINMAX, INT_SYM, INT_ASYM = 0, 1, 2, 3, 4


def kernel_kind(fmt: AffineFormat) -> Optional[int]:
    """The kernel's rule for ``fmt``, or None where the eager path must be used."""
    if isinstance(fmt, GGMLFormat):
        return {"q4_0": SYM_MAX, "q5_0": SYM_MAX, "q8_0": Q8, "q4_1": MINMAX, "q5_1": MINMAX}.get(fmt.name)
    if isinstance(fmt, IntFormat) and fmt.granularity == "group" and fmt.group_size in (16, 32, 64, 128, 256):
        return INT_SYM if fmt.symmetric else INT_ASYM
    return None


if HAS_TRITON and not INTERPRET:
    _div, _mul, _add, _rint, _round = libdevice.div_rn, libdevice.mul_rn, libdevice.add_rn, libdevice.rint, libdevice.round
elif HAS_TRITON:
    @triton.jit
    def _div(a, b):
        return a / b

    @triton.jit
    def _mul(a, b):
        return a * b

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _rint(x):  # round half to even
        f = tl.floor(x)
        d = x - f
        even = tl.floor(f * 0.5) * 2.0 == f
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(even, f, f + 1.0)))

    @triton.jit
    def _round(x):  # round half away from zero
        a = tl.abs(x)
        f = tl.floor(a)
        r = tl.where(a - f >= 0.5, f + 1.0, f)
        return tl.where(x < 0, -r, r)


if HAS_TRITON:

    @triton.jit
    def _signed_max(x, cols, BLOCK: tl.constexpr):
        """Each row's signed value of largest magnitude, the first on a tie (Q4_0/Q5_0's max). The row's max and
        min decide it unless their magnitudes are equal (an all-zero row too) or one is nan; only a program
        holding such a row runs the first-index rule, for those rows (2 reductions instead of 3: the packed
        refresh 23.9 -> 21.5 us on an H100, 8192 x 2048 bf16; ``bench/pack_variants.py``)."""
        hi = tl.max(x, axis=1)
        nlo = -tl.min(x, axis=1)
        mx = tl.where(hi > nlo, hi, -nlo)
        tie = (hi > nlo) == (nlo > hi)
        if tl.max(tie.to(tl.int32), axis=0) > 0:
            ax = tl.abs(x)
            amax = tl.max(ax, axis=1)
            first = tl.min(tl.where(ax == amax[:, None], cols[None, :], BLOCK), axis=1)
            # the element itself, -0 too (a sum with +0 would lose its sign: a block of -0 has d = +0); no
            # index (a nan amax): 0, as before
            at = tl.max(tl.where(cols[None, :] == first[:, None], x, float("-inf")), axis=1)
            mx = tl.where(tie, tl.where(first < BLOCK, at, 0.0), mx)
        return mx

    @triton.jit
    def _fq_codes(x, SCALE, ZERO, rows, rmask, cols, qmin: tl.constexpr, qmax: tl.constexpr, offset: tl.constexpr,
                  BLOCK: tl.constexpr, KIND: tl.constexpr, DYNAMIC: tl.constexpr, HAS_ZERO: tl.constexpr,
                  SCALE_F16: tl.constexpr):
        # The blocks ``x`` (fp32, [rows, BLOCK]) -> ``(s_st, zt, raw, codes)``: the stored scale, the zero term
        # w_hat takes (KIND 2: the stored min; 4: the integer zero-point; else unused), the unclamped and the
        # clamped codes. DYNAMIC: the reference rule's parameters, also stored to SCALE/ZERO (the observer's
        # buffers); else read from there. qmin/qmax/offset are per-format float constants (constexpr: under
        # torch.compile a runtime float argument would arrive as fp64). Every product that feeds a sum is
        # mul_rn/add_rn: never contracted into an FMA, whatever compiler options launch us.
        if DYNAMIC:
            if KIND == 0:  # Q4_0/Q5_0: d = max / -offset, max = signed value of largest magnitude (first on ties)
                scale = _div(_signed_max(x, cols, BLOCK), -offset)
                zero = scale * 0.0
            elif KIND == 1:  # Q8_0: d = amax / 127
                scale = _div(tl.max(tl.abs(x), axis=1), 127.0)
                zero = scale * 0.0
            elif KIND == 2:  # Q4_1/Q5_1: d = (max - min) / qmax, m = min
                mn = tl.min(x, axis=1)
                scale = _div(tl.max(x, axis=1) - mn, qmax)
                zero = mn
            elif KIND == 3:  # int symmetric: amax / ((qmax - qmin) / 2), floored at eps
                amax = tl.maximum(tl.abs(tl.min(x, axis=1)), tl.abs(tl.max(x, axis=1)))
                scale = tl.maximum(_div(amax, (qmax - qmin) * 0.5), 1.1920928955078125e-07)
                zero = scale * 0.0
            else:  # int asymmetric, range including 0
                lo = tl.minimum(tl.min(x, axis=1), 0.0)
                hi = tl.maximum(tl.max(x, axis=1), 0.0)
                scale = tl.maximum(_div(hi - lo, qmax - qmin), 1.1920928955078125e-07)
                zero = _rint(qmin - _div(lo, scale))
                zero = tl.minimum(tl.maximum(zero, qmin), qmax)
            tl.store(SCALE + rows, scale, mask=rmask)
            if HAS_ZERO:
                tl.store(ZERO + rows, zero, mask=rmask)
        else:
            scale = tl.load(SCALE + rows, mask=rmask, other=1.0)
            if HAS_ZERO:
                zero = tl.load(ZERO + rows, mask=rmask, other=0.0)
            else:
                zero = scale * 0.0

        if SCALE_F16:
            s_st = scale.to(tl.float16).to(tl.float32)
        else:
            s_st = scale
        if KIND <= 2:
            inv = tl.where(scale == 0.0, 0.0, _div(1.0, tl.where(scale == 0.0, 1.0, scale)))
            if KIND == 0:
                raw = tl.floor(_add(_mul(x, inv[:, None]), offset + 0.5))
            elif KIND == 1:
                raw = _round(_mul(x, inv[:, None]))
            else:
                raw = tl.floor(_add(_mul(x - zero[:, None], inv[:, None]), 0.5))
        else:
            raw = _rint(_div(x, s_st[:, None]))
            if KIND == 4:
                raw = raw + zero[:, None]
        codes = tl.minimum(tl.maximum(raw, qmin), qmax) + 0.0
        if KIND == 2 and SCALE_F16:
            zt = zero.to(tl.float16).to(tl.float32)
        else:
            zt = zero
        return s_st, zt, raw, codes

    @triton.jit
    def _w_hat(codes, s_st, zt, offset: tl.constexpr, KIND: tl.constexpr):
        """w_hat (fp32) of the codes and ``_fq_codes``' stored scale and zero term."""
        if KIND == 2:
            return _add(_mul(codes, s_st[:, None]), zt[:, None])
        elif KIND == 4:
            return (codes - zt[:, None]) * s_st[:, None]
        else:
            return (codes - offset) * s_st[:, None]

    @triton.jit
    def _fq_rows(W, OUT, MASK, SCALE, ZERO, rows, n_blocks, qmin: tl.constexpr, qmax: tl.constexpr,
                 offset: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr, DYNAMIC: tl.constexpr,
                 HAS_ZERO: tl.constexpr, SCALE_F16: tl.constexpr, MODE: tl.constexpr):
        # Blocks ``rows`` of one weight. MODE 0: w_hat to OUT and the clip mask to MASK; 1: w_hat to OUT only;
        # 2: the STE backward in place, OUT holding the gradient of w_hat, which becomes OUT * mask (no w_hat
        # written).
        cols = tl.arange(0, BLOCK)
        rmask = rows < n_blocks
        offs = rows[:, None].to(tl.int64) * BLOCK + cols[None, :]
        x = tl.load(W + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        s_st, zt, raw, codes = _fq_codes(x, SCALE, ZERO, rows, rmask, cols, qmin, qmax, offset, BLOCK, KIND, DYNAMIC,
                                         HAS_ZERO, SCALE_F16)
        if MODE == 2:  # torch's ``grad * mask`` bitwise: g where inside, else g * 0 (-g*0 = -0, nan*0 = nan)
            g = tl.load(OUT + offs, mask=rmask[:, None], other=0.0)
            tl.store(OUT + offs, tl.where(raw == codes, g, g * 0.0).to(OUT.dtype.element_ty), mask=rmask[:, None])
        else:
            w_hat = _w_hat(codes, s_st, zt, offset, KIND)
            tl.store(OUT + offs, w_hat.to(OUT.dtype.element_ty), mask=rmask[:, None])
            if MODE == 0:
                tl.store(MASK + offs, (raw == codes).to(MASK.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _fq_kernel(W, OUT, MASK, SCALE, ZERO, n_blocks, qmin: tl.constexpr, qmax: tl.constexpr,
                   offset: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr, DYNAMIC: tl.constexpr,
                   HAS_ZERO: tl.constexpr, SCALE_F16: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        _fq_rows(W, OUT, MASK, SCALE, ZERO, rows, n_blocks, qmin, qmax, offset, BLOCK, KIND, DYNAMIC, HAS_ZERO,
                 SCALE_F16, 0)

    @triton.jit
    def _table_ptr(BASE, TABLE, layer, ALIGNED: tl.constexpr):
        """Layer ``layer``'s tensor: ``BASE`` (a pointer argument) plus the element offset in the int64 table
        (see ``rel_offsets``). ALIGNED: every offset is a multiple of this many elements (16 bytes where the
        host checked every address is), so the compiler may vectorize.
        Not the address itself, read from the table and cast to a pointer: such a pointer made the step
        cache's refresh ~8x slower than the same kernel on pointer arguments (measured on an H200, one
        8192 x 2048 bf16 weight, q4_0: 221 us against 23 us; BENCHMARKS.md, session 9)."""
        off = tl.load(TABLE + layer)
        if ALIGNED > 1:
            off = tl.multiple_of(off, ALIGNED)
        return BASE + off

    @triton.jit
    def _table_layer(W0, WP, SP, ZP, PL, PR, ROWS: tl.constexpr, ALIGNED: tl.constexpr):
        """A multi-layer kernel's program setup: ``(layer, rows, W, S, Z)``, this program's layer (PL) and its
        ROWS blocks from the first one (PR), the layer's weight (W0 + WP[layer], see ``_table_ptr``) and its
        observer's scale and zero buffers (the addresses in SP, ZP)."""
        pid = tl.program_id(0)
        layer = tl.load(PL + pid)
        rows = tl.load(PR + pid) + tl.arange(0, ROWS)
        W = _table_ptr(W0, WP, layer, ALIGNED)
        S = tl.load(SP + layer).to(tl.pointer_type(tl.float32))
        Z = tl.load(ZP + layer).to(tl.pointer_type(tl.float32))
        return layer, rows, W, S, Z

    @triton.jit
    def _fq_multi_kernel(W0, WP, OUT, MASK, SP, ZP, OFF, NB, PL, PR, qmin: tl.constexpr, qmax: tl.constexpr,
                         offset: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr,
                         HAS_ZERO: tl.constexpr, SCALE_F16: tl.constexpr, ALIGNED: tl.constexpr):
        # Many weights of one format in one launch (horizontal fusion): program -> (layer PL, first block
        # PR); per layer, the weight (W0 + WP[layer]), the scale/zero buffer addresses (SP, ZP), its element
        # offset in the flat OUT/MASK buffers (OFF) and its block count (NB). Always the dynamic (reference) rule.
        # ALIGNED: see _table_ptr.
        layer, rows, W, S, Z = _table_layer(W0, WP, SP, ZP, PL, PR, ROWS, ALIGNED)
        off = tl.multiple_of(tl.load(OFF + layer), 16)  # layer sizes are multiples of the block (>= 16)
        _fq_rows(W, OUT + off, MASK + off, S, Z, rows, tl.load(NB + layer), qmin, qmax, offset, BLOCK, KIND, True,
                 HAS_ZERO, SCALE_F16, 0)

    @triton.jit
    def _fq_table_kernel(W0, WP, O0, OP, SP, ZP, NB, PL, PR, qmin: tl.constexpr, qmax: tl.constexpr,
                         offset: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr,
                         HAS_ZERO: tl.constexpr, SCALE_F16: tl.constexpr, ALIGNED: tl.constexpr, DYNAMIC: tl.constexpr,
                         MODE: tl.constexpr):
        # Many weights of one format in one launch, every output its own tensor (O0 + OP[layer]): the step
        # cache (qat/step_cache.py). MODE 1 with DYNAMIC: the reference rule's parameters into the observer
        # buffers (SP, ZP) and w_hat into the outputs; MODE 2 without: the outputs hold the gradients of
        # w_hat, masked in place by the clip mask of the stored parameters.
        layer, rows, W, S, Z = _table_layer(W0, WP, SP, ZP, PL, PR, ROWS, ALIGNED)
        O = _table_ptr(O0, OP, layer, ALIGNED)
        _fq_rows(W, O, O, S, Z, rows, tl.load(NB + layer), qmin, qmax, offset, BLOCK, KIND, DYNAMIC, HAS_ZERO,
                 SCALE_F16, MODE)

    # -- the packed step cache (qat/step_cache.py): 4-bit codes once per optimizer step, w_hat from them ------
    @triton.jit
    def _pack_table_kernel(W0, WP, SP, ZP, OFF, NB, PL, PR, C, PS, PZ, WD, qmin: tl.constexpr,
                           qmax: tl.constexpr, offset: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                           KIND: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_F16: tl.constexpr,
                           ALIGNED: tl.constexpr, DYNAMIC: tl.constexpr):
        # Many weights of one 4-bit format in one launch (program -> layer PL, first block PR; the weight at
        # W0 + WP[layer], the observer buffers at SP/ZP[layer], the layer's element offset OFF in the flat
        # outputs): the parameters as ``_fq_codes`` gives them (DYNAMIC: also into the observer buffers), and
        # into the flat outputs C: the codes minus qmin, two per byte (element 2i in the low nibble, 2i+1 in
        # the high); PS/PZ: the stored scale and zero term per block (what ``_w_hat`` takes); WD: the clip
        # bits, bit j of int32 word i set where element 32i+j was clamped (where the STE's mask is 0).
        layer, rows, W, S, Z = _table_layer(W0, WP, SP, ZP, PL, PR, ROWS, ALIGNED)
        rmask = rows < tl.load(NB + layer)
        cols = tl.arange(0, BLOCK)
        x = tl.load(W + rows[:, None].to(tl.int64) * BLOCK + cols[None, :], mask=rmask[:, None], other=0.0)
        s_st, zt, raw, codes = _fq_codes(x.to(tl.float32), S, Z, rows, rmask, cols, qmin, qmax, offset, BLOCK,
                                         KIND, DYNAMIC, HAS_ZERO, SCALE_F16)
        blk = tl.load(OFF + layer) // BLOCK + rows.to(tl.int64)
        tl.store(PS + blk, s_st.to(PS.dtype.element_ty), mask=rmask)
        if HAS_ZERO:
            tl.store(PZ + blk, zt.to(PZ.dtype.element_ty), mask=rmask)
        lo, hi = tl.split(tl.reshape((codes - qmin).to(tl.uint8), (ROWS, BLOCK // 2, 2)))
        half = tl.arange(0, BLOCK // 2)
        tl.store(C + blk[:, None] * (BLOCK // 2) + half[None, :], lo | (hi << 4), mask=rmask[:, None])
        bits = (raw != codes).to(tl.uint32) << (cols % 32).to(tl.uint32)[None, :]
        words = tl.sum(tl.reshape(bits, (ROWS, BLOCK // 32, 32)), axis=2).to(tl.int32, bitcast=True)
        per = tl.arange(0, BLOCK // 32)
        tl.store(WD + blk[:, None] * (BLOCK // 32) + per[None, :], words, mask=rmask[:, None])

    @triton.jit
    def _unpack_kernel(C, PS, PZ, OUT, n_blocks, qmin: tl.constexpr, offset: tl.constexpr, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr, KIND: tl.constexpr):
        # w_hat of one layer from its slice of ``_pack_table_kernel``'s outputs, in OUT's dtype: the same
        # ``_w_hat`` on the same codes and stored parameters, so the same bits as the fake quant kernel.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_blocks
        half = tl.arange(0, BLOCK // 2)
        b = tl.load(C + rows[:, None].to(tl.int64) * (BLOCK // 2) + half[None, :], mask=rmask[:, None], other=0)
        codes = tl.reshape(tl.join(b & 15, b >> 4), (ROWS, BLOCK)).to(tl.float32) + qmin
        s_st = tl.load(PS + rows, mask=rmask, other=1.0).to(tl.float32)
        if KIND == 2 or KIND == 4:
            zt = tl.load(PZ + rows, mask=rmask, other=0.0).to(tl.float32)
        else:
            zt = s_st * 0.0
        w_hat = _w_hat(codes, s_st, zt, offset, KIND)
        cols = tl.arange(0, BLOCK)
        tl.store(OUT + rows[:, None].to(tl.int64) * BLOCK + cols[None, :], w_hat.to(OUT.dtype.element_ty),
                 mask=rmask[:, None])

    @triton.jit
    def _clip_table_kernel(G0, GP, WD, WOFF, NW, PL, PR, WORDS: tl.constexpr, ALIGNED: tl.constexpr):
        # The STE's mask on many gradients in place, in one launch (program -> layer PL, first word PR; layer
        # L's gradient at G0 + GP[L], see _table_ptr; its NW[L] clip words at WD + WOFF[L], as
        # ``_pack_table_kernel`` wrote them): g * 0 where the code was clamped (as torch's ``grad * mask``:
        # -g*0 = -0, nan*0 = nan); the other elements are not touched (nor read).
        # One word per lane, its set bits one at a time (lowest first), as many rounds as the program's fullest
        # word has bits: Q4_0 on random normal weights sets a bit in 15 % of its words (0.17 a word, up to 7), so
        # a few rounds, against testing all 32 bits of every word in 32 lanes (instruction-bound; a ~1B Llama's
        # 80 packed layers: 267 against 499 us a step, H200, bench/clip_launch.py). The traffic is the words and
        # the clamped elements' sectors.
        pid = tl.program_id(0)
        layer = tl.load(PL + pid)
        w_idx = tl.load(PR + pid) + tl.arange(0, WORDS)
        G = _table_ptr(G0, GP, layer, ALIGNED) + w_idx.to(tl.int64) * 32
        words = tl.load(WD + tl.load(WOFF + layer) + w_idx, mask=w_idx < tl.load(NW + layer), other=0)
        left = words.to(tl.uint32, bitcast=True)
        rounds = tl.max(_popcount(left), axis=0)
        while rounds > 0:  # (a while: the CPU interpreter's reductions do not convert to range()'s int)
            low = left & (0 - left)  # the lowest set bit (0 where none is left)
            # its index: the exponent of the (exact) float of 2^i
            pos = (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            hit = left != 0
            g = tl.load(G + pos, mask=hit, other=0.0)
            tl.store(G + pos, g * 0.0, mask=hit)
            left = left ^ low
            rounds -= 1

    @triton.jit
    def _popcount(x):
        """Set bits of each uint32 (SWAR: no libdevice, so the CPU interpreter runs it too)."""
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24).to(tl.int32)


if HAS_TRITON:

    @triton.jit
    def _program_blocks(PL, PR, NB, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        """This program's ``(layer, element offsets within the layer, row mask)`` from a multi-layer program
        table: program -> (layer PL, first block PR), ROWS blocks of BLOCK elements, NB blocks per layer."""
        pid = tl.program_id(0)
        layer = tl.load(PL + pid)
        rows = tl.load(PR + pid) + tl.arange(0, ROWS)
        rmask = (rows < tl.load(NB + layer))[:, None]
        offs = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
        return layer, offs, rmask

    @triton.jit
    def _mask_multi_kernel(G0, GP, MASK, OFF, NB, PL, PR, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                           ALIGNED: tl.constexpr):
        # The STE backward of a _fq_multi_kernel launch, in place: program -> (layer PL, first block PR) as
        # there; G0 + GP[layer] is each layer's gradient (contiguous, the weight's dtype), MASK the flat clip
        # mask at the layer's offset OFF. ``g * mask`` as a product, as torch's ``grad * mask`` (-g*0 = -0).
        layer, offs, rmask = _program_blocks(PL, PR, NB, BLOCK, ROWS)
        G = _table_ptr(G0, GP, layer, ALIGNED)
        g = tl.load(G + offs, mask=rmask, other=0.0)
        m = tl.load(MASK + tl.multiple_of(tl.load(OFF + layer), 16) + offs, mask=rmask, other=0).to(g.dtype)
        tl.store(G + offs, g * m, mask=rmask)

    @triton.jit
    def _mask_split_kernel(SRC, MASK, O0, OP, OFF, NB, PL, PR, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                           ALIGNED: tl.constexpr, MASKED: tl.constexpr):
        # The STE backward of the compiled group op: the flat gradient SRC (the layers' gradients one after
        # another, at offsets OFF) times the flat clip mask (MASKED; k-quants: a copy), written into a separate
        # tensor per layer (O0 + OP[layer]): each weight's gradient is then its own tensor, not a view of
        # one buffer (AOTAutograd rebuilds such views in Python, ~40 us each: measured 8 ms per SmolLM2 step).
        layer, offs, rmask = _program_blocks(PL, PR, NB, BLOCK, ROWS)
        O = _table_ptr(O0, OP, layer, ALIGNED)
        off = tl.multiple_of(tl.load(OFF + layer), 16)
        g = tl.load(SRC + off + offs, mask=rmask, other=0.0)
        if MASKED:
            g = g * tl.load(MASK + off + offs, mask=rmask, other=0).to(g.dtype)
        tl.store(O + offs, g, mask=rmask)


def rel_offsets(tensors: list[Tensor]) -> tuple[Tensor, int]:
    """The multi-layer kernels' address table for ``tensors`` (one dtype and device): each tensor's element
    offset from ``tensors[0]``, which the kernel takes as a pointer argument (``_table_ptr``), on the
    tensors' device; and the ``ALIGNED`` constant (16 bytes in elements where every address is a multiple
    of 16 bytes, else 1)."""
    base, es = tensors[0].data_ptr(), tensors[0].element_size()
    ptrs = list(map(Tensor.data_ptr, tensors))
    offs = torch.tensor([(p - base) // es for p in ptrs], dtype=torch.int64)
    if any((p - base) % es for p in ptrs):  # a tensor of this dtype starts at a multiple of its size
        raise RuntimeError("multi-layer kernel: tensors not aligned to their element size")
    dev = tensors[0].device
    offs = offs.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else offs.to(dev)
    return offs, (16 // es if all(p % 16 == 0 for p in ptrs) else 1)


def _launch(w, out, mask, scale, zero, fmt, dynamic, launcher):
    kind = kernel_kind(fmt)
    block = fmt.block
    n_blocks = w.numel() // block
    rows = max(1, 4096 // block)
    grid = (triton.cdiv(n_blocks, rows),)
    launcher(_fq_kernel)[grid](w, out, mask, scale, zero if zero is not None else scale, n_blocks,
                               float(fmt.qmin), float(fmt.qmax), float(getattr(fmt, "offset", 0)),
                               BLOCK=block, ROWS=rows, KIND=kind, DYNAMIC=dynamic, HAS_ZERO=zero is not None,
                               SCALE_F16=fmt.scale_dtype == torch.float16, num_warps=4, **launch_opts())


def fused_fake_quant(w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor], dynamic: bool):
    """Returns ``(w_hat, inside_mask)``. With ``dynamic``, the reference-rule parameters are computed in
    the kernel and written into ``scale``/``zero`` (the observer's buffers) in place."""
    w = w.contiguous()
    out = torch.empty_like(w)
    mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    _launch(w, out, mask, scale, zero, fmt, dynamic, lambda k: k)
    return out, mask


def packable(fmt) -> bool:
    """Whether the packed step cache takes ``fmt``: a kernel rule with codes of at most 4 bits (Q4_0, Q4_1,
    int4/int3/int2 symmetric or not) in blocks of a multiple of 32 (one clip word per 32 elements)."""
    return (isinstance(fmt, AffineFormat) and kernel_kind(fmt) in (SYM_MAX, MINMAX, INT_SYM, INT_ASYM)
            and fmt.qmax - fmt.qmin <= 15 and fmt.block % 32 == 0)


def packed_param_dtypes(fmt) -> tuple[torch.dtype, torch.dtype]:
    """``(scale, zero term)`` dtypes of the packed cache's per-block parameters: fp16 where the format stores
    them in fp16 (so exactly), the integer zero-point of int formats too (an integer <= 15), else fp32."""
    f16 = fmt.scale_dtype == torch.float16
    return (torch.float16 if f16 else torch.float32,
            torch.float16 if f16 or kernel_kind(fmt) == INT_ASYM else torch.float32)


def unpack(codes: Tensor, ps: Tensor, pz: Optional[Tensor], b_off: int, n_blocks: int, fmt, out: Tensor,
           launcher=lambda k: k) -> Tensor:
    """``out`` (a contiguous tensor of ``n_blocks * block`` elements) <- w_hat of the blocks from ``b_off`` on in
    the packed cache's flat buffers ``codes`` (bytes), ``ps``/``pz`` (per-block scale and zero term)."""
    block = fmt.block
    rows = max(1, 4096 // block)
    c = codes[b_off * (block // 2):(b_off + n_blocks) * (block // 2)]
    s = ps[b_off:b_off + n_blocks]
    z = s if pz is None else pz[b_off:b_off + n_blocks]
    launcher(_unpack_kernel)[(triton.cdiv(n_blocks, rows),)](
        c, s, z, out, n_blocks, float(fmt.qmin), float(getattr(fmt, "offset", 0)), BLOCK=block, ROWS=rows,
        KIND=kernel_kind(fmt), num_warps=4, **launch_opts())
    return out


def program_runs(counts: Tensor, per: int) -> tuple[Tensor, Tensor]:
    """A multi-layer kernel's program table (CPU int64): program p -> (layer ``pl[p]``, first unit ``pr[p]``),
    each layer's ``counts[layer]`` units (blocks, words) in runs of ``per``. Tensor ops: a Python loop over
    SmolLM2's ~12k programs took 8 ms per step under cProfile on an H200's host."""
    per_layer = (counts + per - 1) // per
    pl = torch.repeat_interleave(torch.arange(len(counts)), per_layer)
    pr = (torch.arange(pl.numel()) - (torch.cumsum(per_layer, 0) - per_layer)[pl]) * per
    return pl, pr


def cache_get(cache: Optional[dict], key, build, limit: int = 8):
    """``cache[key]``, built by ``build()`` on a miss; at most ``limit`` entries, the oldest dropped (the members
    moved, e.g. ``.to()``). ``cache`` None: built every time."""
    tab = None if cache is None else cache.get(key)
    if tab is None:
        tab = build()
        if cache is not None:
            if len(cache) >= limit:
                del cache[next(iter(cache))]
            cache[key] = tab
    return tab


# words and warps a program of ``_clip_table_kernel``: on a ~1B Llama's 80 packed layers with Q4_0's clip words of
# random normal weights (15 % of the words nonzero), 267 us a step at 256 and 4 against 288-462 us at 64-1024
# words and 4-8 warps; the dense kernel before it took 499 us at its best (H200, bench/clip_launch.py)
CLIP_WORDS, CLIP_WARPS = 256, 4


def clip_zero(grads: list[Tensor], words: Tensor, w_offs: list[int], tables: Optional[dict] = None) -> None:
    """``grad *= mask`` in place for every gradient of ``grads`` (contiguous, of one dtype and device), the mask
    of gradient i given by the packed cache's clip words from ``w_offs[i]`` on (``numel // 32`` of them), in
    one launch (``_clip_table_kernel``). ``tables``: a dict keeping the program tables between calls."""
    per, warps = CLIP_WORDS, CLIP_WARPS

    def build():
        nw = torch.tensor([g.numel() // 32 for g in grads], dtype=torch.int64)
        pl, pr = program_runs(nw, per)
        dev = words.device
        return (torch.tensor(w_offs, dtype=torch.int64, device=dev), nw.to(dev, torch.int32),
                pl.to(dev, torch.int32), pr.to(dev, torch.int32))

    woff, nw, pl, pr = cache_get(tables, (tuple(w_offs), tuple(map(Tensor.numel, grads)), words.device, per), build)
    gp, aligned = rel_offsets(grads)
    _clip_table_kernel[(pl.numel(),)](grads[0], gp, words, woff, nw, pl, pr, WORDS=per, ALIGNED=aligned,
                                      num_warps=warps, **launch_opts())


# -- for torch.compile: functional triton_ops with their autograd registered, so dynamo traces the whole
#    fake quant as one op (no autograd.Function, no graph break per layer), inductor launches the kernel
#    from its generated code, and never rewrites its arithmetic.
#
#    The dynamic rule computes the parameters in the kernel and writes them to scratch, so the observer's
#    buffers are not graph inputs. Each graph input costs host time on every call before the step's first
#    kernel (dynamo's guards, AOTAutograd's wrappers, inductor's size asserts: ~6 us each), while the GPU
#    waits: measured on an H200, SmolLM2-135M, 274 inputs for bf16 against 484 with the 210 scale buffers,
#    and 1.5-1.7 ms against 3.0-3.2 ms from the step's start to its first kernel.
if HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    @triton_op("qat::fake_quant_dynamic", mutates_args=())
    def _fq_dynamic_op(w: Tensor, fmt_name: str) -> tuple[Tensor, Tensor]:
        from ..formats import get_format
        fmt = get_format(fmt_name)
        w = w.contiguous()
        out = torch.empty_like(w)
        mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        scratch = torch.empty(w.numel() // fmt.block, dtype=torch.float32, device=w.device)
        _launch(w, out, mask, scratch, None, fmt, True, wrap_triton)
        return out, mask

    @triton_op("qat::fake_quant", mutates_args=())
    def _fq_op(w: Tensor, scale: Tensor, zero: Optional[Tensor], fmt_name: str) -> tuple[Tensor, Tensor]:
        """Given parameters (a frozen or ``mse`` observer's buffers), read only."""
        from ..formats import get_format
        w = w.contiguous()
        out = torch.empty_like(w)
        mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        _launch(w, out, mask, scale, zero, get_format(fmt_name), False, wrap_triton)
        return out, mask

    def _fq_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.n_inputs = len(inputs)

    def _fq_backward(ctx, grad, _grad_mask):
        (mask,) = ctx.saved_tensors
        return (grad * mask,) + (None,) * (ctx.n_inputs - 1)

    _fq_dynamic_op.register_autograd(_fq_backward, setup_context=_fq_setup)
    _fq_op.register_autograd(_fq_backward, setup_context=_fq_setup)

    # Triton's interpreter (the CPU tests) has no kernels for wrap_triton to trace: there the op is opaque
    _opaque = INTERPRET

    @(torch.library.custom_op("qat::unpack_w", mutates_args=()) if _opaque else triton_op("qat::unpack_w", mutates_args=()))
    def _unpack_op(w: Tensor, codes: Tensor, ps: Tensor, pz: Optional[Tensor], b_off: int, fmt_name: str) -> Tensor:
        """The packed step cache's w_hat of ``w`` under torch.compile: its blocks from ``b_off`` on in the flat
        buffers (one graph input each for all layers). ``w`` is read for its shape only; its gradient is the
        output's (the STE's mask is applied after the backward, from the clip words: qat/step_cache.py)."""
        from ..formats import get_format
        fmt = get_format(fmt_name)
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        return unpack(codes, ps, pz, b_off, w.numel() // fmt.block, fmt, out, (lambda k: k) if _opaque else wrap_triton)

    def _unpack_backward(ctx, grad):
        return grad, None, None, None, None, None

    _unpack_op.register_autograd(_unpack_backward)

    if _opaque:
        @_unpack_op.register_fake
        def _unpack_fake(w, codes, ps, pz, b_off, fmt_name):
            return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def compiled_fake_quant(w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor], dynamic: bool) -> Tensor:
    """The fused fake quant as traced under torch.compile. With ``dynamic`` the observer's buffers are left as
    they are (see above): they are a function of the weight, recomputed where they are read
    (``WeightQuantizer.quantize``, so export, observes the weight first)."""
    if dynamic:
        return _fq_dynamic_op(w, fmt.name)[0]
    return _fq_op(w, scale, zero, fmt.name)[0]


class _FusedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, zero, fmt, dynamic):
        out, mask = fused_fake_quant(w, fmt, scale, zero, dynamic)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None  # one kernel; where(mask, grad, 0.0) also built a scalar


def can_fuse(w: Tensor, fmt: AffineFormat) -> bool:
    if not (HAS_TRITON and w.is_cuda and kernel_kind(fmt) is not None and w.shape[-1] % fmt.block == 0):
        return False
    # the switch is read in eager mode only: nothing for dynamo to trace (or break its graph on)
    return torch.compiler.is_compiling() or not os.environ.get("QAT_DISABLE_TRITON")


def fused_ste(w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor], dynamic: bool) -> Tensor:
    """STE fake quant through the fused kernel; with ``dynamic`` the observer buffers are updated in place."""
    if torch.compiler.is_compiling():
        return compiled_fake_quant(w, fmt, scale, zero, dynamic)
    return _FusedSTE.apply(w, scale, zero, fmt, dynamic)
