"""torchao export: transformers loads the tensor-subclass checkpoint and computes the fake-quant logits."""
from __future__ import annotations

import pytest
import torch

import qat
from qat.export import ExportError, export_torchao
from tiny_lm import TEXT, bpe_tokenizer, tiny_llama

pytest.importorskip("torchao")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.mark.parametrize("scheme", ["int4_w_g32", "int8_w", "int4_asym_w_g128"])
def test_transformers_loads_torchao_export(tok, tmp_path, scheme):
    from transformers import AutoModelForCausalLM
    m = tiny_llama(len(tok), hidden=128)
    qat.prepare(m, scheme)
    out = export_torchao(m, tok, tmp_path / "ao")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    ids = torch.tensor([tok.encode(TEXT)[:96]])
    with torch.no_grad():
        want, got = m(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,match", [("q4_0", "q4_0"), ("int8da_int4w", "activation quantization")])
def test_unsupported_scheme_is_refused(tok, tmp_path, scheme, match):
    m = tiny_llama(len(tok), hidden=128)
    qat.prepare(m, scheme)
    with pytest.raises(ExportError, match=match):
        export_torchao(m, tok, tmp_path / "ao")
    assert list(tmp_path.iterdir()) == []
