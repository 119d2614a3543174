"""Named mixes: our per-tensor plan must be the type llama-quantize gives every tensor.

The judge is llama.cpp itself: each tiny model is exported to an F16 GGUF, quantized with
``llama_cpp.llama_model_quantize`` for every file type, and each tensor's type read back with
``gguf.GGUFReader`` is compared with ``mix_plan``. The models cover the rules' branches: widths that are
multiples of 256 and SmolLM2's 576 (the row-length fallbacks), rows not a multiple of 32 (F16),
16/8/4/2 layers (the ``use_more_bits`` pattern, ``n/16``, ``i_attention_wv < 2/4``), GQA >= 4 and < 4,
tied and untied embeddings. Rules llama.cpp applies to shapes too large to export here (the 70B
model type, 8-expert models) are checked against the C source's conditions directly.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qat.formats import QuantError
from qat.mixes import FILE_TYPES, MIXES, mix_plan, mix_types
from qat.plan import LayerSpec, build_plan

from conftest import tiny_llama
from tiny_lm import bpe_tokenizer

# name: (hidden, intermediate, layers, heads, kv_heads, tied)
MODELS = {
    "w256_l16_gqa4": (256, 512, 16, 8, 2, False),
    "w256_l8_tied": (256, 768, 8, 4, 4, True),
    "w576_l4_tied": (576, 1536, 4, 9, 3, True),   # SmolLM2-135M's widths, fewer layers
    "w96_ff200": (96, 200, 2, 3, 1, False),       # ffn_down rows of 200: not even a multiple of 32
}
VOCAB = 320

_ROLE = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def make_model(name: str, vocab: int = VOCAB) -> nn.Module:
    hidden, inter, layers, heads, kv, tied = MODELS[name]
    m = tiny_llama(vocab=vocab, hidden=hidden, inter=inter, layers=layers, heads=heads, kv_heads=kv, tie=tied)
    m.config.architectures = ["LlamaForCausalLM"]
    return m


def gguf_name(module: str, tied: bool) -> str:
    """HF Llama module name -> llama.cpp tensor name (written out here, independently of qat.mixes)."""
    if module.endswith("embed_tokens") or (tied and module.endswith("lm_head")):
        return "token_embd.weight"
    if module.endswith("lm_head"):
        return "output.weight"
    i, rest = re.search(r"layers\.(\d+)\.(.+)$", module).groups()
    return f"blk.{i}.{_ROLE[rest]}.weight"


# ------------------------------------------------------------------------------------------------
# against llama.cpp
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def f16_files(tmp_path_factory):
    from qat.export.gguf import export_gguf

    tok = bpe_tokenizer(VOCAB)
    d = tmp_path_factory.mktemp("mixes")
    files = {}
    for name in MODELS:
        model = make_model(name, len(tok))
        files[name] = (model, export_gguf(model, tok, d / f"{name}.F16.gguf", float_type="f16", progress=False))
    return files


def quantize(src, dst, mix: str) -> dict[str, str]:
    """llama-quantize ``src`` to file type ``mix``; GGUF tensor name -> type name."""
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    assert params.ftype == FILE_TYPES[mix]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    reader = gguf.GGUFReader(dst)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == FILE_TYPES[mix]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    del reader
    return types


@pytest.mark.llama
@pytest.mark.parametrize("mix", list(FILE_TYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_plan_matches_llama_quantize(f16_files, tmp_path, model_name, mix):
    model, src = f16_files[model_name]
    tied = MODELS[model_name][-1]
    file_types = quantize(src, tmp_path / f"{mix}.gguf", mix)

    plan = mix_plan(model, mix)
    expected: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            spec = plan.get(name)
            want = "F16" if spec is None else spec.weight.upper()  # not planned: llama.cpp kept F16
            prev = expected.setdefault(gguf_name(name, tied), want)
            assert prev == want, f"{name}: tied tensor planned twice differently ({prev} vs {want})"
    assert set(plan) <= {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}

    mismatches = []
    for tensor, got in file_types.items():
        want = expected.pop(tensor, "F32")  # norms: 1-D, never quantized
        if got != want:
            mismatches.append(f"{tensor}: llama.cpp {got}, plan {want}")
    assert not mismatches, f"{model_name} {mix}:\n  " + "\n  ".join(mismatches)
    assert not expected, f"planned tensors missing from the file: {sorted(expected)}"


@pytest.mark.llama
def test_quantized_mix_loads_in_llama_cpp(f16_files, tmp_path):
    """The planned file is one llama.cpp runs (fallback types and all)."""
    from qat.llamacpp import gguf_logits

    _, src = f16_files["w576_l4_tied"]
    quantize(src, tmp_path / "q4_k_m.gguf", "q4_k_m")
    logits = gguf_logits(tmp_path / "q4_k_m.gguf", [1, 5, 9, 13], n_ctx=16)
    assert logits.shape == (4, VOCAB) and torch.isfinite(torch.from_numpy(logits)).all()


# ------------------------------------------------------------------------------------------------
# rules worked out by hand from llama-quant.cpp
# ------------------------------------------------------------------------------------------------
def test_q4_k_m_layer_pattern():
    """use_more_bits(i, 16): i < 2, i >= 14, or (i - 2) % 3 == 2 -> Q6_K for attn_v and ffn_down."""
    types = mix_types(make_model("w256_l16_gqa4"), "q4_k_m")
    more = {0, 1, 4, 7, 10, 13, 14, 15}
    for i in range(16):
        for role in ("self_attn.v_proj", "mlp.down_proj"):
            assert types[f"model.layers.{i}.{role}"] == ("q6_k" if i in more else "q4_k"), (i, role)
        assert types[f"model.layers.{i}.self_attn.q_proj"] == "q4_k"
    assert types["lm_head"] == "q6_k" and types["model.embed_tokens"] == "q4_k"


def test_q3_k_m_and_q2_k_rules():
    t3 = mix_types(make_model("w256_l16_gqa4"), "q3_k_m")
    assert [t3[f"model.layers.{i}.self_attn.v_proj"] for i in range(4)] == ["q5_k", "q5_k", "q4_k", "q4_k"]
    assert [t3[f"model.layers.{i}.mlp.down_proj"] for i in range(3)] == ["q5_k", "q4_k", "q4_k"]  # i < 16/16
    assert t3["model.layers.3.self_attn.o_proj"] == "q4_k" and t3["model.layers.3.mlp.up_proj"] == "q3_k"
    t2 = mix_types(make_model("w256_l16_gqa4"), "q2_k")
    assert t2["model.layers.5.self_attn.v_proj"] == "q4_k"  # GQA 4
    assert t2["model.layers.5.mlp.down_proj"] == "q3_k" and t2["model.layers.5.self_attn.o_proj"] == "q3_k"
    assert mix_types(make_model("w256_l8_tied"), "q2_k")["model.layers.5.self_attn.v_proj"] == "q3_k"  # no GQA


def test_row_length_fallbacks_smollm2_widths():
    """576 is not a multiple of 256: every k-type falls back to its 32-block type; 1536 is."""
    types = mix_types(make_model("w576_l4_tied"), "q4_k_m")
    assert types["model.embed_tokens"] == types["lm_head"] == "q8_0"  # tied output, 576 % 256 != 0
    assert types["model.layers.0.self_attn.q_proj"] == "q5_0"          # Q4_K -> Q5_0; Q6_K -> Q8_0 below
    # use_more_bits(i, 4) holds for i = 2, 3
    assert [types[f"model.layers.{i}.self_attn.v_proj"] for i in range(4)] == ["q5_0", "q5_0", "q8_0", "q8_0"]
    assert [types[f"model.layers.{i}.mlp.down_proj"] for i in range(4)] == ["q4_k", "q4_k", "q6_k", "q6_k"]
    t5 = mix_types(make_model("w576_l4_tied"), "q5_k_s")
    assert t5["model.layers.1.mlp.up_proj"] == "q5_1"                   # Q5_K -> Q5_1
    t2 = mix_types(make_model("w576_l4_tied"), "q2_k")
    assert t2["model.layers.1.mlp.up_proj"] == t2["model.layers.1.self_attn.v_proj"] == "q4_0"  # Q2_K, Q3_K -> Q4_0
    odd = mix_plan(make_model("w96_ff200"), "q4_k_m")
    assert "model.layers.0.mlp.down_proj" not in odd                     # 200 % 32 != 0: stays F16 (float)


def _fake_config(**kw):
    base = dict(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, model_type="llama")
    base.update(kw)
    return SimpleNamespace(**base)


class _Shell(nn.Module):
    """A Llama-shaped stand-in with a few tiny layers but an arbitrary config (70B, 8 experts)."""

    def __init__(self, config, layers: int = 3):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(8, 256)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.self_attn = nn.Module()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(blk.self_attn, p, nn.Linear(256, 256, bias=False))
            blk.mlp = nn.Module()
            for p in ("gate_proj", "up_proj", "down_proj"):
                setattr(blk.mlp, p, nn.Linear(256, 256, bias=False))
            self.layers.append(blk)
        self.lm_head = nn.Linear(256, 8, bias=False)


def test_70b_attn_v_gets_q5_k():
    """llama.cpp's LLM_TYPE_70B (80 Llama layers with GQA): Q3_K/Q4_K attn_v -> Q5_K."""
    big = _Shell(_fake_config())
    assert mix_types(big, "q4_k_s")["layers.2.self_attn.v_proj"] == "q5_k"  # Q4_K -> Q5_K
    assert mix_types(big, "q3_k_s")["layers.2.self_attn.v_proj"] == "q5_k"
    assert mix_types(big, "q3_k_s")["layers.2.self_attn.q_proj"] == "q3_k"
    mha = _Shell(_fake_config(num_key_value_heads=64))                       # 65B: no bump
    assert mix_types(mha, "q3_k_s")["layers.2.self_attn.v_proj"] == "q3_k"


