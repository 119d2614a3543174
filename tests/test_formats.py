"""Numerics: GGUF legacy types bitwise against gguf-py's reference, integer formats against torchao."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qat.formats import QuantError, get_format

GGML = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def adversarial(rows=8, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0                                   # all-zero block
    w[1, 5] = 1e4                                   # one huge outlier per block
    w[1, 40] = -1e4
    w[2, :32] = torch.arange(32) - 16.0              # integer grid: ties at .5 after scaling
    w[2, 32:64] = (torch.arange(32) - 15.5) / 8      # exact halves
    w[3, :32] = 1e-7                                 # below fp16's smallest normal: scale underflows
    w[4, :32] = torch.linspace(-1, 1, 32)
    w[5, :] = w[5, :].abs()                          # one-sided blocks (min-max formats' min > 0)
    w[6, :32] = 3.0                                  # constant block
    w[7, :32] = -2.5 * torch.ones(32)
    return w


@pytest.mark.parametrize("name", GGML)
@pytest.mark.parametrize("seed", [0, 1])
def test_ggml_bytes_and_values_match_gguf(name, seed):
    fmt = get_format(name)
    qtype = getattr(T, name.upper())
    w = adversarial(seed=seed) if seed == 0 else torch.randn(16, 256, generator=torch.Generator().manual_seed(seed))
    q = fmt.quantize(w)
    ref = gguf_quantize(w.numpy(), qtype)
    assert fmt.to_bytes(q).tobytes() == ref.tobytes()
    ours = fmt.dequantize(q).numpy()
    assert np.array_equal(ours.view(np.uint32), gguf_dequantize(ref, qtype).view(np.uint32))
    back = fmt.from_bytes(ref, tuple(w.shape))
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)


@pytest.mark.parametrize("name", GGML)
def test_ggml_codes_use_fp32_scale_and_store_fp16(name):
    fmt = get_format(name)
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    q = fmt.quantize(w)
    assert q.scale.dtype == torch.float16
    blocks = w.reshape(4, 2, 32)
    scale32, zero32 = fmt.choose_params(blocks)
    assert scale32.dtype == torch.float32
    # codes from the fp32 scale; a different (fp16) scale would change some codes on random data
    assert torch.equal(q.codes.reshape(4, 2, 32).float(), fmt.encode(blocks, scale32, zero32))


@pytest.mark.parametrize("name", GGML + ["int4_g32", "int8_asym_channel"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_an_error(name, bad):
    w = torch.randn(2, 64)
    w[1, 3] = bad
    with pytest.raises(QuantError, match="NaN|Inf"):
        get_format(name).quantize(w)


def test_block_size_mismatch_is_an_error():
    with pytest.raises(QuantError, match="multiple of 32"):
        get_format("q4_0").quantize(torch.randn(2, 48))
    with pytest.raises(QuantError, match="multiple of the block size 128|multiple of 128"):
        get_format("int4_g128").quantize(torch.randn(2, 64))


def test_unknown_format_suggests():
    with pytest.raises(QuantError, match="Did you mean q4_0"):
        get_format("q4_00")


@pytest.mark.parametrize("name,granularity", [("int4_g32", "group"), ("int8_channel", "channel"),
                                               ("int4_asym_g64", "group"), ("int2_g32", "group"),
                                               ("int3_asym_channel", "channel"), ("int8_tensor", "tensor"),
                                               ("int6_asym_tensor", "tensor")])
def test_int_formats_match_torchao(name, granularity):
    from torchao.quantization.quant_primitives import (MappingType, choose_qparams_affine, dequantize_affine,
                                                       quantize_affine)
    fmt = get_format(name)
    # (the 1e-7 block is left out: we floor scales at fp32 eps so the fp16 scale never underflows to 0,
    # torchao lets it reach 1.3e-8, which fp16 stores as 0)
    w = adversarial(rows=8, cols=128, seed=0)[[2, 4, 5, 6]] if "asym" not in name else torch.randn(4, 128)
    q = fmt.quantize(w)
    block = {"group": (1, fmt.group_size), "channel": (1, 128), "tensor": (4, 128)}[granularity]
    mt = MappingType.SYMMETRIC if fmt.symmetric else MappingType.ASYMMETRIC
    scale, zp = choose_qparams_affine(w, mt, block, torch.int32, fmt.qmin, fmt.qmax,
                                      scale_dtype=torch.float32, zero_point_dtype=torch.float32)
    assert torch.allclose(q.scale.float().flatten(), scale.to(torch.float16).float().flatten())
    s16 = q.scale.float().reshape(scale.shape) if granularity != "tensor" else q.scale.float()[:1, :1]
    zero = None if fmt.symmetric else q.zero.reshape(zp.shape) if granularity != "tensor" else q.zero[:1, :1]
    codes = quantize_affine(w, block, s16, zero if zero is not None else torch.zeros_like(s16), torch.int32,
                            fmt.qmin, fmt.qmax)
    assert torch.equal(codes.to(torch.int16), q.codes)
    deq = dequantize_affine(codes, block, s16, zero if zero is not None else torch.zeros_like(s16), torch.int32,
                            fmt.qmin, fmt.qmax, output_dtype=torch.float32)
    assert torch.allclose(deq, fmt.dequantize(q), rtol=0, atol=1e-7)


def test_int_codes_cover_signed_range_and_error_is_bounded():
    fmt = get_format("int4_g32")
    w = torch.randn(8, 64)
    q = fmt.quantize(w)
    assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
    err = (fmt.dequantize(q) - w).abs().reshape(8, 2, 32)
    s = q.scale.float().unsqueeze(-1)
    inside = (q.codes.reshape(8, 2, 32) < 7)  # amax/7.5 maps the largest positive value to 7.5 -> clamped to 7
    assert (err[inside] <= (s / 2 + 1e-6).expand_as(err)[inside]).all()
    assert (err <= s + 1e-6).all()


def test_no_negative_zero_in_dequantized_weights():
    # Runtimes turn integer codes into +0.0; rounding a tiny negative gives -0.0, which must not leak.
    # (Q4_0/Q5_0 multiply by a negative d, so llama.cpp itself makes -0.0 there: covered bitwise above.)
    for name in ["q8_0", "int4_g32", "int8_channel"]:
        fmt = get_format(name)
        w = torch.full((1, 32), -1e-9)
        w[0, 0] = 1.0
        out = fmt.dequantize(fmt.quantize(w))
        assert not torch.signbit(out[out == 0]).any(), name


def test_per_token_activation_format_is_per_row():
    fmt = get_format("int8_asym_token")
    x = torch.randn(5, 64) * torch.arange(1, 6).unsqueeze(1)
    q = fmt.quantize(x)
    assert q.scale.shape == (5, 1)
    for r in range(5):  # each row quantized on its own
        qr = fmt.quantize(x[r : r + 1])
        assert torch.equal(qr.codes, q.codes[r : r + 1])
