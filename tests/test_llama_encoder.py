"""K-quants encoded by llama.cpp's own C encoder (qat/formats/llama_encoder.py, used by KQuantFormat where
llama-cpp-python is installed): the same QTensor as ours, field by field and byte by byte; training and
export give the same bits with either encoder; a disagreeing llama.cpp is caught by the sample check and
ours takes over."""
import importlib.util

import numpy as np
import pytest
import torch

import qat
from qat.formats import get_format, ggml, kquants
from tiny_lm import bpe_tokenizer, tiny_llama

pytestmark = [pytest.mark.llama,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")]

KQ = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.fixture(autouse=True)
def _llama_on(monkeypatch):
    monkeypatch.setenv("QAT_GGML_QUANTIZE", "1")
    monkeypatch.setitem(kquants._LLAMA, "off", False)
    monkeypatch.setitem(kquants._LLAMA, "calls", {})
    monkeypatch.setitem(kquants._LLAMA, "dequant_checked", set())
    monkeypatch.setitem(kquants._LLAMA, "dequant_off", False)
    monkeypatch.setitem(ggml._LLAMA, "off", False)
    monkeypatch.setitem(ggml._LLAMA, "calls", {})


def _weights(rows=24, cols=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1] = 0.0  # all-zero super-blocks
    w[2, :256] = 0.3  # a constant one
    w[3, 5] = 4.0  # an outlier
    w[4] = torch.rand(cols, generator=g)  # all positive (the min-0 branch of Q2_K/Q4_K/Q5_K)
    return w


def _same(a, b):
    assert a.shape == b.shape and torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale.view(torch.int16), b.scale.view(torch.int16))
    assert (a.zero is None) == (b.zero is None)
    if a.zero is not None:
        assert torch.equal(a.zero.view(torch.int16), b.zero.view(torch.int16))
    assert a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)


@pytest.mark.parametrize("name", KQ)
def test_llama_cpp_encoder_equals_ours(name):
    fmt = get_format(name)
    for seed in range(3):
        w = _weights(seed=seed)
        fast = fmt._quantize_llama(w)
        assert fast is not None
        _same(fast, fmt._quantize_torch(w))
        assert torch.equal(fmt.fake(w), fmt.dequantize(fmt._quantize_torch(w)))
    w3 = _weights(rows=12).reshape(3, 4, 768)  # leading dims kept
    _same(fmt._quantize_llama(w3), fmt._quantize_torch(w3))
    assert not kquants._LLAMA["off"]


def test_training_and_export_equal_with_either_encoder(monkeypatch, tmp_path):
    """q4_k_m QAT on a 256-wide model: losses, gradients and the exported file are the same bits."""
    from qat.export import export_gguf

    tok = bpe_tokenizer()

    def run(flag):
        monkeypatch.setenv("QAT_GGML_QUANTIZE", flag)
        m = tiny_llama(len(tok), hidden=256, heads=4, kv_heads=2)
        qat.prepare(m, "q4_k_m")
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(2):
            ids = torch.randint(0, len(tok), (2, 16), generator=g)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
            opt.step()
            opt.zero_grad()
        path = export_gguf(m, tok, tmp_path / f"m{flag}.gguf", file_type="q4_k_m", progress=False)
        return out, path.read_bytes()

    (a, fa), (b, fb) = run("1"), run("0")
    for (la, ga), (lb, gb) in zip(a, b):
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert fa == fb
    assert kquants._LLAMA["calls"], "llama.cpp's encoder was used"


def test_a_disagreeing_llama_cpp_hands_over_to_ours(monkeypatch):
    from qat.formats import llama_encoder

    real = llama_encoder.quantize_rows

    def off_by_one(ggml_type, type_size, x, threads=1, block=256):  # a llama.cpp whose rule differs somewhere
        out = real(ggml_type, type_size, x, threads, block)
        out[:, 7] ^= 1
        return out

    monkeypatch.setattr(llama_encoder, "quantize_rows", off_by_one)
    fmt = get_format("q4_k")
    w = _weights()
    with pytest.warns(RuntimeWarning, match="disagrees with qat's"):
        q = fmt._quantize(w)
    _same(q, fmt._quantize_torch(w))  # the result is ours
    assert kquants._LLAMA["off"]
    calls = dict(kquants._LLAMA["calls"])
    _same(fmt._quantize(w), fmt._quantize_torch(w))
    assert kquants._LLAMA["calls"] == calls  # llama.cpp's encoder is not called again


@pytest.mark.parametrize("name", KQ)
def test_llama_cpp_dequantize_rows_equals_ours(name):
    """fake() by llama.cpp's encoder and dequantize_row_*: ours dequantizing the same blocks, bit for bit."""
    from qat.formats import llama_encoder

    fmt = get_format(name)
    w = _weights(rows=200)  # over ROWS_PER_TASK: the threaded split
    data = llama_encoder.quantize_rows(int(fmt.ggml_type), fmt.type_size, w.numpy(), 1)
    theirs = llama_encoder.dequantize_rows(name, data, w.shape[1], threads=3)
    ours = fmt.dequantize(fmt.from_bytes(data, tuple(w.shape)))
    assert torch.equal(torch.from_numpy(theirs).view(torch.int32), ours.view(torch.int32))
    assert torch.equal(fmt.fake(w).view(torch.int32), ours.view(torch.int32))
    assert name in kquants._LLAMA["dequant_checked"] and not kquants._LLAMA["dequant_off"]


