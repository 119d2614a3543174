"""k-quants Q2_K..Q6_K checked against the outside world, never against ourselves:

* our dequantization of our bytes against ``gguf.quants.dequantize`` (the gguf package's numpy reference);
* our bytes against llama.cpp's own quantizer (``ggml_quantize_chunk`` with no imatrix, i.e. the
  ``quantize_row_*_K_ref`` rules) and our dequantization against llama.cpp's ``dequantize_row_*_K``,
  both called through ctypes in llama-cpp-python's bundled libggml-base (tests marked ``llama``).

All comparisons are bitwise (fp32 compared as uint32), so ``-0.0`` vs ``0.0`` counts as a mismatch too.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
import torch

from qat.formats import QuantError, get_format
from qat.formats.kquants import KQUANT_FORMATS, nearest_int

torch.set_num_threads(1)

NAMES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _cases() -> dict[str, np.ndarray]:
    """Small fp32 tensors (rows x 512 = 2 super-blocks a row) covering the reference rules' branches."""
    rng = np.random.default_rng(1234)
    c: dict[str, np.ndarray] = {}
    c["randn"] = rng.standard_normal((16, 512))
    c["weights_0.02"] = rng.standard_normal((16, 512)) * 0.02
    z = rng.standard_normal((6, 512))
    z[0] = 0  # all-zero row
    z[1, :256] = 0  # all-zero super-block
    z[2, :16] = 0  # all-zero 16-sub-block
    z[3, 32:64] = 0  # all-zero 32-sub-block
    z[4, ::2] = -0.0  # negative zeros
    z[5, 256:] = 1e-16  # below GROUP_MAX_EPS
    c["zeros"] = z
    o = rng.standard_normal((6, 512)) * 0.01
    o[:, 7] = 1000.0  # one huge outlier per row
    o[1, 300] = -500.0
    o[2, 255] = 3e4
    c["outlier"] = o
    k = np.ones((6, 512))
    k[1] = -0.3  # constant negative
    k[2, :256] = 5.0
    k[3] = 1e-3
    k[4, :32] = -2.0
    k[5] = np.repeat(rng.standard_normal(32), 16)  # constant within each 16-sub-block
    c["constant"] = k
    c["tiny"] = rng.standard_normal((4, 512)) * 1e-8
    c["subnormal"] = rng.standard_normal((4, 512)) * 1e-39
    c["near_eps"] = rng.standard_normal((4, 512)) * np.array([[1e-15], [5e-15], [3e-14], [1e-13]])  # sub-scales < 1e-15
    c["positive"] = np.abs(rng.standard_normal((8, 512)))
    c["negative"] = -np.abs(rng.standard_normal((8, 512))) - 0.5
    c["grid_ties"] = rng.integers(-16, 17, (8, 512)) * 0.25  # exact halves hit round-half-even
    c["heavy_tail"] = rng.standard_t(1.5, (8, 512))
    c["sparse"] = rng.standard_normal((8, 512)) * (rng.random((8, 512)) < 0.05)
    c["mixed_scales"] = rng.laplace(0, 1, (8, 512)) * np.repeat(10.0 ** rng.uniform(-4, 2, (8, 16)), 32, axis=1)
    return {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in c.items()}


CASES = _cases()


def _bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------------------------------------
# against the gguf package
# ------------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402


