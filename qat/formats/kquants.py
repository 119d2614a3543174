"""GGUF's k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 weights split into sub-blocks of
16 or 32, each sub-block with its own small integer scale (and min) under one fp16 super-block scale.

The encoder follows llama.cpp's reference quantizers without an importance matrix
(``quantize_row_q{2..6}_K_ref`` in ggml-quants.c, with ``make_qkx2_quants``, ``make_q3_quants``,
``make_qx_quants`` and ``nearest_int``) operation for operation in fp32, so the bytes we write are the
bytes ``llama-quantize`` writes and our fake-quantized weight is bitwise what llama.cpp reconstructs.
It runs over all sub-blocks of a tensor at once (in column chunks that stay in cache); the Python loops
are over the fixed candidate grids of the searches (and, off CPU, over the 16/32 elements of a
sub-block where C accumulates sequentially).

Bitwise equality with C rests on a few rules kept throughout:

* every fp32 sum that C accumulates in a loop is accumulated in the same order (``_seqsum``,
  ``_seqsum_into``), never with ``torch.sum`` (pairwise);
* every C expression keeps its evaluation order, ``w*x*l`` is ``(w*x)*l``;
* divisions go through ``_div`` with tensor operands: ``63.0 / t`` in torch is ``t.reciprocal() * 63``,
  and CUDA divides by a CPU scalar by multiplying with its reciprocal; both round differently;
* ``sqrtf`` is an fp64 sqrt rounded to fp32 (``torch.sqrt`` on CPU can be an ulp off, see ``_sqrtf``);
* ``nearest_int`` is C's ``12582912.f`` bit trick, bit for bit (round half to even in range; the
  searches use ``round_`` only where a check proves it in range, see ``_codes_into``);
* selections go through int32 masks and bitwise selects (``_mask``, ``_sel``), bit for bit
  ``torch.where`` (which runs element by element on CPU);
* integer stores wrap like C's ``uint8_t`` / ``int8_t`` assignments.

Unpacked storage (``QTensor``): ``codes`` are the stored unsigned codes (Q3_K 0..7 means ``code - 4``,
Q6_K 0..63 means ``code - 32``); ``scale`` is the fp16 super-block ``d``; ``zero`` is the fp16 ``dmin``
(Q2_K, Q4_K, Q5_K); ``extra["sub_scales"]`` / ``extra["sub_mins"]`` hold the per-sub-block integers as
dequantization uses them (Q3_K and Q6_K scales signed), shape ``(*lead, n_superblocks, n_sub)``.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import llama_encoder
from .base import Format, QTensor, check_finite

__all__ = ["KQuantFormat", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "KQUANT_FORMATS", "nearest_int"]

QK_K = 256
_GROUP_MAX_EPS = float(np.float32(1e-15))


# ------------------------------------------------------------------------------------------------
# fp32 helpers that reproduce C semantics
# ------------------------------------------------------------------------------------------------
def _f32(v: float) -> float:
    """A Python float holding exactly the fp32 value ``v`` rounds to."""
    return float(np.float32(v))


def nearest_int(f: Tensor) -> Tensor:
    """llama.cpp's ``nearest_int``: add 1.5*2^23 in fp32 and read the low mantissa bits (int32).

    Round half to even for ``|f| <= 4194303``; outside that range it returns the same garbage C does."""
    v = f + 12582912.0
    return v.view(torch.int32).bitwise_and_(0x007FFFFF).sub_(0x00400000)


def _nearest_int_(f: Tensor) -> Tensor:
    """``nearest_int`` computed in ``f``'s own memory (an fp32 scratch buffer): returns an int32 view of it."""
    return f.add_(12582912.0).view(torch.int32).bitwise_and_(0x007FFFFF).sub_(0x00400000)


def _div(a, b) -> Tensor:
    """IEEE fp32 ``a / b`` with both operands as tensors (see the module docstring for why)."""
    if not isinstance(a, Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def _seqsum(t: Tensor) -> Tensor:
    """``float s = 0; for (i...) s += t[i];`` over dim 0, in that order (see ``_seqsum_into``)."""
    return _seqsum_into(t.new_empty((1,) + t.shape[1:]), t)


def _running_max(v: Tensor) -> Tensor:
    """``float m = 0; if (v > m) m = v;`` over the last dim (never -0, never negative, skips NaN)."""
    return torch.where(v > 0, v, torch.zeros_like(v)).amax(-1)


def _mask(fn, a: Tensor, b) -> Tensor:
    """``fn(a, b)`` (``torch.gt``, ``torch.lt`` ...) as an int32 mask: -1 where true, 0 where false.
    On CPU, comparisons into int32 and bitwise selects (``_sel``) are vectorized; bool results and
    ``torch.where`` run element by element, 5-20x slower."""
    shape = torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, Tensor) else a.shape
    return fn(a, b, out=torch.empty(shape, dtype=torch.int32, device=a.device)).neg_()


