"""K-quant export bytes from llama.cpp's encoder (qat/export/ggml_quant.py): equal to ours, byte for byte;
a disagreeing llama.cpp is caught by the per-tensor sample check and export falls back to ours; bad input
gets our errors."""
import importlib.util

import numpy as np
import pytest
import torch

import qat
from qat.export import ggml_quant
from qat.formats import get_format

pytestmark = [pytest.mark.llama,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")]

KQ = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(ggml_quant, "_disabled_reason", None)
    monkeypatch.delenv("QAT_GGML_QUANTIZE", raising=False)


def _weights(rows=24, cols=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1] = 0.0  # all-zero super-blocks
    w[2, :256] = 0.3  # a constant one
    w[3, 5] = 4.0  # an outlier
    w[4] = torch.rand(cols, generator=g)  # all positive (Q4_K/Q5_K min 0 branch)
    return w


@pytest.mark.parametrize("name", KQ)
def test_llama_cpp_bytes_equal_ours(name):
    fmt = get_format(name)
    for seed in range(3):
        w = _weights(seed=seed)
        data = ggml_quant.encode_kquant(fmt, w)
        assert data is not None
        assert np.array_equal(data, fmt.to_bytes(fmt.quantize(w)).reshape(data.shape))
    w3 = _weights(rows=12).reshape(3, 4, 768)  # leading dims kept
    assert ggml_quant.encode_kquant(fmt, w3).shape[:-1] == (3, 4)


def test_not_a_kquant_or_disabled_returns_none(monkeypatch):
    assert ggml_quant.encode_kquant(get_format("q4_0"), _weights()) is None
    monkeypatch.setenv("QAT_GGML_QUANTIZE", "0")
    assert ggml_quant.encode_kquant(get_format("q4_k"), _weights()) is None


def test_a_disagreeing_llama_cpp_falls_back_to_ours(monkeypatch, tmp_path):
    real = ggml_quant._ggml_bytes

    def off_by_one(lib, fmt, x):  # a llama.cpp whose rule differs on some super-block
        out = real(lib, fmt, x)
        out[-1, 7] ^= 1
        return out

    monkeypatch.setattr(ggml_quant, "_ggml_bytes", off_by_one)
    fmt = get_format("q4_k")
    with pytest.warns(RuntimeWarning, match="disagrees with qat's"):
        assert ggml_quant.encode_kquant(fmt, _weights()) is None
    monkeypatch.setattr(ggml_quant, "_ggml_bytes", real)
    assert ggml_quant.encode_kquant(fmt, _weights()) is None  # off for the rest of the process

    # through export: the file has our bytes
    monkeypatch.setattr(ggml_quant, "_disabled_reason", None)
    monkeypatch.setattr(ggml_quant, "_ggml_bytes", off_by_one)
    model = torch.nn.Sequential(torch.nn.Linear(768, 24, bias=False))
    qat.prepare(model, "q4_k")
    with pytest.warns(RuntimeWarning):
        from qat.export.gguf import _kquant_bytes
        assert _kquant_bytes("0", model[0]) is None


def test_bad_input_gets_our_errors():
    fmt = get_format("q4_k")
    w = _weights()
    w[0, 0] = float("nan")
    with pytest.raises(qat.QuantError, match="non-finite|NaN|finite"):
        ggml_quant.encode_kquant(fmt, w)
    with pytest.raises(qat.QuantError):
        ggml_quant.encode_kquant(fmt, torch.zeros(4, 100))
