"""The export's fast paths against the straightforward code they replace, bitwise, on adversarial input:
GGUF legacy parameters (amax/amin instead of argmax), integer codes in fewer passes, word-wise byte
packing, layers converted in parallel, and bulk GGUF metadata arrays."""
import enum
import struct

import numpy as np
import pytest
import torch

import qat
from qat.formats import get_format
from qat.formats.base import div, to_blocks
from qat.formats.ggml import _safe_inv, roundf

GGML = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def adversarial_blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(32, generator=g) * 0.05 for _ in range(4)]
    z = torch.zeros(32)
    tie_pos = torch.randn(32, generator=g) * 0.1
    tie_pos[3], tie_pos[9] = 0.5, -0.5                     # equal magnitude, positive first
    tie_neg = tie_pos.clone()
    tie_neg[3], tie_neg[9] = -0.5, 0.5                     # negative first
    neg_zero = torch.full((32,), -0.0)
    lead_neg_zero = z.clone()
    lead_neg_zero[0] = -0.0                                # all zero, but the first is -0.0
    mixed_zero = torch.tensor([0.0, -0.0] * 16)
    halves = (torch.arange(32) - 15.5) / 8                 # exact .5 after scaling
    grid = torch.arange(32) - 16.0
    q8_ties = torch.tensor([127.0, -127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, BELOW_HALF, -BELOW_HALF,
                            126.5, -126.5, 0.25, -0.75, 3.5, 4.5] * 2)  # Q8_0: d = 1, codes = roundf(x)
    underflow = torch.full((32,), 1e-7)                    # fp16 scale underflows to 0
    subnormal = torch.full((32,), 1e-39)                   # fp32 1/d overflows to inf
    subnormal[::3] = 0.0
    tiny = torch.full((32,), 1e-45)
    outlier = torch.randn(32, generator=g) * 0.01
    outlier[7] = -1e4
    one_sided = (torch.randn(32, generator=g) * 0.05).abs() + 0.01
    const = torch.full((32,), -2.5)
    blocks = [*rows, z, tie_pos, tie_neg, neg_zero, lead_neg_zero, mixed_zero, halves, grid, q8_ties,
              underflow, subnormal, tiny, outlier, one_sided, const, -one_sided]
    return torch.stack(blocks).reshape(4, -1)  # 4 rows of 5 blocks


def reference_params(fmt, blocks):
    """The former rules: argmax of |x| for the signed maximum, amax of |x| for Q8_0."""
    if fmt.name in ("q4_0", "q5_0"):
        idx = blocks.abs().argmax(dim=-1, keepdim=True)
        return div(blocks.gather(-1, idx).squeeze(-1), -float(fmt.offset)), None
    if fmt.name == "q8_0":
        return div(blocks.abs().amax(-1), 127.0), None
    return fmt.choose_params(blocks)


def reference_to_bytes(fmt, q) -> np.ndarray:
    """The former packing: torch.cat of the fields, bit by bit for Q5's high bits."""
    codes = q.codes.reshape(*q.codes.shape[:-1], -1, 32)
    lead = codes.shape[:-1]
    parts = [q.scale.to(torch.float16).reshape(*lead, 1).view(torch.uint8)]
    if fmt.zero_kind == "min":
        parts.append(q.zero.to(torch.float16).reshape(*lead, 1).view(torch.uint8))
    if fmt.bits == 8:
        parts.append(codes.to(torch.int8).view(torch.uint8))
    else:
        c = codes.to(torch.uint8)
        if fmt.bits == 5:
            hi_bits = (c >> 4).to(torch.int32)
            parts.append((hi_bits << torch.arange(32, dtype=torch.int32)).sum(-1, keepdim=True, dtype=torch.int32)
                         .view(torch.uint8))
        low = c & 0xF
        parts.append(low[..., :16] | (low[..., 16:] << 4))
    return torch.cat(parts, dim=-1).reshape(*q.shape[:-1], -1).numpy()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("name", GGML)
def test_params_equal_the_argmax_rule(name):
    fmt = get_format(name)
    blocks = to_blocks(adversarial_blocks(), 32)
    for ours, ref in zip(fmt.choose_params(blocks), reference_params(fmt, blocks)):
        assert (ours is None and ref is None) or same_bits(ours, ref)
    # non-finite input (the fake quantizer sees it unchecked): same scales, NaN where NaN
    bad = blocks.clone()
    bad[0, 0, 4], bad[1, 1, 0], bad[1, 1, 1], bad[2, 2, 5] = float("inf"), float("inf"), float("-inf"), float("nan")
    for ours, ref in zip(fmt.choose_params(bad), reference_params(fmt, bad)):
        if ours is not None:
            assert torch.equal(ours.isnan(), ref.isnan())
            assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(ref))