@pytest.mark.parametrize("name", NAMES)
def test_type_constants_match_gguf(name):
    fmt = get_format(name)
    assert fmt is KQUANT_FORMATS[name]
    qtype = GGMLQuantizationType[name.upper()]
    assert fmt.ggml_type == int(qtype)
    assert (fmt.block, fmt.type_size) == GGML_QUANT_SIZES[qtype]
    assert fmt.scale_dtype == torch.float16 and fmt.bits == int(name[1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dequantize_matches_gguf(name, case):
    fmt, x = get_format(name), CASES[case]
    q = fmt.quantize(torch.from_numpy(x))
    data = fmt.to_bytes(q)
    assert data.dtype == np.uint8 and data.shape == (x.shape[0], 2 * fmt.type_size)
    ref = gguf.quants.dequantize(data, GGMLQuantizationType(fmt.ggml_type))
    ours = fmt.dequantize(q)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(_bits(ours), _bits(ref))
    np.testing.assert_array_equal(_bits(fmt.fake(torch.from_numpy(x))), _bits(ref))


def _random_blocks(fmt, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes in every field, with finite fp16 super-block scales (NaN payloads aside)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    halves = (rng.standard_normal((n_blocks, 2)) * 0.01).astype(np.float16).view(np.uint8)
    pos = {"q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}[fmt.name]
    for i, p in enumerate(pos):
        raw[:, p:p + 2] = halves[:, 2 * i:2 * i + 2]
    return raw


@pytest.mark.parametrize("name", NAMES)
def test_byte_layout_matches_gguf_on_arbitrary_blocks(name):
    """Every bit of every field, including combinations our encoder never writes."""
    fmt = get_format(name)
    raw = _random_blocks(fmt, 64, seed=7).reshape(8, -1)
    q = fmt.from_bytes(raw, (8, 8 * 256))
    ref = gguf.quants.dequantize(raw, GGMLQuantizationType(fmt.ggml_type))
    np.testing.assert_array_equal(_bits(fmt.dequantize(q)), _bits(ref))
    np.testing.assert_array_equal(fmt.to_bytes(q), raw)


@pytest.mark.parametrize("name", NAMES)
def test_qtensor_fields(name):
    fmt, x = get_format(name), torch.from_numpy(CASES["randn"]).reshape(2, 8, 512)
    q = fmt.quantize(x)
    n_sub = 16 if name in ("q2_k", "q3_k", "q6_k") else 8
    assert q.format == name and q.shape == (2, 8, 512)
    assert q.codes.dtype == torch.int16 and q.codes.shape == x.shape
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2 ** fmt.bits - 1
    assert q.scale.dtype == torch.float16 and q.scale.shape == (2, 8, 2)
    assert q.extra["sub_scales"].shape == (2, 8, 2, n_sub)
    if name in ("q2_k", "q4_k", "q5_k"):
        assert q.zero.dtype == torch.float16 and q.zero.shape == (2, 8, 2)
        assert q.extra["sub_mins"].shape == (2, 8, 2, n_sub)
    else:
        assert q.zero is None and "sub_mins" not in q.extra
    back = fmt.from_bytes(fmt.to_bytes(q), q.shape)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale.view(torch.int16), q.scale.view(torch.int16))
    for key in q.extra:
        assert torch.equal(back.extra[key], q.extra[key])
    if q.zero is not None:
        assert torch.equal(back.zero.view(torch.int16), q.zero.view(torch.int16))


@pytest.mark.parametrize("name", NAMES)
def test_input_dtype_and_grad_do_not_change_result(name):
    fmt = get_format(name)
    x = torch.from_numpy(CASES["randn"][:4]).to(torch.bfloat16)
    expect = fmt.fake(x.float())
    w = x.clone().requires_grad_(True)
    assert torch.equal(fmt.fake(w), expect)


def test_error_shrinks_with_bits():
    x = torch.from_numpy(CASES["randn"])
    errs = [float(((get_format(n).fake(x) - x) ** 2).mean().sqrt()) for n in NAMES]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 0.03 and errs[0] < 0.5, errs  # q6_k ~ 1%, q2_k ~ 30% of unit-variance weights


def test_nearest_int_is_round_half_even_in_range():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.uniform(-4e6, 4e6, 10000), np.arange(-40, 41) * 0.5, [0.0, -0.0, 4194303.0]])
    v = torch.from_numpy(v.astype(np.float32))
    assert torch.equal(nearest_int(v), torch.round(v).to(torch.int32))


# ------------------------------------------------------------------------------------------------
# input errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(name, bad):
    x = torch.randn(2, 256)
    x[1, 3] = bad
    with pytest.raises(QuantError, match="NaN"):
        get_format(name).quantize(x)


@pytest.mark.parametrize("name", NAMES)
def test_row_length_not_multiple_of_256_raises(name):
    with pytest.raises(QuantError, match=r"multiple of 256, got 300"):
        get_format(name).quantize(torch.randn(4, 300))
    with pytest.raises(QuantError, match=r"multiple of 256"):
        get_format(name).from_bytes(np.zeros((4, get_format(name).type_size), np.uint8), (4, 300))


# ------------------------------------------------------------------------------------------------
# against llama.cpp itself
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    libs = sorted(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.*")))
    if not libs:
        pytest.skip("llama_cpp has no bundled libggml-base")
    lib = ctypes.CDLL(libs[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    for name in NAMES:
        fn = getattr(lib, f"dequantize_row_{name[:2]}_K")
        fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def _llama_quantize(lib, fmt, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, n // 256 * fmt.type_size), np.uint8)
    size = lib.ggml_quantize_chunk(fmt.ggml_type, x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert size == out.size
    return out


def _llama_dequantize(lib, fmt, data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    n = data.size // fmt.type_size * 256
    out = np.empty(n, np.float32)
    getattr(lib, f"dequantize_row_{fmt.name[:2]}_K")(data.ctypes.data, out.ctypes.data, n)
    return out


def _first_bad_block(ours: np.ndarray, ref: np.ndarray, fmt) -> str:
    a, b = ours.reshape(-1, fmt.type_size), ref.reshape(-1, fmt.type_size)
    bad = np.nonzero((a != b).any(1))[0]
    if not len(bad):
        return ""
    i = bad[0]
    cols = np.nonzero(a[i] != b[i])[0]
    return f"{len(bad)} of {len(a)} blocks differ; block {i} bytes {cols[:12].tolist()}: ours {a[i][cols[:12]]} llama {b[i][cols[:12]]}"


@pytest.mark.llama
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bytes_match_llama_cpp(ggml, name, case):
    fmt, x = get_format(name), CASES[case]
    ours = fmt.to_bytes(fmt.quantize(torch.from_numpy(x)))
    ref = _llama_quantize(ggml, fmt, x)
    assert not _first_bad_block(ours, ref, fmt), _first_bad_block(ours, ref, fmt)


@pytest.mark.llama
@pytest.mark.parametrize("name", NAMES)
def test_bytes_match_llama_cpp_random_mix(ggml, name):
    """A few hundred super-blocks drawn from several distributions and scales."""
    rng = np.random.default_rng(99)
    rows = [rng.standard_normal(1024) * 10.0 ** rng.uniform(-5, 3) for _ in range(24)]
    rows += [rng.standard_t(2, 1024) for _ in range(24)]
    rows += [rng.uniform(-1, 1, 1024) + rng.uniform(-1, 1) for _ in range(24)]
    rows += [np.round(rng.standard_normal(1024) * 4) / 4 for _ in range(24)]
    x = np.stack(rows).astype(np.float32)
    fmt = get_format(name)
    q = fmt.quantize(torch.from_numpy(x))
    ours = fmt.to_bytes(q)
    ref = _llama_quantize(ggml, fmt, x)
    assert not _first_bad_block(ours, ref, fmt), _first_bad_block(ours, ref, fmt)
    np.testing.assert_array_equal(_bits(fmt.dequantize(q)).reshape(-1), _bits(_llama_dequantize(ggml, fmt, ref)))


@pytest.mark.llama
@pytest.mark.parametrize("name", NAMES)
def test_dequantize_matches_llama_cpp(ggml, name):
    fmt = get_format(name)
    raw = _random_blocks(fmt, 64, seed=11).reshape(4, -1)
    ours = fmt.dequantize(fmt.from_bytes(raw, (4, 16 * 256)))
    np.testing.assert_array_equal(_bits(ours).reshape(-1), _bits(_llama_dequantize(ggml, fmt, raw)))


# ------------------------------------------------------------------------------------------------
# the fast searches against the straightforward ones they replaced (kept here as the oracle)
# ------------------------------------------------------------------------------------------------
from qat.formats import kquants as kq  # noqa: E402


def _ref_seqsum(t):
    s = torch.zeros_like(t[0])
    for v in t:
        s = s + v
    return s


def _ref_first_absmax(v, dim):
    a = v.abs()
    a = torch.where(a > 0, a, torch.zeros_like(a))
    idx = a.argmax(dim, keepdim=True)
    amax = a.gather(dim, idx).squeeze(dim)
    mx = v.gather(dim, idx).squeeze(dim)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def _ref_make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    _div, _f32, nearest_int_ = kq._div, kq._f32, kq.nearest_int

    def error(scale, lf, mn):
        diff = scale * lf + mn - x
        diff = diff.abs() if use_mad else diff * diff
        return _ref_seqsum(w * diff)

    mn, mx = x.amin(0), x.amax(0)
    wx = w * x
    sum_w, sum_x = w[0], wx[0]
    for i in range(1, x.shape[0]):
        sum_w = sum_w + w[i]
        sum_x = sum_x + wx[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    L = nearest_int_(iscale * (x - mn)).clamp(0, nmax)
    best_error = error(scale, L.float(), mn)
    for step in range(nstep + 1):
        iscale = _div(_f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax), mx - mn)
        laux = nearest_int_(iscale * (x - mn)).clamp(0, nmax)
        lf = laux.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = _ref_seqsum(wl), _ref_seqsum(wl * lf), _ref_seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, _div(sum_xl, sum_l2), this_scale)
        cur_error = error(this_scale, lf, this_min)
        better = (D > 0) & (cur_error < best_error) & ~flat
        L = torch.where(better, laux, L)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    return torch.where(flat, torch.zeros_like(scale), scale), -mn, L


def _ref_make_qx_quants_rmse1(x, nmax):
    _div, _f32, nearest_int_ = kq._div, kq._f32, kq.nearest_int
    amax, mx = _ref_first_absmax(x, 0)
    w = x * x
    wx = w * x

    def candidate(iscale):
        l = nearest_int_(iscale * x).clamp(-nmax, nmax - 1)
        lf = l.float()
        return l + nmax, _ref_seqsum(wx * lf), _ref_seqsum(w * lf * lf)

    L, sumlx, suml2 = candidate(_div(float(-nmax), mx))
    scale = torch.where(suml2 != 0, _div(sumlx, suml2), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = _f32(nmax + _f32(_f32(0.1) * step))
        laux, sumlx, suml2 = candidate(_div(-c, mx))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, laux, L)
        scale = torch.where(better, _div(sumlx, suml2), scale)
        best = torch.where(better, scale * sumlx, best)
    zero_group = amax < kq._GROUP_MAX_EPS
    L = torch.where(zero_group, torch.zeros_like(L), L)
    return torch.where(zero_group, torch.zeros_like(scale), scale), L


def _ref_make_q3_quants_rmse(x, nmax):
    _div, nearest_int_ = kq._div, kq.nearest_int
    amax, mx = _ref_first_absmax(x, 0)
    w = x * x
    wx = w * x
    L = nearest_int_(_div(float(-nmax), mx) * x).clamp(-nmax, nmax - 1)
    lf = L.float()
    sumlx, suml2 = _ref_seqsum(wx * lf), _ref_seqsum(w * lf * lf)
    L = list(L.unbind(0))
    for _ in range(5):
        n_changed = torch.zeros_like(suml2, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = L[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int_(_div(x[i] * sl2, slx)).clamp(-nmax, nmax - 1)
            tried = (slx > 0) & (new_l != L[i])
            nf = new_l.float()
            slx = slx + wx[i] * nf
            sl2 = sl2 + w[i] * nf * nf
            take = tried & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new_l, L[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            n_changed |= take
        if not bool(n_changed.any()):
            break
    L = torch.stack(L) + nmax
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), torch.zeros_like(suml2))
    zero_group = amax < kq._GROUP_MAX_EPS
    L = torch.where(zero_group, torch.zeros_like(L), L)
    return torch.where(zero_group, torch.zeros_like(scale), scale), L


def _adversarial_columns(n: int, seed: int = 5) -> torch.Tensor:
    """(n, columns) fp32 sub-blocks, one per column, aimed at the searches' corner cases."""
    rng = np.random.default_rng(seed)
    cols = []

    def add(v):
        cols.append(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy())

    add(0.0)  # zero block
    add(-0.0)
    add(np.where(np.arange(n) % 2, 0.0, -0.0))  # signed zeros
    for c in (1.0, -1.0, 3e-3, -7.5, 1e-30, -1e-38, 1e-42, 2.5e38):  # constant blocks, incl. subnormal and huge
        add(c)
    for scale in (1e-45, 1e-40, 1e-39, 1e-20, 1e-16, 1e-15, 1e-14, 1e-8, 1e-3, 1.0, 1e3, 1e19, 1e30, 1e37):
        add(rng.standard_normal(n) * scale)  # fp16-underflowing and overflowing scales, subnormal ranges
        add(np.abs(rng.standard_normal(n)) * scale)  # one-signed
        add(-np.abs(rng.standard_normal(n)) * scale - scale)
    for k in range(6):  # one huge outlier among small values
        v = rng.standard_normal(n) * 0.01
        v[rng.integers(n)] = (1e3, -5e2, 3e4, -1e6, 1e19, -3e38)[k]
        add(v)
    for q in (0.25, 0.5, 1.0, 1 / 3):  # values on grids: rounding ties everywhere
        add(rng.integers(-16, 17, n) * q)
        add(rng.integers(0, 16, n) * q)
    add(np.arange(n) - n / 2)  # exact ramp
    add(np.arange(n) * 0.1 + 1.0)  # positive ramp, min clipped at 0
    add(np.where(np.arange(n) == 0, 1.0, 0.0))  # one non-zero
    add(np.where(np.arange(n) == n - 1, -1.0, 1.0))  # +m and -m tie for the absmax
    add(np.where(np.arange(n) % 2, 2.0, -2.0))
    add(np.where(np.arange(n) < 2, 1e-16, 0.0))  # below GROUP_MAX_EPS
    add(rng.standard_normal(n) + 1e4)  # large offset: min far from 0
    add(rng.standard_t(1.2, n))
    add(rng.standard_normal(n) * (rng.random(n) < 0.1))  # sparse
    add(np.exp(rng.uniform(-80, 80, n)) * rng.choice([-1, 1], n))  # every magnitude at once
    for _ in range(40):  # plain weights, to cover the ordinary path too
        add(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1))
    x = np.stack(cols, axis=1).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous(), b.contiguous()
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.to(torch.float32).view(torch.int32))
    return torch.equal(a.to(torch.int64), b.to(torch.int64))


QKX2_PARAMS = {  # nmax, rmin, rdelta, nstep, use_mad, weights
    "q2_k": (3, -0.5, 0.1, 15, True, "abs"),
    "q4_k": (15, -1.0, 0.1, 20, False, "av"),
    "q5_k": (31, -0.5, 0.1, 15, False, "av"),
}


@pytest.mark.parametrize("name", sorted(QKX2_PARAMS))
@pytest.mark.parametrize("chunk", [1 << 30, 7 * 32])
def test_qkx2_search_matches_reference(name, chunk, monkeypatch):
    monkeypatch.setattr(kq, "_CHUNK_ELEMS", chunk)
    nmax, rmin, rdelta, nstep, use_mad, weights = QKX2_PARAMS[name]
    n = 16 if name == "q2_k" else 32
    x = _adversarial_columns(n)
    w = x.abs() if weights == "abs" else kq._sqrtf(kq._div(_ref_seqsum(x * x), 32.0)) + x.abs()
    ours = list(kq._make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad))
    ref = list(_ref_make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad))
    # The sign of a zero min comes from torch's amin over +-0 ties (either one, by vectorization), in
    # both; the file never sees it (the min's scale code is nearest_int(i * +-0) = 0 either way).
    ours[1], ref[1] = ours[1] + 0.0, ref[1] + 0.0
    for a, b, what in zip(ours, ref, ("scale", "min", "L")):
        assert _same_bits(a, b), what


@pytest.mark.parametrize("chunk", [1 << 30, 5 * 16])
def test_qx_search_matches_reference(chunk, monkeypatch):
    monkeypatch.setattr(kq, "_CHUNK_ELEMS", chunk)
    x = _adversarial_columns(16)
    for a, b, what in zip(kq._make_qx_quants_rmse1(x, 32), _ref_make_qx_quants_rmse1(x, 32), ("scale", "L")):
        assert _same_bits(a, b), what


def test_q3_search_matches_reference():
    x = _adversarial_columns(16)
    for a, b, what in zip(kq._make_q3_quants_rmse(x, 4), _ref_make_q3_quants_rmse(x, 4), ("scale", "L")):
        assert _same_bits(a, b), what


@pytest.mark.parametrize("nan", [False, True])
def test_first_absmax_matches_reference(nan):
    x = _adversarial_columns(16)
    if nan:  # NaN never wins (and sends the whole tensor through the C loop)
        x[3, 5] = float("nan")
    for dim in (0, -1):
        for a, b in zip(kq._first_absmax(x, dim), _ref_first_absmax(x, dim)):
            assert _same_bits(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_seqsum_is_sequential_fp32(threads):
    """``_seqsum_into`` relies on CPU ``index_add_`` adding rows in index order in fp32: data where any
    other order or precision (pairwise, fp64 accumulation) gives other bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(17)
        t = rng.standard_normal((32, 3, 5000)) * 10.0 ** rng.integers(-8, 9, (32, 1, 1))
        t[5] = -t[4]  # cancellations
        t[0, 0, :7] = -0.0
        t = torch.from_numpy(t.astype(np.float32))
        ref = _ref_seqsum(t)
        assert not torch.equal(ref, t.sum(0)) and not torch.equal(ref, t.double().sum(0).float())
        assert _same_bits(kq._seqsum(t), ref)
        assert _same_bits(kq._seqsum_into(torch.empty(1, 3, 5000), t), ref)
        z = torch.full((4, 9), -0.0)
        assert _same_bits(kq._seqsum(z), torch.zeros(9))  # 0 + -0.0 is +0.0, as in C
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_search_gives_the_same_bytes(name, monkeypatch):
    x = torch.from_numpy(np.concatenate([CASES[k] for k in sorted(CASES)]))
    fmt = get_format(name)
    whole = fmt.to_bytes(fmt.quantize(x))
    monkeypatch.setattr(kq, "_CHUNK_ELEMS", 1000)
    np.testing.assert_array_equal(fmt.to_bytes(fmt.quantize(x)), whole)


def _adversarial_rows() -> np.ndarray:
    """The adversarial sub-blocks laid out as rows of whole super-blocks (x 32 elements, repeated)."""
    x = _adversarial_columns(32).t().numpy().reshape(-1)
    x = np.concatenate([x, np.zeros((-len(x)) % 1024, np.float32)])
    return x.reshape(-1, 1024)


@pytest.mark.llama
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [1 << 30, 3000])
def test_bytes_match_llama_cpp_adversarial(ggml, name, chunk, monkeypatch):
    monkeypatch.setattr(kq, "_CHUNK_ELEMS", chunk)
    fmt, x = get_format(name), _adversarial_rows()
    ours = fmt.to_bytes(fmt.quantize(torch.from_numpy(x)))
    ref = _llama_quantize(ggml, fmt, x)
    assert not _first_bad_block(ours, ref, fmt), _first_bad_block(ours, ref, fmt)
