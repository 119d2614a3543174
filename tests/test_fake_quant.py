"""STE and LSQ gradients against hand-derived values; forward equals the format's round trip bitwise."""
import math

import pytest
import torch

from qat.fake_quant import fake_quantize, fake_quantize_lsq
from qat.formats import get_format
from qat.formats.base import to_blocks


def test_forward_is_dequantize_of_quantize_bitwise():
    for name in ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "int4_g32", "int4_asym_g32", "int8_channel"]:
        fmt = get_format(name)
        w = torch.randn(4, 64)
        scale, zero = fmt.choose_params(to_blocks(w, fmt.block))
        out = fake_quantize(w, fmt, scale, zero)
        ref = fmt.dequantize(fmt.quantize(w))
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), name


def test_ste_passes_gradient_and_zeroes_it_outside_clip_range():
    # Q4_0, one block: max = -8 gives d = 1, id = 1. Codes are floor(x + 8.5) clamped to [0, 15]:
    # x = 7.4 -> 15 (inside), x = 7.6 -> 16 -> clamped (outside), x = -8 -> 0 (inside).
    fmt = get_format("q4_0")
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = -8.0, 7.4, 7.6, 0.3
    x.requires_grad_(True)
    scale, _ = fmt.choose_params(to_blocks(x.detach(), 32))
    assert float(scale) == 1.0
    up = torch.arange(1, 33, dtype=torch.float32).reshape(1, 32)
    out = fake_quantize(x, fmt, scale)
    assert out[0, 2] == 7.0 and out[0, 1] == 7.0 and out[0, 3] == 0.0
    out.backward(up)
    expected = up.clone()
    expected[0, 2] = 0.0
    assert torch.equal(x.grad, expected)


def test_ste_no_gradient_to_observer_scale():
    fmt = get_format("int4_g32")
    w = torch.randn(2, 32, requires_grad=True)
    scale, _ = fmt.choose_params(to_blocks(w.detach(), 32))
    scale.requires_grad_(True)
    fake_quantize(w, fmt, scale).sum().backward()
    assert scale.grad is None


def test_lsq_gradients_symmetric_int():
    # int4 sym, group 2: w = [0.26, 10.0], s = 0.1 (stored fp16: 0.0999755859375)
    # code 0: round(0.26/s16) = 3, inside: dL/ds += u0 * (3 - 0.26/s16), dL/dw0 = u0
    # code 1: round(100.02) = 100 -> clamped to 7: dL/ds += u1 * 7, dL/dw1 = 0
    # LSQ gradient scale g = 1/sqrt(N * Qp) = 1/sqrt(2 * 7)
    fmt = get_format("int4_g2")
    w = torch.tensor([[0.26, 10.0]], requires_grad=True)
    s = torch.tensor([[0.1]], requires_grad=True)
    out = fake_quantize_lsq(w, fmt, s)
    s16 = float(torch.tensor(0.1).half())
    assert torch.allclose(out, torch.tensor([[3 * s16, 7 * s16]]))
    u0, u1 = 0.5, -2.0
    out.backward(torch.tensor([[u0, u1]]))
    g = 1 / math.sqrt(2 * 7)
    assert torch.equal(w.grad, torch.tensor([[u0, 0.0]]))
    assert math.isclose(float(s.grad), g * (u0 * (3 - 0.26 / s16) + u1 * 7), rel_tol=1e-5)


def test_lsq_gradients_asymmetric_zero_point():
    # int4 asym, group 2, codes in [-8, 7]: w = [0.0, 2.0], s = 0.1, z = -8 (learned, rounded in forward)
    # code 0: round(0/s16) + -8 = -8 -> inside; code 1: round(20.005) - 8 = 12 -> clamped to 7.
    # inside:  ds = (w_hat - w)/s, dz = 0;   clamped: ds = w_hat/s = (7 - z), dz = -s
    fmt = get_format("int4_asym_g2")
    w = torch.tensor([[0.0, 2.0]], requires_grad=True)
    s = torch.tensor([[0.1]], requires_grad=True)
    z = torch.tensor([[-8.2]], requires_grad=True)
    out = fake_quantize_lsq(w, fmt, s, z)
    s16 = float(torch.tensor(0.1).half())
    assert torch.allclose(out, torch.tensor([[0.0, 15 * s16]]))
    u = torch.tensor([[1.5, 3.0]])
    out.backward(u)
    g = 1 / math.sqrt(2 * 15)
    assert torch.equal(w.grad, torch.tensor([[1.5, 0.0]]))
    assert math.isclose(float(s.grad), g * (1.5 * (0.0 - 0.0) / s16 + 3.0 * 15), rel_tol=1e-5)
    assert math.isclose(float(z.grad), g * (3.0 * -s16), rel_tol=1e-5)


def test_lsq_gradients_gguf_min_format():
    # Q4_1: w_hat = d*q + m. Clamped codes: dd = q, dm = 1; inside: dd = (w_hat - w)/d, dm = 0.
    fmt = get_format("q4_1")
    w = torch.linspace(0.0, 1.0, 32).reshape(1, 32)
    w[0, -1] = 5.0  # beyond m + 15 d: clamped to 15
    w.requires_grad_(True)
    d = torch.tensor([[1 / 15]], requires_grad=True)
    m = torch.tensor([[0.0]], requires_grad=True)
    out = fake_quantize_lsq(w, fmt, d, m)
    u = torch.ones(1, 32)
    out.backward(u)
    d16 = float(d.detach().half())
    codes = torch.floor(w.detach() * (1 / d.detach()) + 0.5).clamp(0, 15)
    inside = torch.arange(32) < 31
    g = 1 / math.sqrt(32 * 15)
    exp_dd = g * (float(((codes * d16 - w.detach()) / d16)[0, inside].sum()) + 15.0)
    assert math.isclose(float(d.grad), exp_dd, rel_tol=1e-4)
    assert math.isclose(float(m.grad), g * 1.0, rel_tol=1e-6)
    assert torch.equal(w.grad, inside.float().reshape(1, 32))


@pytest.mark.parametrize("name", ["q4_0", "int4_g32", "int4_asym_g32", "q5_1"])
def test_lsq_forward_matches_quantize_with(name):
    fmt = get_format(name)
    w = torch.randn(3, 64)
    scale, zero = fmt.choose_params(to_blocks(w, fmt.block))
    scale = scale * 0.9
    out = fake_quantize_lsq(w, fmt, scale, zero)
    ref = fmt.dequantize(fmt.quantize_with(w, scale, zero))
    assert torch.equal(out, ref)