def test_eight_experts():
    moe = _Shell(_fake_config(num_hidden_layers=32, num_local_experts=8))
    types = mix_types(moe, "q4_k_m")
    assert types["layers.1.self_attn.v_proj"] == types["layers.1.self_attn.k_proj"] == "q8_0"
    assert types["layers.1.self_attn.o_proj"] == "q5_k" and types["layers.1.self_attn.q_proj"] == "q4_k"


# ------------------------------------------------------------------------------------------------
# build_plan with mixes
# ------------------------------------------------------------------------------------------------
class _Wrapper(nn.Module):
    """Like a LightningModule holding the HF model as ``self.model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_build_plan_expands_mixes_with_prefixes_and_rules():
    hf = make_model("w256_l8_tied")
    wrapped = _Wrapper(hf)
    plan = build_plan(wrapped, "q4_k_m")
    assert plan == {f"model.{k}": v for k, v in mix_plan(hf, "q4_k_m").items()}
    assert plan["model.model.embed_tokens"] == plan["model.lm_head"] == LayerSpec("q6_k")  # tied: one tensor

    ruled = build_plan(wrapped, "Q4_K_M", rules={"*.down_proj": "q8_0", "*.layers.0.self_attn.q_proj": None})
    assert ruled["model.model.layers.3.mlp.down_proj"] == LayerSpec("q8_0")
    assert "model.model.layers.0.self_attn.q_proj" not in ruled
    assert ruled["model.model.layers.1.self_attn.q_proj"] == LayerSpec("q4_k")

    # a file type named like a format stays that format as a scheme: head and embeddings untouched
    assert "q8_0" not in MIXES and "q2_k" in MIXES
    flat = build_plan(hf, "q8_0")
    assert "lm_head" not in flat and "model.embed_tokens" not in flat


def test_mix_errors():
    with pytest.raises(QuantError, match="unknown mix"):
        mix_types(make_model("w96_ff200"), "q4_k_x")
    with pytest.raises(QuantError, match="decoder layers"):
        mix_plan(nn.Sequential(nn.Linear(4, 4)), "q4_k_m")
    with pytest.raises(QuantError, match="activation"):
        build_plan(make_model("w96_ff200"), "q4_k_m", activations="int8_asym_token")
