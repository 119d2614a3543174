"""The Triton k-quant kernel (qat/kernels/triton_kquant.py) gives bitwise ``fmt.dequantize(fmt._quantize_torch(w))``
(itself bitwise llama.cpp's reference encoder and decoder), with the same codes and scales: under the Triton CPU
interpreter (a subprocess with TRITON_INTERPRET=1; skipped without triton) and on CUDA (skipped without a GPU).
Also: ``KQuantFormat.fake``'s first-use check of the kernel (no triton needed)."""
import warnings

import pytest
import torch

NAMES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def edge_weights(seed: int = 0) -> torch.Tensor:
    """10 x 512 rows (20 super-blocks) of the cases the searches branch on."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 512, generator=g)  # rows 0-1: plain normal
    w[2] *= 0.02  # a real-ish scale
    w[3] *= 0.02
    w[3, 5], w[3, 300], w[3, 301] = 0.9, -1.7, 3.0  # outliers
    w[4, :256] = 0.0  # an all-zero super-block
    w[4, 256:288] = 0.0  # all-zero sub-blocks (16 and 32 wide)
    w[4, 300:310] = -0.0
    w[5, :32] = 0.37  # constant sub-blocks: max == min > 0 (min clipped to 0), < 0 (flat), mixed with zeros
    w[5, 32:64] = -0.21
    w[5, 64:80] = 0.05
    w[5, 256:512:2] = 0.0
    w[6, :256] = torch.randn(256, generator=g) * 1e-20  # tiny: below the 1e-15 group eps, x*x denormal
    w[6, 256:272] = 1e-20
    w[6, 272:288] = torch.randn(16, generator=g) * 1e-16
    w[6, 288:320] *= 1e-18
    # first-index absmax ties: +a and -a in one sub-block, both orders
    w[7, 3], w[7, 9] = 2.5, -2.5
    w[7, 40], w[7, 44] = -1.25, 1.25
    # a sub-block and its negation in one super-block: Q6_K's sub-block scales tie with opposite signs
    w[7, 256:272] = torch.randn(16, generator=g)
    w[7, 272:288] = -w[7, 256:272]
    w[7, 288:512] *= 0.1
    w[8] = w[8].abs()  # all positive
    w[9] = -w[9].abs() * 3  # all negative
    return w


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.float().cpu().view(torch.int32), b.float().cpu().view(torch.int32))


def _check_all(device: str, big: bool = False) -> None:
    from qat.formats.kquants import KQUANT_FORMATS
    from qat.kernels.triton_kquant import kquant_fake, kquant_quantize

    # the edge cases, then two rows with NaN / inf (unspecified values, but no crash, and super-blocks are
    # independent: the finite rows must still match)
    bad = torch.randn(2, 512) * 0.1
    bad[0, 7], bad[0, 300] = float("nan"), float("inf")
    bad[1, 100], bad[1, 400:420] = float("-inf"), float("nan")
    edge = torch.cat([edge_weights(), bad])
    n = 10  # finite rows
    cases = [("edge", edge), ("1x256 bf16", (torch.randn(1, 256) * 0.05).to(torch.bfloat16))]
    if big:
        g = torch.Generator().manual_seed(5)
        cases += [("3x512", torch.randn(3, 512, generator=g)), ("4x8x768", torch.randn(4, 8, 768, generator=g) * 0.02),
                  ("big", torch.randn(300, 1536, generator=g) * 0.03)]
    for name in NAMES:
        fmt = KQUANT_FORMATS[name]
        for label, w in cases:
            q_ref = fmt._quantize_torch(w)
            ref = fmt.dequantize(q_ref)
            if label == "edge":
                y, q = kquant_quantize(w.to(device), fmt)
                assert q.format == q_ref.format and q.shape == q_ref.shape, (name, label)
                assert torch.equal(q.codes[:n].cpu(), q_ref.codes[:n]), (name, label, "codes")
                assert torch.equal(q.scale[:n].cpu().view(torch.int16), q_ref.scale[:n].view(torch.int16)), (name, "d")
                if q_ref.zero is None:
                    assert q.zero is None
                else:
                    assert torch.equal(q.zero[:n].cpu().view(torch.int16), q_ref.zero[:n].view(torch.int16)), name
                assert sorted(q.extra) == sorted(q_ref.extra), (name, label)
                for k, v in q_ref.extra.items():
                    assert torch.equal(q.extra[k][:n].cpu(), v[:n]), (name, label, k)
                assert _same(fmt.dequantize(q)[:n], ref[:n]), (name, label)
                assert y.shape == w.shape
                y, ref = y[:n], ref[:n]
            else:
                y = kquant_fake(w.to(device), fmt)
            assert y.dtype == torch.float32 and y.device.type == torch.device(device).type
            assert _same(y, ref), (name, label, int((y.cpu() != ref).sum()))
    print("triton kquant checks passed")


def test_kernel_bitwise_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_triton_kquant import _check_all; _check_all('cpu')", "triton kquant checks passed")


@pytest.mark.gpu
def test_kernel_bitwise_cuda():
    pytest.importorskip("triton")
    _check_all("cuda", big=True)


@pytest.mark.gpu
def test_fake_uses_kernel_on_cuda(monkeypatch):
    pytest.importorskip("triton")
    from qat.formats import kquants
    from qat.kernels import triton_kquant

    monkeypatch.delenv("QAT_DISABLE_TRITON", raising=False)
    monkeypatch.setitem(kquants._TRITON, "checked", set())
    monkeypatch.setitem(kquants._TRITON, "off", set())
    calls = []
    real = triton_kquant.kquant_fake
    monkeypatch.setattr(triton_kquant, "kquant_fake", lambda w, fmt: calls.append(fmt.name) or real(w, fmt))
    w = (torch.randn(96, 512) * 0.02).cuda()
    for name in NAMES:
        fmt = kquants.KQUANT_FORMATS[name]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = fmt.fake(w)
        assert y.is_cuda and _same(y, fmt.dequantize(fmt._quantize_torch(w.cpu())))
    assert calls == NAMES and kquants._TRITON["checked"] == set(NAMES) and not kquants._TRITON["off"]


def _patch_kernel(monkeypatch, kernel):
    """Route ``fake`` of CPU tensors (``usable`` says yes) through a stand-in for the kernel (no triton needed)."""
    from qat.formats import kquants
    from qat.kernels import triton_kquant

    monkeypatch.setitem(kquants._TRITON, "checked", set())
    monkeypatch.setitem(kquants._TRITON, "off", set())
    monkeypatch.setattr(triton_kquant, "usable", lambda w, fmt: True)
    monkeypatch.setattr(triton_kquant, "kquant_fake", kernel)
    return kquants


def test_first_use_check_turns_a_wrong_kernel_off(monkeypatch):
    from qat.formats.kquants import Q4_K

    w = edge_weights(1)
    ref = Q4_K.dequantize(Q4_K._quantize_torch(w))
    calls = []

    def wrong(x, fmt):  # one ulp off in one element
        calls.append(fmt.name)
        y = fmt.dequantize(fmt._quantize_torch(x)).clone()
        y.view(-1).view(torch.int32)[3] += 1
        return y

    kquants = _patch_kernel(monkeypatch, wrong)
    with pytest.warns(RuntimeWarning, match="q4_k.*qat's own path is used from now on"):
        y = Q4_K.fake(w)
    monkeypatch.undo()
    assert _same(y, ref)  # torch's result, not the kernel's
    assert calls == ["q4_k"]
    kquants = _patch_kernel(monkeypatch, wrong)
    kquants._TRITON["checked"].add("q4_k")
    kquants._TRITON["off"].add("q4_k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: no second warning, and the kernel is not called again
        y = Q4_K.fake(w)
    monkeypatch.undo()
    assert _same(y, ref) and calls == ["q4_k"]


def test_first_use_check_keeps_a_right_kernel(monkeypatch):
    from qat.formats.kquants import Q6_K

    w = edge_weights(2)
    ref = Q6_K.dequantize(Q6_K._quantize_torch(w))
    calls = []

    def right(x, fmt):
        calls.append(fmt.name)
        return fmt.dequantize(fmt._quantize_torch(x))

    kquants = _patch_kernel(monkeypatch, right)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y1, y2 = Q6_K.fake(w), Q6_K.fake(w)
    checked, off = set(kquants._TRITON["checked"]), set(kquants._TRITON["off"])
    monkeypatch.undo()
    assert _same(y1, ref) and _same(y2, ref)
    assert calls == ["q6_k", "q6_k"] and checked == {"q6_k"} and not off


def test_usable_respects_switch_and_device(monkeypatch):
    from qat.formats.kquants import Q4_K
    from qat.kernels import triton_kquant

    w = torch.zeros(2, 256)
    assert not triton_kquant.usable(w, Q4_K)  # CPU tensors keep the torch / llama.cpp path
    if triton_kquant.HAS_TRITON and torch.cuda.is_available():
        assert triton_kquant.usable(w.cuda(), Q4_K)
        assert not triton_kquant.usable(torch.zeros(2, 96).cuda(), Q4_K)
        monkeypatch.setenv("QAT_DISABLE_TRITON", "1")
        assert not triton_kquant.usable(w.cuda(), Q4_K)
