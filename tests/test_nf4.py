"""NF4 must agree bitwise with bitsandbytes (CPU path): codes, double-quant state, dequantized values."""
from __future__ import annotations

import pytest
import torch

from qat.formats import QuantError, get_format
from qat.formats.nf4 import (
    DQ_BLOCK,
    NF4,
    NF4_BOUNDS,
    NF4_CODE,
    NF4Format,
    dequantize_bnb,
    dynamic_map,
    from_bnb,
    pack_nibbles,
    to_bnb,
    unpack_nibbles,
)

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64,), (3, 128), (2, 5, 192), (40, 512)]  # 1, 6, 30, 320 blocks (320: nested block + remainder)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bit patterns (so -0.0 != 0.0), same dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    ints = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
    va, vb = a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()])
    bad = (va != vb).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} mismatches, first at {bad[0].tolist()}: {a[tuple(bad[0])]} vs {b[tuple(bad[0])]}"


def bnb_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bnb's fp32 -> dtype output cast on this CPU. With AVX512-BF16 it converts with VCVTNEPS2BF16,
    which treats subnormal inputs as (signed) zero; otherwise round-to-nearest-even, as Tensor.to."""
    if dtype == torch.bfloat16 and F.has_avx512bf16():
        x = torch.where(x.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(x).copysign(x), x)
    return x.to(dtype)


def check_against_bnb(w: torch.Tensor, double_quant: bool) -> None:
    """Quantize with us and with bnb; every stored number and the dequantized tensor must agree."""
    fmt = NF4Format(double_quant=double_quant)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = fmt.quantize(w)
    block_shape = (*w.shape[:-1], w.shape[-1] // 64)

    assert q.codes.dtype == torch.int16 and q.codes.shape == w.shape
    assert_bitwise(q.codes, unpack_nibbles(packed, tuple(w.shape)))
    assert_bitwise(pack_nibbles(q.codes), packed)
    assert q.scale.dtype == torch.float32 and q.scale.shape == block_shape
    if double_quant:
        assert_bitwise(q.extra["absmax_codes"].reshape(-1), qs.absmax)
        assert_bitwise(q.extra["absmax_scale"], qs.state2.absmax)
        assert_bitwise(q.extra["offset"], qs.offset)
    else:
        assert q.extra == {}
        assert_bitwise(q.scale.reshape(-1), qs.absmax)

    ref = F.dequantize_4bit(packed, qs).reshape(w.shape)  # in w.dtype; bnb's CPU kernel returns 1-D input as (1, n)
    ours = fmt.dequantize(q)
    assert ours.dtype == torch.float32
    assert_bitwise(bnb_cast(ours, w.dtype), ref)
    assert_bitwise(fmt.fake(w), ours)
    assert_bitwise(bnb_cast(dequantize_bnb((packed, qs)), w.dtype), ref)
    if w.dtype == torch.float32:
        assert_bitwise(dequantize_bnb((packed, qs)), ref)

    back = from_bnb(packed, qs)
    assert back.shape == q.shape and back.format == "nf4"
    assert_bitwise(back.codes, q.codes)
    assert_bitwise(back.scale, q.scale)
    assert sorted(back.extra) == sorted(q.extra)
    for k in q.extra:
        assert_bitwise(back.extra[k], q.extra[k])

    packed2, qs2 = to_bnb(q, dtype=w.dtype)
    assert_bitwise(packed2, packed)
    assert_bitwise(F.dequantize_4bit(packed2, qs2).reshape(w.shape), ref)


def test_codebooks_are_bnbs():
    assert_bitwise(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert_bitwise(dynamic_map(), F.create_dynamic_map())


def test_registered():
    assert get_format("nf4") is NF4 and NF4.bits == 4 and NF4.block == 64 and NF4.double_quant


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_matches_bnb(shape, dtype, double_quant):
    g = torch.Generator().manual_seed(sum(shape) * 7 + DTYPES.index(dtype))
    w = (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 0.1).to(dtype)
    check_against_bnb(w, double_quant)


def _adversarial(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 256, generator=g)
    if name == "all_zero":
        return torch.zeros(4, 128)
    if name == "zero_blocks":  # some blocks all zero, some rows too
        w[:, 64:128] = 0
        w[3] = 0
        return w
    if name == "outlier":
        w[5, 17] = 1e4
        return w
    if name == "equal_absmax":  # every block's absmax is 1: absmax - offset is exactly zero
        w = w.clamp(-0.9, 0.9)
        w[:, ::64] = torch.where(torch.arange(8).unsqueeze(1) % 2 == 0, 1.0, -1.0)
        return w
    if name == "tiny":  # subnormal absmax: below bnb's 1e-38 clamp, so codes shrink toward 0 but not all to 0
        w[:2] *= 1e-40
        w[2:4] *= 2e-39
        w[4:6] *= 1e-30
        return w
    if name == "huge":
        return w * 1e30
    if name == "ties":  # absmax 1 (so scaled == w exactly): codebook midpoints, codebook values, neighbours
        b = NF4_BOUNDS
        vals = torch.cat([b, b.nextafter(torch.full_like(b, 2)), b.nextafter(torch.full_like(b, -2)), NF4_CODE])
        vals = torch.cat([torch.ones(1), vals, -vals])  # 1 + 2 * 61 = 123 values
        row = torch.cat([vals, torch.zeros(128 - vals.numel())])
        row = torch.stack([row, row.roll(64)]).reshape(-1)  # second block starts with the 1.0 too
        return torch.stack([row, row * 4.0, row * 0.25, -row])  # power-of-two absmax keeps ties exact
    raise KeyError(name)


ADVERSARIAL = ["all_zero", "zero_blocks", "outlier", "equal_absmax", "tiny", "huge", "ties"]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_matches_bnb(name, dtype, double_quant):
    check_against_bnb(_adversarial(name).to(dtype), double_quant)


def test_ties_take_the_lower_code():
    """A value exactly on the midpoint of codes i and i+1 gets code i (bnb's bucketize rule)."""
    w = torch.cat([torch.ones(1), NF4_BOUNDS, torch.zeros(64 - 1 - NF4_BOUNDS.numel())]).unsqueeze(0)
    packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    bnb_codes = unpack_nibbles(packed, tuple(w.shape))[0, 1:16]
    ours = NF4.quantize(w).codes[0, 1:16]
    assert_bitwise(ours, bnb_codes)
    assert ours.tolist() == list(range(15))


def test_nested_quantizer_matches_bnb_blockwise():
    """The absmax quantizer alone, on inputs that hit every one of bnb's 65536 bins and the map's midpoints."""
    from qat.formats.nf4 import _quantize_dynamic

    bins = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    edges = (torch.arange(1, 65536, dtype=torch.float64) - 0.5) / 65535 * 2 - 1  # where the bin index steps
    dm = dynamic_map()
    mids = (dm[:-1] + dm[1:]) / 2
    x = torch.cat([bins, edges.float(), edges.float().nextafter(torch.tensor(2.0)), mids, torch.randn(4096)])
    x = torch.cat([x, torch.zeros(-x.numel() % DQ_BLOCK)]).reshape(-1, DQ_BLOCK)
    x[:, 0] = 1.0  # blockmax 1: values reach the bins unscaled
    x[-3:] *= torch.tensor([[3.0], [1e-3], [0.0]])  # a scaled block, a small one, an all-zero one
    x = x.reshape(-1)[:-5]  # a partial last block
    ref, state = F.quantize_blockwise(x, blocksize=DQ_BLOCK)
    codes, blockmax = _quantize_dynamic(x)
    assert_bitwise(codes, ref)
    assert_bitwise(blockmax, state.absmax)
    assert_bitwise(F.dequantize_blockwise(ref, state), dm[codes.long()] * blockmax.repeat_interleave(DQ_BLOCK)[: x.numel()])


def test_params4bit_roundtrip():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    assert_bitwise(dequantize_bnb(p), F.dequantize_4bit(p.data, p.quant_state))
    assert_bitwise(dequantize_bnb(p), NF4.fake(w))


def test_bnb_helpers_reject_what_they_cannot_read():
    w = torch.randn(32, 128)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(QuantError, match="nf4"):
        dequantize_bnb((packed, qs))
    packed, qs = F.quantize_4bit(w, blocksize=128, quant_type="nf4")
    assert_bitwise(dequantize_bnb((packed, qs)), F.dequantize_4bit(packed, qs))  # any blocksize dequantizes
    with pytest.raises(QuantError, match="blocksize"):
        from_bnb(packed, qs)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    qs.packing_format_for_cpu = True
    with pytest.raises(QuantError, match="CPU inference layout"):
        dequantize_bnb((packed, qs))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(bad):
    w = torch.randn(2, 64)
    w[1, 5] = bad
    with pytest.raises(QuantError, match="NaN"):
        NF4.quantize(w)


@pytest.mark.parametrize("shape", [(3, 65), (), (0, 64)], ids=str)
def test_bad_shape_raises(shape):
    with pytest.raises(QuantError):
        NF4.quantize(torch.ones(shape))


def test_nibble_packing_order():
    codes = torch.arange(16, dtype=torch.int16).repeat(4)
    packed = pack_nibbles(codes)
    assert packed.shape == (32, 1) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == (0 << 4) | 1 and packed[1, 0].item() == (2 << 4) | 3
    assert_bitwise(unpack_nibbles(packed, (4, 16)), codes.reshape(4, 16))