def _sel(m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``torch.where(m, a, b)`` bit for bit, for an int32 mask from ``_mask`` and fp32 or int32 a, b."""
    ai, bi = a.view(torch.int32), b.view(torch.int32)
    return ((ai ^ bi).bitwise_and_(m).bitwise_xor_(bi)).view(b.dtype)


def _zero_where(m: Tensor, b: Tensor) -> Tensor:
    """``torch.where(m, 0, b)`` (+0.0 for fp32) for an int32 mask from ``_mask``."""
    return (b.view(torch.int32) & ~m).view(b.dtype)


def _first_absmax(v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``if (fabsf(v) > amax) { amax = fabsf(v); max = v; }`` from amax = max = 0: (amax, signed max).

    First index among equal maxima (C's strict ``>``), NaN never wins, max stays +0 when every value
    is 0. With finite values that is amax and the first index holding it; NaN or inf anywhere take the
    C loop itself, one slice of ``dim`` at a time (16 steps of small operations: 5 ms a Q6_K tensor)."""
    a = v.abs()
    amax = a.amax(dim, keepdim=True)  # NaN propagates: caught with inf here
    # CPU only: the finiteness check is a host sync, which a GPU training step should not wait on
    if v.device.type == "cpu" and bool(torch.isfinite(amax).all()):
        n = v.shape[dim]
        # the first hit carries the largest weight n - i (argmax along a strided dim is 100x slower)
        weight = torch.arange(n, 0, -1, dtype=torch.int32, device=v.device)
        weight = weight.reshape((n,) + (1,) * (v.dim() - 1 - dim % v.dim()))
        hit = torch.eq(a, amax, out=torch.empty(a.shape, dtype=torch.int32, device=a.device)).mul_(weight)
        first = torch.sub(n, hit.amax(dim, keepdim=True)).long()
        amax, mx = amax.squeeze(dim), v.gather(dim, first).squeeze(dim)
        return amax, _zero_where(_mask(torch.eq, amax, 0.0), mx)
    v = v.movedim(dim, 0)
    amax, mx = torch.zeros_like(v[0]), torch.zeros_like(v[0])
    for vi in v:
        a = vi.abs()
        m = _mask(torch.gt, a, amax)
        amax, mx = _sel(m, a, amax), _sel(m, vi, mx)
    return amax, mx


def _as_uint8(i: Tensor) -> Tensor:
    """C's store into ``uint8_t``. In range it changes nothing; it keeps us equal to C on the garbage
    ``nearest_int`` returns when overflowing input (|w| ~ 1e19 and up) pushes values out of range."""
    return i & 0xFF


def _as_int8(i: Tensor) -> Tensor:
    """C's store into ``int8_t`` (see ``_as_uint8``)."""
    return ((i + 128) & 0xFF) - 128


def _sqrtf(t: Tensor) -> Tensor:
    """Correctly rounded fp32 sqrt, as C's ``sqrtf``. torch.sqrt on CPU may go through MKL's vector
    math, which is off by an ulp at times; an fp64 sqrt rounded to fp32 is exact (53 >= 2*24 + 2 bits)."""
    return torch.sqrt(t.double()).float()


def _fp16(t: Tensor) -> Tensor:
    """GGML_FP32_TO_FP16 then back: the value the file stores, in fp32."""
    return t.to(torch.float16).float()


# ------------------------------------------------------------------------------------------------
# the searches of ggml-quants.c. Inputs are element-major: x has shape (n, *batch), one column per
# sub-block, so the sequential sums run over dim 0.
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _zeros_index(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


def _seqsum_into(out: Tensor, t: Tensor) -> Tensor:
    """``_seqsum(t)`` written into ``out`` (shape ``(1, *t.shape[1:])``); returns ``out[0]``."""
    out.zero_()  # C's s = 0: 0 + t[0] turns -0.0 into +0.0
    return _seqsum_add_(out, t)


def _seqsum_add_(out: Tensor, t: Tensor) -> Tensor:
    """``for (i...) s += t[i];`` from ``s = out[0]``, in that order, in place; returns ``out[0]``.

    On CPU, ``index_add_`` with every index 0 is that loop in C++, in index order and in fp32
    (``tests/test_kquants.py`` checks it against the Python loop): one call instead of one per row.
    Elsewhere (CUDA's index_add_ accumulates with atomics, in no fixed order) the loop runs in Python."""
    if t.device.type == "cpu":
        return out.index_add_(0, _zeros_index(t.shape[0]), t)[0]
    for r in t.unbind(0):
        out[0].add_(r)
    return out[0]


def _sel_(m: Tensor, new: Tensor, state: Tensor) -> Tensor:
    """In place ``state = torch.where(m, new, state)`` bit for bit, for an int32 mask from ``_mask``
    broadcasting against fp32 ``new``/``state``."""
    si = state.view(torch.int32)
    si ^= (new.view(torch.int32) ^ si).bitwise_and_(m)
    return state


def _codes_into(out: Tensor, x: Tensor, iscale: Tensor, mn: Optional[Tensor], lo: int, hi: int,
                ends: Optional[Tensor], in_range: bool = False) -> Tensor:
    """``out = MAX(lo, MIN(hi, nearest_int(iscale*(x - mn))))`` (``iscale*x`` when ``mn`` is None) in
    fp32, for x of shape (n, B) with per-column ``iscale``/``mn``; ``ends`` (2, B) holds each column's
    min and max.

    ``nearest_int(f)`` is plain round-half-even (``round_``) iff ``f + 1.5*2^23`` rounds into
    [2^23, 2^24), where the fp32 ulp is 1: certainly when ``|f| <= 4194303``. Outside, it returns garbage
    we must reproduce with the bit trick itself. ``fl(iscale*fl(x - mn))`` is monotone in x, so the
    column's extremes bound ``|f|`` for all its elements: one small check per call on CPU (real weights
    always pass it; NaN or inf fail it); other devices take the bit trick without a host sync.
    ``in_range``: the caller has proved the bound for every element (no check)."""
    if mn is None:
        torch.mul(x, iscale, out=out)
    else:
        torch.sub(x, mn, out=out)
        out.mul_(iscale)
    exact = in_range
    if out.device.type == "cpu" and not in_range:
        bound = (ends * iscale) if mn is None else (ends - mn).mul_(iscale)
        exact = float(bound.abs_().max()) <= 4194303.0
    if exact:
        out.round_()
    else:
        out.copy_(nearest_int(out))  # |values| < 2^24: exact in fp32
    return out.clamp_(lo, hi)


# The searches run over column chunks of about this many elements: every candidate makes a dozen passes
# over its buffers, which then stay in cache; smaller chunks cost more in per-operation overhead.
_CHUNK_ELEMS = 1 << 19


def _by_columns(fn, x: Tensor, *more: Tensor) -> tuple[Tensor, ...]:
    """Run a search ``fn(x, *more)`` on (n, B) views in column chunks: every column is independent.
    Results: per-column tensors (B,) and, last, the codes (n, B); reshaped back to x's batch shape."""
    batch, n = x.shape[1:], x.shape[0]
    x, more = x.reshape(n, -1), [m.reshape(n, -1) for m in more]
    step = max(1, _CHUNK_ELEMS // n)
    if x.shape[1] <= step:
        outs = fn(x, *more)
    else:
        parts = [fn(*(t[:, i:i + step] for t in (x, *more))) for i in range(0, x.shape[1], step)]
        outs = [torch.cat(r, dim=-1) for r in zip(*parts)]
    return tuple(o.reshape(batch) for o in outs[:-1]) + (outs[-1].reshape((n,) + batch),)


def _qkx2_candidates(nmax: int, rmin: float, rdelta: float, nstep: int) -> list[float]:
    """make_qkx2_quants' candidate numerators ``rmin + rdelta*is + nmax`` (fp32, C's order), ``is = 0..nstep``
    (each divided by ``max - min``); shared with the Triton kernel (kernels/triton_kquant.py)."""
    return [_f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax) for step in range(nstep + 1)]


def _qx_candidates(nmax: int) -> list[float]:
    """make_qx_quants' iscale numerators: ``-nmax``, then ``-(nmax + 0.1f*is)`` for ``is = -9..9`` but 0 (fp32;
    each divided by the signed absmax); shared with the Triton kernel."""
    return [float(-nmax)] + [-_f32(nmax + _f32(_f32(0.1) * step)) for step in range(-9, 10) if step]


def _make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric sub-block search: returns (scale, the_min, L) with ``x ~ scale*L - the_min``.

    Each candidate's codes are computed in place in one fp32 buffer; the winner's codes are not kept
    but recomputed once at the end from its ``iscale`` and ``min`` (the same expression, the same codes)."""
    return _by_columns(lambda x, w: _qkx2_cols(x, w, nmax, rmin, rdelta, nstep, use_mad), x, w)


def _qkx2_cols(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    n, B = x.shape
    f32, dev = x.dtype, x.device
    x_lo, x_hi = x.amin(0), x.amax(0)
    # sum_w and sum_x start from element 0, as in C (not from 0 + element 0: a -0.0 stays -0.0)
    sw = torch.stack([w, w * x], dim=1)
    sum_w, sum_x = _seqsum_add_(sw[0].unsqueeze(0).clone(), sw[1:]).unbind(0)
    del sw
    mx = x_hi
    mn0 = _zero_where(_mask(torch.gt, x_lo, 0.0), x_lo)
    flat = _mask(torch.eq, mx, mn0)  # C returns before the search
    search = torch.eq(mx, mn0, out=torch.empty(B, dtype=torch.int32, device=dev)).bitwise_xor_(1)  # 1 = search
    flat_fix = (flat & 1).to(f32)  # 1.0 added to flat columns' max - min: a finite iscale (results thrown away)
    ends = torch.stack([x_lo, x_hi])

    # the search state, one row each: best error, iscale and min its codes were made with, its scale,
    # and the current min (C updates min in place: later candidates see it). A candidate has the same
    # rows (error, iscale, min used, scale, min) and is written over the state where better.
    state = torch.empty((5, B), dtype=f32, device=dev)
    best_error, best_iscale, best_mn, scale, mn = state.unbind(0)
    cand = torch.empty((5, B), dtype=f32, device=dev)
    cur_error, iscale, mn_used, this_scale, this_min = cand.unbind(0)
    mn.copy_(mn0)
    denom = (mx - mn).add_(flat_fix)

    lf = torch.empty_like(x)  # candidate codes, fp32
    err = torch.empty_like(x)
    sums = torch.empty((n, 3, B), dtype=f32, device=dev)
    acc = torch.empty((1, 3, B), dtype=f32, device=dev)
    # D = sum_w*sum_l2 - sum_l*sum_l and the scale and min numerators, as rows of k1*a - k2*b
    k1 = torch.stack([sum_w, sum_w, sum_x])  # times [sum_l2, sum_xl, sum_l2]
    k2 = torch.stack([sum_x, sum_x, sum_x])  # rows 0, 2 become sum_l: [sum_l, sum_x, sum_l] times
    pick1 = torch.tensor([1, 2, 1], device=dev)
    pick2 = torch.tensor([0, 0, 2], device=dev)  # [sum_l, sum_l, sum_xl]
    ib1 = torch.empty(B, dtype=torch.int32, device=dev)
    ib2 = torch.empty(B, dtype=torch.int32, device=dev)

    def error(sc: Tensor, m: Tensor, out: Tensor) -> None:
        torch.mul(lf, sc, out=err)  # diff = scale*L + min - x
        err.add_(m).sub_(x)
        err.abs_() if use_mad else err.mul_(err)
        err.mul_(w)
        _seqsum_into(out.unsqueeze(0), err)

    torch.div(torch.full_like(denom, float(nmax)), denom, out=best_iscale)
    best_mn.copy_(mn)
    torch.div(torch.ones_like(denom), best_iscale, out=scale)
    _codes_into(lf, x, best_iscale, mn, 0, nmax, ends)
    error(scale, mn, best_error)
    cs = _qkx2_candidates(nmax, rmin, rdelta, nstep)
    cs = torch.tensor(cs, dtype=f32, device=dev).unsqueeze(1).expand(-1, B)  # true divisions below
    for step in range(nstep + 1):
        torch.div(cs[step], denom, out=iscale)
        mn_used.copy_(mn)
        _codes_into(lf, x, iscale, mn, 0, nmax, ends)
        torch.mul(w, lf, out=sums[:, 0])
        torch.mul(sums[:, 0], lf, out=sums[:, 1])
        torch.mul(sums[:, 0], x, out=sums[:, 2])
        sl = _seqsum_into(acc, sums)  # [sum_l, sum_l2, sum_xl]
        k2[0::2] = sl[0]
        r = (k1 * sl[pick1]).sub_(k2 * sl[pick2])  # [D, scale numerator, min numerator]
        D = r[0]
        torch.div(r[1:], D, out=cand[3:])  # this_scale, this_min
        clip = torch.gt(this_min, 0.0, out=ib1).neg_()
        this_min.view(torch.int32).bitwise_and_(~clip)  # this_min = 0 where clipped
        _sel_(clip, _div(sl[2], sl[1]), this_scale)  # this_scale = sum_xl / sum_l2 there
        error(this_scale, this_min, cur_error)
        better = torch.gt(D, 0.0, out=ib1)
        better &= torch.lt(cur_error, best_error, out=ib2)
        better &= search
        _sel_(better.neg_(), cand, state)
        torch.sub(mx, mn, out=denom).add_(flat_fix)

    torch.sub(x, best_mn, out=lf)
    L = _nearest_int_(lf.mul_(best_iscale)).clamp_(0, nmax)  # the winner's codes, in lf's memory
    return _zero_where(flat, scale), -mn, _zero_where(flat, L)


def _make_qx_quants_rmse1(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)``: symmetric, weights x^2 (Q6_K).

    As in ``_make_qkx2_quants``, the winner's codes are recomputed once from its ``iscale``."""
    return _by_columns(lambda x: _qx_rmse1_cols(x, nmax), x)


def _qx_rmse1_cols(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    n, B = x.shape
    amax, mx = _first_absmax(x, 0)
    zero_group = _mask(torch.lt, amax, _GROUP_MAX_EPS)
    mx = _sel(zero_group, torch.ones_like(mx), mx)  # C returns early for these: any finite iscale will do
    # With finite x, |iscale*x| <= (nmax + 1)*|x|/amax (zero groups: iscale = -nmax..., |x| < 1e-15) is
    # far inside nearest_int's round-half-even range: no per-candidate check. NaN or inf: check it.
    finite = x.device.type == "cpu" and bool(torch.isfinite(x.abs().amax()))  # NaN propagates
    ends = None if finite else torch.stack([x.amin(0), x.amax(0)])
    w = x * x
    wx = w * x
    lf = torch.empty_like(x)
    sums = torch.empty((n, 2, B), dtype=x.dtype, device=x.device)
    acc = torch.empty((1, 2, B), dtype=x.dtype, device=x.device)
    state = torch.empty((3, B), dtype=x.dtype, device=x.device)  # best iscale, its scale, best
    cand = torch.empty((3, B), dtype=x.dtype, device=x.device)
    best_iscale, scale, best = state.unbind(0)

    def candidate(iscale: Tensor) -> Tensor:
        _codes_into(lf, x, iscale, None, -nmax, nmax - 1, ends, in_range=finite)
        torch.mul(wx, lf, out=sums[:, 0])  # w*x*l
        torch.mul(w, lf, out=sums[:, 1])  # w*l*l
        sums[:, 1].mul_(lf)
        return _seqsum_into(acc, sums)  # [sumlx, suml2]

    # every candidate's iscale at once: -nmax/max, then -(nmax + 0.1*step)/max for step -9..9 but 0
    cs = _qx_candidates(nmax)
    iscales = torch.div(torch.tensor(cs, dtype=x.dtype, device=x.device).unsqueeze(1), mx)
    best_iscale.copy_(iscales[0])
    sumlx, suml2 = candidate(best_iscale)
    scale.copy_(_zero_where(_mask(torch.eq, suml2, 0.0), _div(sumlx, suml2)))
    torch.mul(scale, sumlx, out=best)
    ib1 = torch.empty(B, dtype=torch.int32, device=x.device)
    ib2 = torch.empty(B, dtype=torch.int32, device=x.device)
    for iscale in iscales[1:]:
        cand[0] = iscale
        sumlx, suml2 = candidate(iscale)
        better = torch.gt(suml2, 0.0, out=ib1)
        better &= torch.gt(sumlx * sumlx, best * suml2, out=ib2)
        torch.div(sumlx, suml2, out=cand[1])
        torch.mul(cand[1], sumlx, out=cand[2])
        _sel_(better.neg_(), cand, state)

    L = _nearest_int_(torch.mul(x, best_iscale, out=lf)).clamp_(-nmax, nmax - 1).add_(nmax)
    return _zero_where(zero_group, scale), _zero_where(zero_group, L)


def _make_q3_quants_rmse(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: symmetric start, then coordinate descent."""
    amax, mx = _first_absmax(x, 0)
    w = x * x
    wx = w * x
    L = nearest_int(_div(float(-nmax), mx) * x).clamp_(-nmax, nmax - 1)
    lf = L.float()
    sumlx, suml2 = _seqsum(wx * lf), _seqsum(w * lf * lf)
    L = list(lf.unbind(0))  # codes as fp32 (exact small integers)
    for _ in range(5):
        # A sub-block with no change in a pass has a fixed state, so running the remaining passes
        # on it (instead of C's per-block break) changes nothing.
        n_changed = torch.zeros_like(suml2, dtype=torch.int32)
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int(_div(x[i] * sl2, slx)).clamp_(-nmax, nmax - 1).float()
            tried = _mask(torch.gt, slx, 0.0) & _mask(torch.ne, new_l, li)
            slx = slx + wx[i] * new_l
            sl2 = sl2 + w[i] * new_l * new_l
            take = tried & _mask(torch.gt, sl2, 0.0) & _mask(torch.gt, slx * slx * suml2, sumlx * sumlx * sl2)
            L[i] = _sel(take, new_l, li)
            sumlx = _sel(take, slx, sumlx)
            suml2 = _sel(take, sl2, suml2)
            n_changed |= take
        if not bool(n_changed.any()):
            break
    L = torch.stack(L).to(torch.int32) + nmax
    scale = _sel(_mask(torch.gt, suml2, 0.0), _div(sumlx, suml2), torch.zeros_like(suml2))
    zero_group = _mask(torch.lt, amax, _GROUP_MAX_EPS)
    return _zero_where(zero_group, scale), _zero_where(zero_group, L)


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------
# llama.cpp's encoder: turned off after a mismatch; calls per format; its dequantization: checked formats, off
_LLAMA = {"off": False, "calls": {}, "dequant_checked": set(), "dequant_off": False}
# the Triton kernel (kernels/triton_kquant.py) on CUDA weights: formats checked on first use, formats turned off
_TRITON = {"checked": set(), "off": set()}


class KQuantFormat(Format):
    """A GGUF k-quant. Subclasses set the class constants and ``_encode`` / the byte layout."""

    block = QK_K
    scale_dtype = torch.float16
    ggml_type: int
    type_size: int
    sub: int  # elements per sub-block
    has_min: bool
    code_offset: int = 0  # dequant uses codes - code_offset

    # -- public API ----------------------------------------------------------------------------------
    def quantize(self, w: Tensor) -> QTensor:
        check_finite(w)
        self.check_shape(tuple(w.shape))
        return self._quantize(w)

    def quantize_bytes(self, w: Tensor) -> np.ndarray:
        """``to_bytes(quantize(w))``: the GGUF blocks of ``w``, ``(*shape[:-1], bytes)``. Export takes this
        path: with llama.cpp's encoder it hands over its bytes as they are, without decoding them into a
        QTensor and packing that again (decoding SmolLM2's k-quant tensors alone took 0.45 s on 2 cores,
        half of llama.cpp's whole quantize run)."""
        check_finite(w)
        self.check_shape(tuple(w.shape))
        enc = self._llama_blocks(w) if llama_encoder.enabled() else None
        if enc is None:
            return self.to_bytes(self._quantize_torch(w))
        return enc[1].reshape(*w.shape[:-1], -1)

    def _quantize(self, w: Tensor) -> QTensor:
        """The reference rule without the finite check (the fake quantizer calls this directly): by
        llama.cpp's own encoder where llama-cpp-python is installed (``llama_encoder.py`` says why), else
        by ours."""
        if llama_encoder.enabled() and not _LLAMA["off"]:
            q = self._quantize_llama(w)
            if q is not None:
                return q
        return self._quantize_torch(w)

    def _quantize_llama(self, w: Tensor) -> Optional[QTensor]:
        """llama.cpp's blocks as a QTensor on ``w``'s device, or None once llama.cpp's encoder is off."""
        enc = self._llama_blocks(w)
        if enc is None:
            return None
        q = self.from_bytes(enc[1], tuple(w.shape))
        if w.device.type != "cpu":
            q = QTensor(q.format, q.shape, q.codes.to(w.device), q.scale.to(w.device),
                        None if q.zero is None else q.zero.to(w.device), {k: v.to(w.device) for k, v in q.extra.items()})
        return q

    def _fake_llama(self, w: Tensor) -> Optional[Tensor]:
        """``w_hat`` (fp32, on ``w``'s device) by llama.cpp's encoder and its ``dequantize_row``, or None once
        llama.cpp's encoder is off. The dequantization is checked like the encoder, on the same sample rows
        against ours (``dequantize(from_bytes(...))``, which equals ``gguf.quants.dequantize``); a
        difference (say, a build whose compiler fused the multiply-add) hands it over to ours."""
        enc = self._llama_blocks(w)
        if enc is None:
            return None
        x, data = enc
        if _LLAMA["dequant_off"]:
            return self.dequantize(self.from_bytes(data, tuple(w.shape))).to(w.device)
        y = torch.from_numpy(llama_encoder.dequantize_rows(self.name, data, x.shape[1], torch.get_num_threads()))
        if self.name not in _LLAMA["dequant_checked"]:
            _LLAMA["dequant_checked"].add(self.name)
            check = torch.from_numpy(llama_encoder.check_rows(x.shape[0]))
            ours = self.dequantize(self.from_bytes(data[check.numpy()], (len(check), x.shape[1])))
            if not torch.equal(ours.view(torch.int32), y[check].view(torch.int32)):
                _LLAMA["dequant_off"] = True
                import warnings

                warnings.warn(f"llama.cpp's {self.name} dequantization differs from qat's: qat's is used from now on",
                              RuntimeWarning, stacklevel=3)
                return self.dequantize(self.from_bytes(data, tuple(w.shape))).to(w.device)
        return y.reshape(w.shape).to(w.device)

    def _fake_triton(self, w: Tensor) -> Optional[Tensor]:
        """``w_hat`` by the Triton kernel (one launch, on the device: ``kernels/triton_kquant.py``), or None
        where it is not used (no Triton, ``QAT_DISABLE_TRITON``, not CUDA, or turned off for this format).
        A format's first call compares ``llama_encoder.check_rows`` rows with ours on the CPU, bitwise; a
        difference (a Triton or compiler whose arithmetic differs) warns and turns the kernel off for the
        format: what trains must stay the reference rule's bits."""
        from ..kernels import triton_kquant

        if self.name in _TRITON["off"] or not triton_kquant.usable(w, self):
            return None
        y = triton_kquant.kquant_fake(w, self)
        if self.name not in _TRITON["checked"]:
            _TRITON["checked"].add(self.name)
            x = w.detach().reshape(-1, w.shape[-1])
            check = torch.from_numpy(llama_encoder.check_rows(x.shape[0])).to(x.device)
            ours = self.dequantize(self._quantize_torch(x[check].cpu()))
            if not torch.equal(y.reshape(-1, w.shape[-1])[check].cpu().view(torch.int32), ours.view(torch.int32)):
                _TRITON["off"].add(self.name)
                import warnings

                warnings.warn(f"the Triton {self.name} kernel differs from qat's reference encoder: it is off for "
                              f"{self.name}, and qat's own path is used from now on", RuntimeWarning, stacklevel=3)
                return None
        return y

    def _llama_blocks(self, w: Tensor) -> Optional[tuple[Tensor, np.ndarray]]:
        """``(x, data)``: ``w`` as fp32 CPU rows and llama.cpp's blocks of them, checked against ours on a
        format's first use (``llama_encoder.checked_blocks``; a check on every call cost more than the C
        encoding itself: our search on even one row is hundreds of small ops), or None once it is off."""
        return llama_encoder.checked_blocks(self, w, lambda rows: self.to_bytes(self._quantize_torch(rows)), _LLAMA)

    def _quantize_torch(self, w: Tensor) -> QTensor:
        """Our vectorized implementation of the reference rule (any device)."""
        shape = tuple(w.shape)
        x = w.detach().float().reshape(-1, QK_K)
        n_sb, n_sub = x.shape[0], QK_K // self.sub
        # element-major sub-blocks: (sub, n_sb, n_sub)
        xe = x.reshape(n_sb, n_sub, self.sub).permute(2, 0, 1).contiguous()
        d, dmin, sc, mn, L = self._encode(xe)
        lead = shape[:-1] + (shape[-1] // QK_K,)
        codes = L.permute(1, 2, 0).reshape(shape).to(torch.int16)
        extra = {"sub_scales": sc.reshape(*lead, n_sub).to(torch.int16)}
        if self.has_min:
            extra["sub_mins"] = mn.reshape(*lead, n_sub).to(torch.int16)
        return QTensor(
            format=self.name,
            shape=shape,
            codes=codes,
            scale=d.reshape(lead).to(torch.float16),
            zero=dmin.reshape(lead).to(torch.float16) if self.has_min else None,
            extra=extra,
        )

    def dequantize(self, q: QTensor) -> Tensor:
        n_sub = QK_K // self.sub
        codes = q.codes.reshape(*q.scale.shape, n_sub, self.sub).float()
        dl = q.scale.float().unsqueeze(-1) * q.extra["sub_scales"].float()
        if self.has_min:
            ml = q.zero.float().unsqueeze(-1) * q.extra["sub_mins"].float()
            out = dl.unsqueeze(-1) * codes - ml.unsqueeze(-1)
        else:
            out = dl.unsqueeze(-1) * (codes - self.code_offset)
        return out.reshape(q.shape)

    def fake(self, w: Tensor) -> Tensor:
        """``dequantize(quantize(w))`` (fp32): on CUDA by the Triton kernel where usable, else by llama.cpp's
        encoder on the host where installed, else by ours; all three give the same bits."""
        y = self._fake_triton(w)
        if y is not None:
            return y
        if llama_encoder.enabled():
            y = self._fake_llama(w)
            if y is not None:
                return y
        return self.dequantize(self._quantize_torch(w)).to(w.device)

    # -- bytes -------------------------------------------------------------------------------------
    def to_bytes(self, q: QTensor) -> np.ndarray:
        """Pack into llama.cpp's block layout: uint8 array ``(*shape[:-1], n_blocks * type_size)``.

        All packing runs on uint8 (casts wrap like C's stores; every field fits its byte)."""
        n_sub = QK_K // self.sub
        u8 = torch.uint8
        codes = q.codes.detach().cpu().reshape(-1, QK_K).to(u8)
        sc = q.extra["sub_scales"].detach().cpu().reshape(-1, n_sub).to(u8)
        mn = q.extra["sub_mins"].detach().cpu().reshape(-1, n_sub).to(u8) if self.has_min else None
        d = q.scale.detach().cpu().to(torch.float16).reshape(-1, 1).view(u8)
        dmin = q.zero.detach().cpu().to(torch.float16).reshape(-1, 1).view(u8) if self.has_min else None
        out = torch.cat(self._pack(codes, sc, mn, d, dmin), dim=-1)
        assert out.shape[-1] == self.type_size and out.dtype == u8
        return out.reshape(*q.shape[:-1], -1).contiguous().numpy()

    def from_bytes(self, data: np.ndarray, shape: tuple[int, ...]) -> QTensor:
        shape = tuple(shape)
        self.check_shape(shape)
        raw = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).reshape(-1, self.type_size)
        codes, sc, mn, d, dmin = self._unpack(raw.to(torch.int64), raw)
        lead = shape[:-1] + (shape[-1] // QK_K,)
        n_sub = QK_K // self.sub
        extra = {"sub_scales": sc.reshape(*lead, n_sub).to(torch.int16)}
        if self.has_min:
            extra["sub_mins"] = mn.reshape(*lead, n_sub).to(torch.int16)
        return QTensor(self.name, shape, codes.reshape(shape).to(torch.int16), d.reshape(lead),
                       dmin.reshape(lead) if self.has_min else None, extra)

    # -- per format ----------------------------------------------------------------------------------
    def _encode(self, xe: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor], Tensor]:
        """xe: (sub, n_sb, n_sub) -> d (n_sb), dmin, sub scales (n_sb, n_sub), sub mins, codes like xe."""
        raise NotImplementedError

    def _pack(self, codes, sc, mn, d, dmin) -> list[Tensor]:
        raise NotImplementedError

    def _unpack(self, b: Tensor, raw: Tensor):
        raise NotImplementedError


def _f16_at(raw: Tensor, pos: int) -> Tensor:
    return raw[:, pos:pos + 2].contiguous().view(torch.float16).squeeze(-1)


def _or_shifted(parts: Tensor, dim: int, shift: int) -> Tensor:
    """``sum_k parts[k] << (shift*k)`` along ``dim`` for disjoint bit fields, as ORs on uint8."""
    out = parts.select(dim, 0).clone()
    for k in range(1, parts.shape[dim]):
        out |= parts.select(dim, k) << (shift * k)
    return out


def _crumbs(codes: Tensor) -> Tensor:
    """2-bit codes of 256 elements -> 64 bytes: byte 32*h + l holds element 128*h + 32*k + l at bits 2k."""
    return _or_shifted(codes.reshape(-1, 2, 4, 32) & 3, 2, 2).reshape(-1, 64)


def _uncrumb(qs: Tensor) -> Tensor:
    return ((qs.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)


def _bitplane(bits: Tensor, groups: int) -> Tensor:
    """One bit per element, ``groups`` groups of 32: byte l holds element 32*k + l at bit k."""
    return _or_shifted(bits.reshape(-1, groups, 32) & 1, 1, 1)


def _unbitplane(q: Tensor, groups: int) -> Tensor:
    return ((q.reshape(-1, 1, 32) >> torch.arange(groups).reshape(1, groups, 1)) & 1).reshape(-1, 32 * groups)


def _nibbles(codes: Tensor) -> Tensor:
    """4-bit codes of 256 elements -> 128 bytes: byte 32*c + l holds elements 64c + l (low), 64c + 32 + l."""
    c = codes.reshape(-1, 4, 2, 32) & 0xF
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)


def _unnibble(qs: Tensor) -> Tensor:
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, 256)


def _pack_scale_min_k4(ls: Tensor, lm: Tensor) -> Tensor:
    """Eight 6-bit scales and mins into 12 bytes (get_scale_min_k4's layout)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=-1)


def _unpack_scale_min_k4(q: Tensor) -> tuple[Tensor, Tensor]:
    a, b, c = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc, mn


def _requantize(xe: Tensor, L: Tensor, d: Tensor, sc: Tensor, dmin: Optional[Tensor], mn: Optional[Tensor],
                lo: int, hi: int, offset: int) -> Tensor:
    """The final pass every k-quant ref makes: recompute codes from the stored fp16 ``d``/``dmin`` and
    the integer sub-block scales; sub-blocks whose effective scale is 0 keep the search's codes."""
    dq = _fp16(d).unsqueeze(-1) * sc.float()
    y = xe.clone() if dmin is None else xe + _fp16(dmin).unsqueeze(-1) * mn.float()
    l = _nearest_int_(torch.div(y, dq, out=y)).clamp_(lo, hi).add_(offset)
    return _sel_(_mask(torch.eq, dq, 0.0), L.to(torch.int32), l)


class _AsymKQuant(KQuantFormat):
    """Q2_K / Q4_K / Q5_K: ``w = d*sc*q - dmin*m`` with sub-block scales from make_qkx2_quants."""

    has_min = True
    nmax: int
    sub_bits: int  # bits of the sub-block scale / min (4 or 6)
    rmin: float
    rdelta: float = 0.1
    nstep: int

    def _weights(self, xe: Tensor) -> Tensor:
        raise NotImplementedError

    def _encode(self, xe):
        scales, mins, L = _make_qkx2_quants(xe, self._weights(xe), self.nmax, self.rmin, self.rdelta,
                                            self.nstep, self.use_mad)
        max_scale, max_min = _running_max(scales), _running_max(mins)
        smax = float((1 << self.sub_bits) - 1)
        has_scale, has_min = (max_scale > 0).unsqueeze(-1), (max_min > 0).unsqueeze(-1)
        ls = nearest_int(_div(smax, max_scale).unsqueeze(-1) * scales)
        lm = nearest_int(_div(smax, max_min).unsqueeze(-1) * mins)
        ls = torch.where(has_scale, ls, torch.zeros_like(ls))
        lm = torch.where(has_min, lm, torch.zeros_like(lm))
        ls, lm = self._store_sub(ls, lm)
        d = _div(max_scale, smax)
        dmin = _div(max_min, smax)
        L = _requantize(xe, L, d, ls, dmin, lm, 0, self.nmax, 0)
        return d, dmin, ls, lm, L


class _Q2_K(_AsymKQuant):
    name, bits, ggml_type, type_size = "q2_k", 2, 10, 84
    sub, nmax, sub_bits, rmin, nstep, use_mad = 16, 3, 4, -0.5, 15, True

    def _weights(self, xe):
        return xe.abs()

    def _store_sub(self, ls, lm):
        # y.scales[j] = l; y.scales[j] |= (l << 4): one uint8 byte holds both nibbles
        byte = _as_uint8(ls) | _as_uint8(lm << 4)
        return byte & 0xF, byte >> 4

    def _pack(self, codes, sc, mn, d, dmin):
        return [sc | (mn << 4), _crumbs(codes), d, dmin]

    def _unpack(self, b, raw):
        sc = b[:, :16]
        return _uncrumb(b[:, 16:80]), sc & 0xF, sc >> 4, _f16_at(raw, 80), _f16_at(raw, 82)


class _K4Scales(_AsymKQuant):
    sub, sub_bits, rdelta = 32, 6, 0.1
    use_mad = False

    def _weights(self, xe):
        av_x = _sqrtf(_div(_seqsum(xe * xe), 32.0))
        return av_x + xe.abs()

    def _store_sub(self, ls, lm):
        # uint8_t ls = nearest_int(...); ls = MIN(63, ls);
        return _as_uint8(ls).clamp(max=63), _as_uint8(lm).clamp(max=63)


class _Q4_K(_K4Scales):
    name, bits, ggml_type, type_size = "q4_k", 4, 12, 144
    nmax, rmin, nstep = 15, -1.0, 20

    def _pack(self, codes, sc, mn, d, dmin):
        return [d, dmin, _pack_scale_min_k4(sc, mn), _nibbles(codes)]

    def _unpack(self, b, raw):
        sc, mn = _unpack_scale_min_k4(b[:, 4:16])
        return _unnibble(b[:, 16:144]), sc, mn, _f16_at(raw, 0), _f16_at(raw, 2)


class _Q5_K(_K4Scales):
    name, bits, ggml_type, type_size = "q5_k", 5, 13, 176
    nmax, rmin, nstep = 31, -0.5, 15

    def _pack(self, codes, sc, mn, d, dmin):
        return [d, dmin, _pack_scale_min_k4(sc, mn), _bitplane(codes >> 4, 8), _nibbles(codes)]

    def _unpack(self, b, raw):
        sc, mn = _unpack_scale_min_k4(b[:, 4:16])
        codes = _unnibble(b[:, 48:176]) | (_unbitplane(b[:, 16:48], 8) << 4)
        return codes, sc, mn, _f16_at(raw, 0), _f16_at(raw, 2)


class _Q3_K(KQuantFormat):
    """``w = d*(sc - 32)*(q - 4)``, 6-bit sub-block scales, codes from make_q3_quants."""

    name, bits, ggml_type, type_size = "q3_k", 3, 11, 110
    sub, has_min, code_offset = 16, False, 4

    def _encode(self, xe):
        scales, L = _make_q3_quants_rmse(xe, 4)
        _, max_scale = _first_absmax(scales, -1)
        nonzero = (max_scale != 0).unsqueeze(-1)
        iscale = _div(-32.0, max_scale)
        l = _as_int8(nearest_int(iscale.unsqueeze(-1) * scales)).clamp(-32, 31) + 32
        sc = torch.where(nonzero, l, torch.zeros_like(l)) - 32  # scale bytes stay 0 when max_scale == 0
        d = torch.where(nonzero.squeeze(-1), _div(1.0, iscale), torch.zeros_like(iscale))
        L = _requantize(xe, L, d, sc, None, None, -4, 3, 4)
        return d, None, sc, None, L

    def _pack(self, codes, sc, mn, d, dmin):
        l = sc + 32
        low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
        high = _or_shifted((l >> 4).reshape(-1, 4, 4), 1, 2)
        return [_bitplane(codes >> 2, 8), _crumbs(codes), low, high, d]

    def _unpack(self, b, raw):
        codes = _uncrumb(b[:, 32:96]) | (_unbitplane(b[:, 0:32], 8) << 2)
        s = b[:, 96:108]
        low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=-1)
        high = ((s[:, 8:12].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6]).reshape(1, 4, 1)) & 3).reshape(-1, 16)
        return codes, (low | (high << 4)) - 32, None, _f16_at(raw, 108), None


class _Q6_K(KQuantFormat):
    """``w = d*sc*(q - 32)``, int8 sub-block scales, codes from make_qx_quants (rmse_type 1)."""

    name, bits, ggml_type, type_size = "q6_k", 6, 14, 210
    sub, has_min, code_offset = 16, False, 32

    def _encode(self, xe):
        scales, L = _make_qx_quants_rmse1(xe, 32)
        max_abs, max_scale = _first_absmax(scales, -1)
        zero_block = max_abs < _GROUP_MAX_EPS  # C memsets the whole block
        iscale = _div(-128.0, max_scale)
        sc = _as_int8(nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127))
        sc = torch.where(zero_block.unsqueeze(-1), torch.zeros_like(sc), sc)
        d = torch.where(zero_block, torch.zeros_like(iscale), _div(1.0, iscale))
        L = _requantize(xe, L, d, sc, None, None, -32, 31, 32)
        L = torch.where(zero_block.unsqueeze(-1), torch.zeros_like(L), L)
        return d, None, sc, None, L

    def _pack(self, codes, sc, mn, d, dmin):
        c = codes.reshape(-1, 2, 4, 32)
        ql = torch.cat([(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4),
                        (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)], dim=-1).reshape(-1, 128)
        qh = _or_shifted(c >> 4, 2, 2).reshape(-1, 64)
        return [ql, qh, sc, d]

    def _unpack(self, b, raw):
        ql = b[:, :128].reshape(-1, 2, 2, 32)
        qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)
        low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        codes = (low | ((qh & 3) << 4)).reshape(-1, 256)
        sc = raw[:, 192:208].contiguous().view(torch.int8).to(torch.int64)
        return codes, sc, None, _f16_at(raw, 208), None


Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = _Q2_K(), _Q3_K(), _Q4_K(), _Q5_K(), _Q6_K()
KQUANT_FORMATS = {f.name: f for f in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)}


def _register() -> None:
    from . import register_format  # the package module runs this file from its own import

    for fmt in KQUANT_FORMATS.values():
        register_format(fmt)


_register()
