"""compressed-tensors export, judged by the compressed-tensors package and HF transformers loading it."""
from __future__ import annotations

import json

import pytest
import torch

import qat
from qat.export import ExportError, export_compressed_tensors
from qat.export.compressed_tensors import pack_int32
from tiny_lm import TEXT, bpe_tokenizer, tiny_llama

ct = pytest.importorskip("compressed_tensors")
torch.set_num_threads(2)

HIDDEN = 128  # group size 128 needs in_features that are multiples of 128


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [32, 96, 40])
def test_packing_matches_compressed_tensors(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    g = torch.Generator().manual_seed(bits * cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols), generator=g)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes.to(torch.int8), bits))
    assert torch.equal(pack_int32(codes, bits, dim=0), pack_to_int32(codes.to(torch.int8), bits, packed_dim=0))


@pytest.mark.parametrize("scheme", ["int4_w_g128", "int4_w_g32", "int8_w", "int8_g64"])
def test_transformers_loads_export_and_logits_match(tok, tmp_path, scheme):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = tiny_llama(len(tok), hidden=HIDDEN)
    qat.prepare(m, scheme)
    out = export_compressed_tensors(m, tok, tmp_path / "ct", progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["quant_method"] == "compressed-tensors"
    assert cfg["ignore"] == ["lm_head"]

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sd = qat.effective_state_dict(m)
    for name, w in loaded.state_dict().items():
        if name in sd and w.is_floating_point():
            assert torch.equal(w, sd[name].float()), name  # the runtime's weights are the effective weights
    ids = torch.tensor([tok.encode(TEXT)[:128]])
    with torch.no_grad():
        want, got = m(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).encode(TEXT) == tok.encode(TEXT)


def test_asymmetric_layout_decompresses_exactly(tok, tmp_path):
    """Asymmetric W4A16: compressed-tensors' own decompressor (the one vLLM's layout follows) gives back
    the effective weights. (transformers' loader cannot load asymmetric pack-quantized checkpoints with
    compressed-tensors 0.20: its meta-device pass keeps the zero-point unpacked; see the xfail below.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file
    m = tiny_llama(len(tok), hidden=HIDDEN)
    qat.prepare(m, "int4_asym_w_g128")
    out = export_compressed_tensors(m, tok, tmp_path / "ct", progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**cfg["config_groups"]["group_0"]["weights"]))
    state = load_file(out / "model.safetensors")
    sd = qat.effective_state_dict(m)
    for name, _ in qat.fake_quant_modules(m):
        layer = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".weight_")}
        assert set(layer) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
        layer["weight_scale"] = layer["weight_scale"].float()  # fp32 inference, as from_pretrained(dtype=fp32)
        w = PackedQuantizationCompressor.decompress(layer, scheme)["weight"]
        assert torch.equal(w, sd[f"{name}.weight"]), name


@pytest.mark.xfail(reason="compressed-tensors 0.20 + transformers 5: asymmetric pack-quantized zero-points are "
                          "not packed on the meta model, so loading reports a size mismatch", strict=False)
def test_transformers_loads_asymmetric_export(tok, tmp_path):
    from transformers import AutoModelForCausalLM
    m = tiny_llama(len(tok), hidden=HIDDEN)
    qat.prepare(m, "int4_asym_w_g128")
    out = export_compressed_tensors(m, tok, tmp_path / "ct", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(TEXT)[:64]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)


def test_quantized_tied_head_is_untied(tok, tmp_path):
    from transformers import AutoModelForCausalLM
    m = tiny_llama(len(tok), hidden=HIDDEN)
    qat.prepare(m, "int8_w", rules={"lm_head": "int8_w"})
    out = export_compressed_tensors(m, tok, tmp_path / "ct", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["ignore"] == []
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(TEXT)[:64]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,rules,match", [
    ("q4_0", None, "q4_0"),
    ("int8da_int4w", None, "activation quantization"),
    ("int4_w_g32", {"*.embed_tokens": "int4_g32"}, "quantized embedding"),
])
def test_unsupported_schemes_fail_before_writing(tok, tmp_path, scheme, rules, match):
    m = tiny_llama(len(tok), hidden=HIDDEN)
    qat.prepare(m, scheme, rules=rules)
    with pytest.raises(ExportError, match=match):
        export_compressed_tensors(m, tok, tmp_path / "ct", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_force(tok, tmp_path):
    m = tiny_llama(len(tok), hidden=HIDDEN)
    qat.prepare(m, "int8_w")
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_compressed_tensors(m, tok, out, progress=False)
    assert (out / "keep").read_text() == "x"
    export_compressed_tensors(m, tok, out, force=True, progress=False)
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
