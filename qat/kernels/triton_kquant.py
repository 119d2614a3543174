"""The k-quant fake quantization (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in one Triton kernel launch per tensor.

Why our own kernel: a k-quant's ``w_hat`` is llama.cpp's reference encoder (``quantize_row_q*_K_ref``)
followed by its decoder. ``kquants.py`` reproduces that encoder bit for bit in vectorized torch, but its
two-level search runs as Python loops over the 16/32 elements of a sub-block (C's sequential sums) and
over the 16-21 candidate scales: thousands of small ops per call, launch-bound on a GPU (~800 ms per
training step for SmolLM2). The other path, llama.cpp's C encoder on the host, costs a device-to-host
copy and the CPU search: 3.8x a bf16 step. Here every sub-block's search runs in registers, sequentially,
exactly as C does, and the tensor never leaves the device.

Structure: one copy of ``w`` into the element-major layout ``_quantize_torch`` uses ((sub, n_sub_blocks): a
warp's lanes then load contiguous words at every step), then one kernel launch; a program handles
``BLOCK_SB`` super-blocks of 256 weights (``LANES`` = 64 sub-blocks, 2 warps, on a GPU):

1. lanes = the program's ``BLOCK_SB x N_SUB`` sub-blocks (a 2D register tile); each lane runs its
   sub-block's search with runtime loops (not unrolled: compiles in <1 s) over the candidates and over the
   sub-block's elements, loading element ``i`` of every lane per step: ``make_qkx2_quants`` (Q2_K, Q4_K,
   Q5_K, with Q4_K/Q5_K's ``av_x + |x|`` and Q2_K's ``|x|`` weights), ``make_qx_quants`` rmse_type 1
   (Q6_K), ``make_q3_quants`` with its coordinate descent (Q3_K; its codes live bit-packed in an int64
   per lane, 3 bits each). The winner's codes are recomputed from its ``iscale`` (and min) where needed.
2. lanes = super-blocks: reductions over the tile's sub-block axis (``_running_max``, ``_first_absmax``),
   the 6-bit/4-bit/8-bit sub-scale quantization with C's uint8/int8 store wraps, fp16 ``d``/``dmin``.
3. lanes = sub-blocks again: ``_requantize``'s final codes and the dequantization
   ``dl*q - ml`` / ``dl*(q - offset)`` with ``dl = d*sc`` first, written out in ``w``'s layout (optionally
   with the codes, ``d``, ``dmin`` and the sub-block scales/mins, as ``_encode`` returns them).

Bitwise rules (those of ``kquants.py``, see its docstring): every fp32 sum is accumulated sequentially in
C's order; every product, sum and difference goes through ``mul_rn``/``add_rn``/``sub_rn`` (``_mul``,
``_add``, ``_sub``) so that nothing is contracted into an FMA, and the launch also passes
``enable_fp_fusion=False``; divisions are IEEE ``div_rn``, ``sqrtf`` is ``sqrt_rn``; ``nearest_int`` is
C's ``12582912.f`` bit trick; fp16 rounding is round-to-nearest-even (``.to(tl.float16)``); selections
are ``tl.where``. The launch passes ``enable_reflect_ftz=False``: Triton's default makes libdevice's
``*_rn`` functions flush denormals to zero (``mul.rn.ftz.f32``), which would differ from C on tiny
weights (x*x of |x| ~ 1e-20 is denormal). Under ``TRITON_INTERPRET=1`` (CPU tensors) numpy's IEEE fp32
operations stand in for the intrinsics.

Non-finite weights: the training path only passes finite weights; super-blocks with NaN/inf get unspecified
values (nothing crashes, other super-blocks are unaffected; the torch/C encoders give garbage there too).
The PTX (sm_90, compiled with these options) has no ``fma``, ``.ftz``, ``approx`` or ``div.full``.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .triton_fq import HAS_TRITON, INTERPRET

QK_K = 256

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_fq import _add, _div, _mul

    if not INTERPRET:
        from triton.language.extra import libdevice

        _sub, _sqrt = libdevice.sub_rn, libdevice.sqrt_rn
    else:
        @triton.jit
        def _sub(a, b):
            return a - b

        @triton.jit
        def _sqrt(x):  # numpy's fp32 sqrt is correctly rounded (IEEE)
            return tl.sqrt(x)

# the kernel's KIND per format (the other constants come from the format objects: nmax, nstep, rmin, sub_bits ...)
Q2, Q3, Q4, Q5, Q6 = 0, 1, 2, 3, 4
_KIND = {"q2_k": Q2, "q3_k": Q3, "q4_k": Q4, "q5_k": Q5, "q6_k": Q6}
LANES = 64  # sub-blocks per program on a GPU (BLOCK_SB = LANES // N_SUB super-blocks)
NUM_WARPS = 2


def supported(fmt) -> bool:
    return getattr(fmt, "name", None) in _KIND


def usable(w: Tensor, fmt) -> bool:
    """May ``KQuantFormat.fake`` use the kernel for ``w``? CUDA tensors, Triton importable, not turned off
    by ``QAT_DISABLE_TRITON``, rows a multiple of 256 wide, eager (under torch.compile the torch path is
    traced, as before)."""
    return (HAS_TRITON and w.is_cuda and supported(fmt) and not os.environ.get("QAT_DISABLE_TRITON")
            and not torch.compiler.is_compiling()
            and w.dim() >= 1 and w.shape[-1] % QK_K == 0 and w.numel() > 0)


if HAS_TRITON:

    @triton.jit
    def _nearest_int(f):
        """C's nearest_int: add 1.5*2^23 in fp32 (never contracted with the product before it), read the bits."""
        return (_add(f, 12582912.0).to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000

    @triton.jit
    def _neg(x):
        """Exact fp32 negation (``0 - x`` would turn -(+0) into +0)."""
        return (x.to(tl.int32, bitcast=True) ^ -2147483648).to(tl.float32, bitcast=True)

    @triton.jit
    def _ld(XP, i, stride, valid):
        """Element ``i`` of every lane's sub-block: ``XP`` points at the lanes' element 0 in the element-major
        copy (``stride`` elements apart), so a warp's load is one contiguous run."""
        return tl.load(XP + i * stride, mask=valid, other=0.0).to(tl.float32)

    @triton.jit
    def _weight(xi, av_x, WKIND: tl.constexpr):
        if WKIND == 0:
            w = tl.abs(xi)
        else:
            w = _add(av_x, tl.abs(xi))
        return w

    @triton.jit
    def _asym_codes(xi, iscale, mn, NMAX: tl.constexpr):
        """``MAX(0, MIN(nmax, nearest_int(iscale*(x - min))))``: torch's ``_codes_into`` order (sub, then mul)."""
        return tl.minimum(tl.maximum(_nearest_int(_mul(_sub(xi, mn), iscale)), 0), NMAX)

    @triton.jit
    def _qkx2_error(XP, stride, valid, av_x, iscale, mn_used, sc, m, NMAX: tl.constexpr, SUB: tl.constexpr,
                    WKIND: tl.constexpr, USE_MAD: tl.constexpr):
        """``sum_i w_i * |sc*L_i + m - x_i|`` (or squared), L from (iscale, mn_used), summed from 0 in order."""
        err = tl.zeros_like(iscale)
        for i in range(SUB):
            xi = _ld(XP, i, stride, valid)
            wi = _weight(xi, av_x, WKIND)
            l = _asym_codes(xi, iscale, mn_used, NMAX).to(tl.float32)
            e = _sub(_add(_mul(l, sc), m), xi)
            if USE_MAD:
                e = tl.abs(e)
            else:
                e = _mul(e, e)
            err = _add(err, _mul(e, wi))
        return err

    @triton.jit
    def _qkx2_search(XP, stride, valid, CS, NMAX: tl.constexpr, NSTEP: tl.constexpr, SUB: tl.constexpr,
                     WKIND: tl.constexpr, USE_MAD: tl.constexpr):
        """``_qkx2_cols`` per lane: (scale, the_min, best_iscale, best_mn, flat); the search's codes are
        ``_asym_codes(x, best_iscale, best_mn)`` (0 where flat)."""
        zero = tl.zeros(valid.shape, dtype=tl.float32)
        av_x = zero
        if WKIND == 1:  # Q4_K/Q5_K: av_x = sqrtf(sum x^2 / 32)
            s2 = zero
            for i in range(SUB):
                xi = _ld(XP, i, stride, valid)
                s2 = _add(s2, _mul(xi, xi))
            av_x = _sqrt(_div(s2, 32.0))
        # min, max, sum_w and sum_x start from element 0 (not 0 + element 0)
        x0 = _ld(XP, 0, stride, valid)
        w0 = _weight(x0, av_x, WKIND)
        x_lo = x0
        x_hi = x0
        sum_w = w0
        sum_x = _mul(w0, x0)
        for i in range(1, SUB):
            xi = _ld(XP, i, stride, valid)
            wi = _weight(xi, av_x, WKIND)
            x_lo = tl.minimum(x_lo, xi)
            x_hi = tl.maximum(x_hi, xi)
            sum_w = _add(sum_w, wi)
            sum_x = _add(sum_x, _mul(wi, xi))
        mx = x_hi
        mn = tl.where(x_lo > 0, 0.0, x_lo)
        flat = mx == mn  # C returns before the search
        search = mx != mn
        flat_fix = tl.where(flat, 1.0, 0.0)  # a finite iscale for flat lanes (results thrown away)
        denom = _add(_sub(mx, mn), flat_fix)
        best_iscale = _div(NMAX * 1.0, denom)
        best_mn = mn
        scale = _div(1.0, best_iscale)
        best_error = _qkx2_error(XP, stride, valid, av_x, best_iscale, mn, scale, mn, NMAX, SUB, WKIND, USE_MAD)
        for step in range(NSTEP + 1):
            iscale = _div(tl.load(CS + step), denom)
            sum_l = zero
            sum_l2 = zero
            sum_xl = zero
            for i in range(SUB):
                xi = _ld(XP, i, stride, valid)
                wi = _weight(xi, av_x, WKIND)
                l = _asym_codes(xi, iscale, mn, NMAX).to(tl.float32)
                wl = _mul(wi, l)
                sum_l = _add(sum_l, wl)
                sum_l2 = _add(sum_l2, _mul(wl, l))
                sum_xl = _add(sum_xl, _mul(wl, xi))
            D = _sub(_mul(sum_w, sum_l2), _mul(sum_l, sum_l))
            this_scale = _div(_sub(_mul(sum_w, sum_xl), _mul(sum_x, sum_l)), D)
            this_min = _div(_sub(_mul(sum_x, sum_l2), _mul(sum_l, sum_xl)), D)
            clip = this_min > 0
            this_min = tl.where(clip, 0.0, this_min)
            this_scale = tl.where(clip, _div(sum_xl, sum_l2), this_scale)
            cur_error = _qkx2_error(XP, stride, valid, av_x, iscale, mn, this_scale, this_min, NMAX, SUB, WKIND,
                                    USE_MAD)
            better = (D > 0) & (cur_error < best_error) & search
            best_error = tl.where(better, cur_error, best_error)
            best_iscale = tl.where(better, iscale, best_iscale)
            best_mn = tl.where(better, mn, best_mn)
            scale = tl.where(better, this_scale, scale)
            mn = tl.where(better, this_min, mn)
            denom = _add(_sub(mx, mn), flat_fix)
        return tl.where(flat, 0.0, scale), _neg(mn), best_iscale, best_mn, flat

    @triton.jit
    def _first_absmax(XP, stride, valid, SUB: tl.constexpr):
        """``if (fabsf(x) > amax) { amax = fabsf(x); max = x; }`` from 0 over the lane's elements."""
        amax = tl.zeros(valid.shape, dtype=tl.float32)
        mx = amax
        for i in range(SUB):
            xi = _ld(XP, i, stride, valid)
            a = tl.abs(xi)
            gt = a > amax
            amax = tl.where(gt, a, amax)
            mx = tl.where(gt, xi, mx)
        return amax, mx

    @triton.jit
    def _qx_sums(XP, stride, valid, iscale, NMAX: tl.constexpr, SUB: tl.constexpr):
        sumlx = tl.zeros(valid.shape, dtype=tl.float32)
        suml2 = sumlx
        for i in range(SUB):
            xi = _ld(XP, i, stride, valid)
            w = _mul(xi, xi)
            l = tl.minimum(tl.maximum(_nearest_int(_mul(xi, iscale)), -NMAX), NMAX - 1).to(tl.float32)
            sumlx = _add(sumlx, _mul(_mul(w, xi), l))
            suml2 = _add(suml2, _mul(_mul(w, l), l))
        return sumlx, suml2

    @triton.jit
    def _qx_search(XP, stride, valid, CS, EPS: tl.constexpr, SUB: tl.constexpr):
        """``_qx_rmse1_cols`` (nmax 32) per lane: (scale, best_iscale, zero_group)."""
        amax, mx = _first_absmax(XP, stride, valid, SUB)
        zero_group = amax < EPS
        mx = tl.where(zero_group, 1.0, mx)  # C returns early for these: any finite iscale will do
        best_iscale = _div(tl.load(CS), mx)
        sumlx, suml2 = _qx_sums(XP, stride, valid, best_iscale, 32, SUB)
        scale = tl.where(suml2 == 0.0, 0.0, _div(sumlx, suml2))
        best = _mul(scale, sumlx)
        for k in range(1, 19):
            iscale = _div(tl.load(CS + k), mx)
            sumlx, suml2 = _qx_sums(XP, stride, valid, iscale, 32, SUB)
            better = (suml2 > 0) & (_mul(sumlx, sumlx) > _mul(best, suml2))
            this_scale = _div(sumlx, suml2)
            this_best = _mul(this_scale, sumlx)
            best_iscale = tl.where(better, iscale, best_iscale)
            scale = tl.where(better, this_scale, scale)
            best = tl.where(better, this_best, best)
        return tl.where(zero_group, 0.0, scale), best_iscale, zero_group

    @triton.jit
    def _q3_search(XP, stride, valid, EPS: tl.constexpr, SUB: tl.constexpr):
        """``_make_q3_quants_rmse`` (nmax 4) per lane: (scale, codes + 4 packed 3 bits each into an int64).
        A pass that changes no lane of the program ends the descent (C breaks per block; a lane whose pass
        changed nothing is at a fixed point, so further passes would change nothing for it)."""
        amax, mx = _first_absmax(XP, stride, valid, SUB)
        iscale = _div(-4.0, mx)
        sumlx = tl.zeros(valid.shape, dtype=tl.float32)
        suml2 = sumlx
        packed = tl.zeros(valid.shape, dtype=tl.int64)
        for i in range(SUB):
            xi = _ld(XP, i, stride, valid)
            w = _mul(xi, xi)
            l = tl.minimum(tl.maximum(_nearest_int(_mul(iscale, xi)), -4), 3)
            lf = l.to(tl.float32)
            sumlx = _add(sumlx, _mul(_mul(w, xi), lf))
            suml2 = _add(suml2, _mul(_mul(w, lf), lf))
            packed = packed | ((l + 4).to(tl.int64) << (3 * i))
        n_pass = 0
        changed = 1
        while (n_pass < 5) & (changed != 0):
            took = tl.zeros(valid.shape, dtype=tl.int32)
            for i in range(SUB):
                xi = _ld(XP, i, stride, valid)
                w = _mul(xi, xi)
                wx = _mul(w, xi)
                li = ((packed >> (3 * i)) & 7).to(tl.int32) - 4
                lf = li.to(tl.float32)
                slx = _sub(sumlx, _mul(wx, lf))
                sl2 = _sub(suml2, _mul(_mul(w, lf), lf))
                new_l = tl.minimum(tl.maximum(_nearest_int(_div(_mul(xi, sl2), slx)), -4), 3)
                nf = new_l.to(tl.float32)
                tried = (slx > 0) & (new_l != li)
                slx = _add(slx, _mul(wx, nf))
                sl2 = _add(sl2, _mul(_mul(w, nf), nf))
                take = tried & (sl2 > 0) & (_mul(_mul(slx, slx), suml2) > _mul(_mul(sumlx, sumlx), sl2))
                flip = ((li + 4) ^ (new_l + 4)).to(tl.int64) << (3 * i)  # field: li + 4 -> new_l + 4
                packed = tl.where(take, packed ^ flip, packed)
                sumlx = tl.where(take, slx, sumlx)
                suml2 = tl.where(take, sl2, suml2)
                took = took | take.to(tl.int32)
            changed = tl.max(tl.max(took, axis=1), axis=0)
            n_pass += 1
        scale = tl.where(suml2 > 0, _div(sumlx, suml2), 0.0)
        zero_group = amax < EPS
        return tl.where(zero_group, 0.0, scale), tl.where(zero_group, 0, packed)

    @triton.jit
    def _running_max(s):
        """``float m = 0; if (s > m) m = s;`` over the sub-block axis: +0 or the largest positive value. Taken
        on the bit patterns (monotone for positive floats): ``max(where(s > 0, s, 0))`` in fp32 is compiled
        to PTX ``max.f32(s, 0)``, whose result for s = -0 we do not want to depend on."""
        bits = tl.where(s > 0, s.to(tl.int32, bitcast=True), 0)
        return tl.max(bits, axis=1).to(tl.float32, bitcast=True)

    @triton.jit
    def _first_absmax_cols(s, jj, N_SUB: tl.constexpr):
        """``_first_absmax`` over the sub-block axis of the tile (first index on ties, +0 when all 0)."""
        a = tl.abs(s)
        amax = tl.max(a, axis=1)
        first = tl.min(tl.where(a == amax[:, None], jj, N_SUB), axis=1)
        bits = tl.sum(tl.where(jj == first[:, None], s.to(tl.int32, bitcast=True), 0), axis=1)  # exact pick
        mx = tl.where(amax == 0.0, 0.0, bits.to(tl.float32, bitcast=True))
        return amax, mx

    @triton.jit(do_not_specialize=["n_sb"])
    def _kquant_kernel(XT, OUT, Q, D, DMIN, SC, MN, CS, n_sb, KIND: tl.constexpr, SUB: tl.constexpr,
                       N_SUB: tl.constexpr, BLOCK_SB: tl.constexpr, NMAX: tl.constexpr, NSTEP: tl.constexpr,
                       SMAX: tl.constexpr, WKIND: tl.constexpr, USE_MAD: tl.constexpr, EPS: tl.constexpr,
                       STORE_Q: tl.constexpr):
        sb = tl.program_id(0) * BLOCK_SB + tl.arange(0, BLOCK_SB)[:, None]  # [BLOCK_SB, 1]
        jj = tl.arange(0, N_SUB)[None, :]  # [1, N_SUB]
        valid = (sb < n_sb) & (jj < N_SUB)  # [BLOCK_SB, N_SUB]: one lane per sub-block
        base = sb.to(tl.int64) * 256 + jj * SUB  # element 0 of the lane's sub-block in w / OUT / Q
        stride = n_sb.to(tl.int64) * N_SUB  # XT: element i of sub-block s at i*stride + s
        XP = XT + (sb.to(tl.int64) * N_SUB + jj)
        sb1 = tl.program_id(0) * BLOCK_SB + tl.arange(0, BLOCK_SB)
        valid1 = sb1 < n_sb
        if KIND == 0 or KIND == 2 or KIND == 3:
            # -- Q2_K / Q4_K / Q5_K: make_qkx2_quants, then 4-bit (Q2_K) or 6-bit scales and mins
            scales, mins, best_iscale, best_mn, flat = _qkx2_search(XP, stride, valid, CS, NMAX, NSTEP, SUB, WKIND,
                                                                    USE_MAD)
            max_scale = _running_max(scales)
            max_min = _running_max(mins)
            ls = _nearest_int(_mul(_div(SMAX, max_scale)[:, None], scales))
            lm = _nearest_int(_mul(_div(SMAX, max_min)[:, None], mins))
            ls = tl.where(max_scale[:, None] > 0, ls, 0)
            lm = tl.where(max_min[:, None] > 0, lm, 0)
            if KIND == 0:  # y.scales[j] = ls; y.scales[j] |= (lm << 4): one uint8 holds both
                byte = (ls & 0xFF) | ((lm << 4) & 0xFF)
                ls = byte & 0xF
                lm = byte >> 4
            else:  # uint8_t ls = nearest_int(...); ls = MIN(63, ls);
                ls = tl.minimum(ls & 0xFF, 63)
                lm = tl.minimum(lm & 0xFF, 63)
            d = _div(max_scale, SMAX)
            dmin = _div(max_min, SMAX)
            dq = _mul(d.to(tl.float16).to(tl.float32)[:, None], ls.to(tl.float32))  # = dequant's dl
            dm = _mul(dmin.to(tl.float16).to(tl.float32)[:, None], lm.to(tl.float32))  # = dequant's ml
            for i in range(SUB):
                xi = _ld(XP, i, stride, valid)
                l = tl.minimum(tl.maximum(_nearest_int(_div(_add(xi, dm), dq)), 0), NMAX)
                l_search = tl.where(flat, 0, _asym_codes(xi, best_iscale, best_mn, NMAX))
                L = tl.where(dq == 0.0, l_search, l)
                tl.store(OUT + base + i, _sub(_mul(dq, L.to(tl.float32)), dm), mask=valid)
                if STORE_Q:
                    tl.store(Q + base + i, L.to(tl.uint8), mask=valid)
            if STORE_Q:
                tl.store(DMIN + sb1, dmin, mask=valid1)
                tl.store(MN + sb * N_SUB + jj, lm.to(tl.int16), mask=valid)
        elif KIND == 1:
            # -- Q3_K: make_q3_quants, then 6-bit signed scales from the first absmax
            scales, packed = _q3_search(XP, stride, valid, EPS, SUB)
            _, max_scale = _first_absmax_cols(scales, jj, N_SUB)
            nonzero = max_scale != 0.0
            iscale = _div(-32.0, max_scale)
            l = _nearest_int(_mul(iscale[:, None], scales))
            l = tl.minimum(tl.maximum(((l + 128) & 0xFF) - 128, -32), 31) + 32  # int8 store, clamp
            ls = tl.where(nonzero[:, None], l, 0) - 32
            d = tl.where(nonzero, _div(1.0, iscale), 0.0)
            dq = _mul(d.to(tl.float16).to(tl.float32)[:, None], ls.to(tl.float32))
            for i in range(SUB):
                xi = _ld(XP, i, stride, valid)
                l = tl.minimum(tl.maximum(_nearest_int(_div(xi, dq)), -4), 3) + 4
                l_search = ((packed >> (3 * i)) & 7).to(tl.int32)
                L = tl.where(dq == 0.0, l_search, l)
                tl.store(OUT + base + i, _mul(dq, (L - 4).to(tl.float32)), mask=valid)
                if STORE_Q:
                    tl.store(Q + base + i, L.to(tl.uint8), mask=valid)
        else:
            # -- Q6_K: make_qx_quants (rmse_type 1), then int8 scales from the first absmax
            scales, best_iscale, zero_group = _qx_search(XP, stride, valid, CS, EPS, SUB)
            max_abs, max_scale = _first_absmax_cols(scales, jj, N_SUB)
            zero_block = max_abs < EPS  # C memsets the whole block
            iscale = _div(-128.0, max_scale)
            l = tl.minimum(_nearest_int(_mul(iscale[:, None], scales)), 127)
            ls = tl.where(zero_block[:, None], 0, ((l + 128) & 0xFF) - 128)  # int8 store
            d = tl.where(zero_block, 0.0, _div(1.0, iscale))
            dq = _mul(d.to(tl.float16).to(tl.float32)[:, None], ls.to(tl.float32))
            for i in range(SUB):
                xi = _ld(XP, i, stride, valid)
                l = tl.minimum(tl.maximum(_nearest_int(_div(xi, dq)), -32), 31) + 32
                l_search = tl.minimum(tl.maximum(_nearest_int(_mul(xi, best_iscale)), -32), 31) + 32
                l_search = tl.where(zero_group, 0, l_search)
                L = tl.where(dq == 0.0, l_search, l)
                L = tl.where(zero_block[:, None], 0, L)
                tl.store(OUT + base + i, _mul(dq, (L - 32).to(tl.float32)), mask=valid)
                if STORE_Q:
                    tl.store(Q + base + i, L.to(tl.uint8), mask=valid)
        if STORE_Q:
            tl.store(D + sb1, d, mask=valid1)
            tl.store(SC + sb * N_SUB + jj, ls.to(tl.int16), mask=valid)


@functools.lru_cache(maxsize=None)
def _candidates(name: str, device: torch.device) -> Tensor:
    """The candidate numerators of the format's search (fp32, on ``device``), as kquants.py makes them."""
    from ..formats import kquants

    fmt = kquants.KQUANT_FORMATS[name]
    if _KIND[name] == Q6:
        cs = kquants._qx_candidates(32)
    elif _KIND[name] == Q3:
        cs = [0.0]  # unused
    else:
        cs = kquants._qkx2_candidates(fmt.nmax, fmt.rmin, fmt.rdelta, fmt.nstep)
    return torch.tensor(cs, dtype=torch.float32, device=device)


def _run(w: Tensor, fmt, store_q: bool):
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if not supported(fmt):
        raise ValueError(f"not a k-quant: {fmt!r}")
    if w.dim() == 0 or w.shape[-1] % QK_K:
        raise ValueError(f"k-quant rows must be a multiple of {QK_K} wide, got shape {tuple(w.shape)}")
    x = w.detach()
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()
    kind, sub = _KIND[fmt.name], fmt.sub
    # element-major copy (sub, n_sb * n_sub), as _quantize_torch's layout: the kernel's lanes are sub-blocks
    # reading their elements one step at a time, and a warp's loads then hit one contiguous run (in w's
    # layout they would be 64-128 bytes apart). One small copy kernel; the search re-reads x ~1400 times.
    xt = x.reshape(-1, sub).t().contiguous()
    n_sub = QK_K // sub
    n_sb = x.numel() // QK_K
    dev = x.device
    out = torch.empty(w.shape, dtype=torch.float32, device=dev)
    if store_q:
        q = torch.empty(w.shape, dtype=torch.uint8, device=dev)
        d = torch.empty(n_sb, dtype=torch.float32, device=dev)
        dmin = torch.empty(n_sb, dtype=torch.float32, device=dev)
        sc = torch.empty((n_sb, n_sub), dtype=torch.int16, device=dev)
        mn = torch.empty((n_sb, n_sub), dtype=torch.int16, device=dev)
    else:
        q = d = dmin = sc = mn = out  # never written (STORE_Q is off)
    if n_sb:
        if INTERPRET:  # the interpreter runs programs one after another: few, wide ones
            block_sb = min(triton.next_power_of_2(n_sb), 64)
        else:
            block_sb = max(1, LANES // n_sub)
        asym = kind in (Q2, Q4, Q5)
        grid = (triton.cdiv(n_sb, block_sb),)
        _kquant_kernel[grid](
            xt, out, q, d, dmin, sc, mn, _candidates(fmt.name, dev), n_sb,
            KIND=kind, SUB=sub, N_SUB=n_sub, BLOCK_SB=block_sb,
            NMAX=fmt.nmax if asym else 0, NSTEP=fmt.nstep if asym else 0,
            SMAX=float((1 << fmt.sub_bits) - 1) if asym else 0.0,
            WKIND=int(kind in (Q4, Q5)), USE_MAD=bool(asym and fmt.use_mad), EPS=_eps(),
            STORE_Q=store_q, num_warps=NUM_WARPS,
            # bitwise C: no FMA contraction anywhere, no denormal flushing in libdevice's *_rn functions
            enable_fp_fusion=False, enable_reflect_ftz=False)
    if not store_q:
        return out, None
    return out, (d, dmin if kind in (Q2, Q4, Q5) else None, sc, mn if kind in (Q2, Q4, Q5) else None, q)


@functools.lru_cache(maxsize=None)
def _eps() -> float:
    from ..formats.kquants import _GROUP_MAX_EPS

    return _GROUP_MAX_EPS


def kquant_fake(w: Tensor, fmt) -> Tensor:
    """``fmt.dequantize(fmt._quantize_torch(w))`` bit for bit (fp32, ``w``'s shape and device), in one
    kernel launch. ``w``: CUDA, or CPU under ``TRITON_INTERPRET=1``; rows a multiple of 256 wide."""
    return _run(w, fmt, False)[0]


def kquant_quantize(w: Tensor, fmt):
    """``(w_hat, q)``: ``kquant_fake(w, fmt)`` and the ``QTensor`` of ``fmt._quantize_torch(w)`` (codes,
    fp16 ``d``/``dmin``, sub-block scales and mins), from the same launch."""
    from ..formats.base import QTensor

    out, (d, dmin, sc, mn, codes) = _run(w, fmt, True)
    shape = tuple(w.shape)
    lead = shape[:-1] + (shape[-1] // QK_K,)
    n_sub = QK_K // fmt.sub
    extra = {"sub_scales": sc.reshape(*lead, n_sub)}
    if mn is not None:
        extra["sub_mins"] = mn.reshape(*lead, n_sub)
    q = QTensor(format=fmt.name, shape=shape, codes=codes.reshape(shape).to(torch.int16),
                scale=d.reshape(lead).to(torch.float16),
                zero=None if dmin is None else dmin.reshape(lead).to(torch.float16), extra=extra)
    return out, q