@pytest.mark.parametrize("name", GGML)
@pytest.mark.parametrize("scales", ["dynamic", "learned"])
def test_integer_codes_equal_encode(name, scales):
    fmt = get_format(name)
    blocks = to_blocks(adversarial_blocks(), 32)
    scale, zero = fmt.choose_params(blocks)
    if scales == "learned":  # any scale an observer may store: too small (clamps), 0, negative, subnormal
        g = torch.Generator().manual_seed(1)
        scale = scale * torch.rand(scale.shape, generator=g) * 2
        scale[0, 0], scale[0, 1], scale[1, 0], scale[1, 1] = 0.0, -scale[1, 1], 1e-40, 1e-3
    ref = fmt.encode(blocks, scale, zero)
    ours = fmt.encode_int(blocks, scale, zero)
    finite = ref.isfinite()
    assert torch.equal(ours[finite], ref[finite].to(torch.int16))
    # where 0 * inf (a subnormal scale) makes a NaN, both store the same integer
    assert torch.equal(fmt.pack(blocks.shape, ours, scale, zero).codes, fmt.pack(blocks.shape, ref, scale, zero).codes)


def test_q8_0_rounding_is_roundf_near_every_half():
    fmt = get_format("q8_0")
    k = torch.arange(-128, 128, dtype=torch.float32)
    y = torch.cat([k + 0.5, k - 0.5, k + BELOW_HALF, k - BELOW_HALF, k,
                   torch.nextafter(k + 0.5, k + 1), torch.nextafter(k + 0.5, k)]).clamp(-128, 127)
    y = y[: len(y) // 32 * 32]
    blocks = y.reshape(-1, 32)
    scale = torch.ones(blocks.shape[0])  # x * (1/d) == x
    assert torch.equal(fmt.encode_int(blocks, scale, None), roundf(blocks).clamp(-128, 127).to(torch.int16))
    assert torch.equal(fmt.encode_int(blocks, scale, None), fmt.encode(blocks, scale, None).to(torch.int16))


@pytest.mark.parametrize("name", GGML)
def test_byte_packing_equals_concatenation(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(2)
    q = fmt.quantize(torch.randn(6, 256, generator=g))
    q.codes = torch.randint(fmt.qmin, fmt.qmax + 1, q.codes.shape, generator=g).to(torch.int16)  # every code
    assert np.array_equal(fmt.to_bytes(q), reference_to_bytes(fmt, q))
    q = fmt.quantize(adversarial_blocks())
    assert np.array_equal(fmt.to_bytes(q), reference_to_bytes(fmt, q))
    back = fmt.from_bytes(fmt.to_bytes(q), q.shape)
    assert torch.equal(back.codes, q.codes)


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0", "q4_k"])
def test_parallel_convert_equals_serial(scheme):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(5)])
    model[0].weight.data[:, :32] = 0.0
    qat.prepare(model, scheme)
    threads_before = torch.get_num_threads()
    serial = qat.convert(model)
    parallel = qat.convert(model, threads=3)
    assert torch.get_num_threads() == threads_before
    assert serial.keys() == parallel.keys()
    for name, q in serial.items():
        p = parallel[name]
        assert torch.equal(q.codes, p.codes) and same_bits(q.scale.float(), p.scale.float()), name
    packed = qat.convert(model, threads=2, pack=lambda name, q: (name, get_format(q.format).to_bytes(q)))
    for name, (pname, data) in packed.items():
        assert pname == name
        assert np.array_equal(data, get_format(serial[name].format).to_bytes(serial[name]))


class _Kind(enum.IntEnum):
    A = 1
    B = 3


@pytest.mark.parametrize("value", [
    ["a", "", "Ġthe", "日本語", "🦙", "a b", "\x00"] * 50,
    [b"raw", "text", b"", b"\xff\xfe"],
    [0, -1, 2**31 - 1, -(2**31), 7],
    [_Kind.A, _Kind.B, 5],
    [0.0, -0.0, 1.5, -1000.0, 1e-45, 3.4e38, 0.1],
    [True, False, True],
    [[1, 2], [3]],
])
def test_metadata_arrays_pack_as_gguf_does(value):
    import gguf
    from qat.export.gguf import _writer_class
    ours, ref = _writer_class()(None, "llama"), gguf.GGUFWriter(None, "llama")
    assert ours._pack_val(value, gguf.GGUFValueType.ARRAY, add_vtype=True) == \
        ref._pack_val(value, gguf.GGUFValueType.ARRAY, add_vtype=True)


@pytest.mark.parametrize("value", [[2**31], [1e39, 1.0], ["a", 1]])
def test_metadata_arrays_refused_as_gguf_refuses(value):
    import gguf
    from qat.export.gguf import _writer_class
    with pytest.raises((struct.error, OverflowError, ValueError)) as theirs:
        gguf.GGUFWriter(None, "llama")._pack_val(value, gguf.GGUFValueType.ARRAY, add_vtype=True)
    with pytest.raises(theirs.type):
        _writer_class()(None, "llama")._pack_val(value, gguf.GGUFValueType.ARRAY, add_vtype=True)


def test_safe_inverse_of_subnormal_scale_is_inf():
    # the case the NaN branch of test_integer_codes_equal_encode exercises
    assert torch.isinf(_safe_inv(torch.tensor([1e-40]))).all()