def test_a_differing_llama_cpp_dequantization_hands_over_to_ours(monkeypatch):
    from qat.formats import llama_encoder

    real = llama_encoder.dequantize_rows

    def fused(name, data, n, threads=1):  # a build whose rounding differs somewhere
        out = real(name, data, n, threads)
        out[:, 3] = np.nextafter(out[:, 3], np.float32(np.inf))
        return out

    monkeypatch.setattr(llama_encoder, "dequantize_rows", fused)
    fmt = get_format("q5_k")
    w = _weights()
    ours = fmt.dequantize(fmt._quantize_torch(w))
    with pytest.warns(RuntimeWarning, match="dequantization differs"):
        assert torch.equal(fmt.fake(w), ours)
    assert kquants._LLAMA["dequant_off"] and not kquants._LLAMA["off"]
    assert torch.equal(fmt.fake(w), ours)  # and from then on, without asking llama.cpp's dequantization


@pytest.mark.parametrize("flag", ["1", "0"])
def test_quantize_bytes_is_to_bytes_of_quantize(monkeypatch, flag):
    """Export's path (the encoder's bytes as they are) writes what packing the QTensor writes."""
    monkeypatch.setenv("QAT_GGML_QUANTIZE", flag)
    for name in KQ:
        fmt = get_format(name)
        for w in (_weights(), _weights(rows=12).reshape(3, 4, 768)):
            b = fmt.quantize_bytes(w)
            assert b.shape == (*w.shape[:-1], 3 * fmt.type_size)
            assert np.array_equal(b, fmt.to_bytes(fmt._quantize_torch(w)))
    assert bool(kquants._LLAMA["calls"]) == (flag == "1")
    w = _weights()
    w[0, 0] = float("inf")
    with pytest.raises(qat.QuantError, match="finite|inf"):
        get_format("q4_k").quantize_bytes(w)


LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


@pytest.mark.parametrize("flag", ["1", "0"])
def test_legacy_quantize_bytes_is_the_reference_rule(monkeypatch, flag):
    monkeypatch.setenv("QAT_GGML_QUANTIZE", flag)
    for name in LEGACY:
        fmt = get_format(name)
        for w in (_weights(), _weights(rows=12).reshape(3, 4, 768), _weights().bfloat16()):
            b = fmt.quantize_bytes(w)
            assert b.shape == (*w.shape[:-1], 768 // 32 * fmt.type_size)
            assert np.array_equal(b, fmt.to_bytes(fmt.quantize(w)))
    assert (set(ggml._LLAMA["calls"]) == set(LEGACY)) == (flag == "1") and not ggml._LLAMA["off"]


def test_a_disagreeing_legacy_encoder_hands_over_to_ours(monkeypatch):
    from qat.formats import llama_encoder

    real = llama_encoder.quantize_rows

    def off_by_one(ggml_type, type_size, x, threads=1, block=256):
        out = real(ggml_type, type_size, x, threads, block)
        out[-1, 5] ^= 1  # the last row: the sample check includes it
        return out

    monkeypatch.setattr(llama_encoder, "quantize_rows", off_by_one)
    fmt, w = get_format("q4_0"), _weights()
    with pytest.warns(RuntimeWarning, match="disagrees with qat's"):
        b = fmt.quantize_bytes(w)
    assert np.array_equal(b, fmt.to_bytes(fmt.quantize(w))) and ggml._LLAMA["off"]


@pytest.mark.parametrize("scheme,observer,freeze", [("q4_0", "dynamic", False), ("q8_0", "dynamic", False),
                                                    ("q5_1", "dynamic", True), ("q4_1", "learned", False),
                                                    ("q5_0", "mse", False)])
def test_export_with_either_encoder_is_the_trained_codes(monkeypatch, tmp_path, scheme, observer, freeze):
    """Export writes llama.cpp's encoder bytes only where they are the trained codes (dynamic, unfrozen):
    files equal the QTensor path's for every observer, after training moved the weights (and, frozen or
    learned, the parameters away from the reference rule)."""
    from qat.export import export_gguf

    tok = bpe_tokenizer()

    def run(flag):
        monkeypatch.setenv("QAT_GGML_QUANTIZE", flag)
        m = tiny_llama(len(tok), hidden=64, heads=4, kv_heads=2)
        qat.prepare(m, scheme, observer=observer)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            if freeze and step == 1:
                qat.freeze_observers(m)
            ids = torch.randint(0, len(tok), (2, 16), generator=g)
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return export_gguf(m, tok, tmp_path / f"m{flag}.gguf", progress=False).read_bytes()

    assert run("1") == run("0")
    assert bool(ggml._LLAMA["calls"]) == (observer == "dynamic" and not freeze)


def test_off_switch_and_bad_input(monkeypatch):
    fmt = get_format("q4_k")
    monkeypatch.setenv("QAT_GGML_QUANTIZE", "0")
    fmt._quantize(_weights())
    assert kquants._LLAMA["calls"] == {}
    monkeypatch.setenv("QAT_GGML_QUANTIZE", "1")
    w = _weights()
    w[0, 0] = float("nan")
    with pytest.raises(qat.QuantError, match="finite|NaN"):
        fmt.quantize(w)
