"""Named GGUF mixes (``q4_k_m`` ...): the per-tensor types ``llama-quantize`` would choose, so QAT trains
each layer in the format the exported file will hold.

A GGUF "file type" is not one format. ``llama-quantize model-f16.gguf out.gguf Q4_K_M`` gives most
tensors Q4_K but bumps some to Q6_K (the output head, and attn_v / ffn_down in a fixed layer pattern),
and any tensor whose rows are not a multiple of the 256-wide k-quant super-block falls back to a
32-wide type (Q4_K -> Q5_0 ...). ``mix_plan`` reproduces that choice for a PyTorch model.

Source of truth: ``llama_tensor_get_type`` and its helpers in ``src/llama-quant.cpp`` of the llama.cpp
vendored in llama-cpp-python 0.3.36, without an importance matrix, ``--pure`` or per-tensor overrides.
The facts that matter, all reproduced below:

* Tensors are visited in file order sorted by layer (non-layer tensors first), so the ``i_attention_wv``
  and ``i_ffn_down`` counters equal the layer index; ``n_attention_wv`` counts attn_v tensors and
  ``n_ffn_down`` is the block count.
* ``use_more_bits(i, n)``: ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (C integer division).
* The output head, or the token embedding when the file has no ``output.weight`` (tied embeddings),
  gets Q6_K; Q8_0 when its row length is not a multiple of the file type's block (or for a Q8_0 file).
  An untied token embedding gets the file's default type.
* The row-length fallback runs last, on every quantized tensor: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0; a row length that is not a multiple of 32 either stays F16.
* GQA (``n_head // n_head_kv >= 4``), 8-expert models and the Llama-2/3 70B shape have special cases.

Model facts come from the HF config when one is found (``num_hidden_layers``, heads, experts,
``model_type``), else from the module names and weight shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .formats import QuantError
from .plan import OUTPUT_NAMES, LayerSpec

__all__ = ["MIXES", "FILE_TYPES", "mix_plan", "mix_types"]

# llama-quantize file types (``llama_ftype`` in llama.h) -> their enum value, as written to
# ``general.file_type``. All of them can be planned with ``mix_plan``.
FILE_TYPES: dict[str, int] = {
    "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
    "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}

# The names ``build_plan`` expands as mixes. A file type named like a single format (``q8_0``, ``q6_k``,
# ``q4_0`` ...) stays that format when given as a scheme: every Linear but the head in that format,
# embeddings float. ``q2_k`` is the exception: the design names it as a mix.
MIXES: dict[str, int] = {k: v for k, v in FILE_TYPES.items() if k == "q2_k" or k.endswith(("_s", "_m", "_l"))}

# ``llama_ftype_get_default_type``: the type of every tensor no rule singles out.
_DEFAULT_TYPE = {
    "q4_0": "q4_0", "q4_1": "q4_1", "q8_0": "q8_0", "q5_0": "q5_0", "q5_1": "q5_1",
    "q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
    "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k",
}

_BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
          "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}

# ``tensor_type_fallback``: a 256-block type for rows that are not a multiple of 256.
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

# HF Llama-family module suffix -> GGUF tensor role (blk.N.<role>.weight).
_LAYER_ROLES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(re.escape(k) for k in _LAYER_ROLES) + r")$")


@dataclass(frozen=True)
class _Model:
    """What llama.cpp's rules read from the model: hparams and the tensor set."""
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    tied: bool            # no output.weight: token_embd doubles as the output
    n_attention_wv: int


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _fallback(qtype: str, ncols: int) -> Optional[str]:
    """``tensor_type_fallback``: a type whose block divides ``ncols``; ``None`` for F16."""
    if ncols % _BLOCK[qtype] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if ncols % _BLOCK[qtype] == 0 else None


def _tensor_type(role: str, i_layer: int, ncols: int, ftype: str, m: _Model) -> Optional[str]:
    """``llama_tensor_get_type`` for one tensor of a Llama-family model; ``None`` means F16."""
    t = _DEFAULT_TYPE[ftype]
    if role == "output" or (role == "token_embd" and m.tied):
        t = "q8_0" if ncols % _BLOCK[t] else ("q6_k" if t != "q8_0" else t)
    elif role == "attn_v":
        i, n = i_layer, m.n_attention_wv
        if ftype == "q2_k":
            t = "q4_k" if m.n_gqa >= 4 else "q3_k"
        elif ftype == "q3_k_m":
            t = "q5_k" if i < 2 else "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < 4:
            t = "q5_k"
        if m.is_70b and t in ("q3_k", "q4_k"):  # 8 heads share attn_v: it is small, so spend bits on it
            t = "q5_k"
        if m.n_expert == 8:
            t = "q8_0"
    elif role == "attn_k":
        if m.n_expert == 8:
            t = "q8_0"
    elif role == "ffn_down":
        i, n = i_layer, m.n_layer
        if ftype == "q2_k":
            t = "q3_k"
        elif ftype == "q3_k_m":  # the Falcon-only Q3_K branch never applies to Llama-family models
            t = "q5_k" if i < n // 16 else "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
        elif ftype == "q4_k_m":
            if _use_more_bits(i, n):
                t = "q6_k"
        elif ftype == "q5_k_m" and _use_more_bits(i, n):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < n // 8:
            t = "q5_k"
    elif role == "attn_output":
        if m.n_expert == 8:
            if ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                t = "q5_k"
        elif ftype == "q2_k":
            t = "q3_k"
        elif ftype == "q3_k_m":
            t = "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
    return _fallback(t, ncols)


def _find_config(model: nn.Module):
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        if hasattr(cfg, "num_hidden_layers") and hasattr(cfg, "num_attention_heads"):
            return cfg
    return None


def _roles(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Module name -> (GGUF role, layer index; -1 outside the blocks) for every Linear/Embedding."""
    roles = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            if name.split(".")[-1] == "embed_tokens":
                roles[name] = ("token_embd", -1)
        elif isinstance(mod, nn.Linear):
            hit = _LAYER_RE.search(name)
            if hit:
                roles[name] = (_LAYER_ROLES[hit.group(2)], int(hit.group(1)))
            elif name.split(".")[-1] in OUTPUT_NAMES:
                roles[name] = ("output", -1)
            else:
                roles[name] = ("other", -1)
    return roles


def _model_facts(model: nn.Module, roles: dict[str, tuple[str, int]]) -> _Model:
    by_role: dict[str, list[str]] = {}
    for name, (role, _) in roles.items():
        by_role.setdefault(role, []).append(name)
    for role in ("token_embd", "output"):
        if len(by_role.get(role, [])) > 1:
            raise QuantError(f"mix_plan expects one causal LM, found several {role} modules: {by_role[role]}")
    layers = {i for role, i in roles.values() if i >= 0}
    if not layers:
        raise QuantError("mix_plan found no Llama-style decoder layers (*.layers.N.self_attn.q_proj ...); "
                         "mixes follow llama.cpp's per-tensor rules and need them")
    cfg = _find_config(model)
    if cfg is not None:
        n_layer = int(cfg.num_hidden_layers)
        n_head = int(cfg.num_attention_heads)
        n_head_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        n_expert = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
        arch = getattr(cfg, "model_type", "llama")
    else:  # the head count ratio is the ratio of the q and k projection widths
        n_layer = max(layers) + 1
        first = min(layers)
        width = {role: model.get_submodule(n).out_features for n, (role, i) in roles.items()
                 if i == first and role in ("attn_q", "attn_k")}
        n_head, n_head_kv = width.get("attn_q", 1), width.get("attn_k", width.get("attn_q", 1))
        n_expert, arch = 0, "llama"
    # llama.cpp's model type 70B (models/llama.cpp, models/qwen2.cpp); Mistral/Mixtral convert as llama.
    is_70b = n_layer == 80 and n_expert != 8 and (
        (arch in ("llama", "mistral") and n_head != n_head_kv) or arch == "qwen2")
    out = by_role.get("output", [])
    emb = by_role.get("token_embd", [])
    tied = not out or (bool(emb) and model.get_submodule(out[0]).weight is model.get_submodule(emb[0]).weight)
    return _Model(n_layer=n_layer, n_gqa=n_head // n_head_kv if n_head_kv else 0, n_expert=n_expert,
                  is_70b=is_70b, tied=tied, n_attention_wv=len(by_role.get("attn_v", [])))


def mix_types(model: nn.Module, mix: str) -> dict[str, Optional[str]]:
    """Module name -> the GGUF type name llama-quantize gives its tensor for file type ``mix``
    (``"q6_k"``, ``"q5_0"`` ...; ``None`` where it stays F16). Covers every Linear and the token embedding."""
    ftype = mix.lower()
    if ftype not in FILE_TYPES:
        raise QuantError(f"unknown mix {mix!r}; known: {', '.join(FILE_TYPES)}")
    roles = _roles(model)
    facts = _model_facts(model, roles)
    # llama.cpp's i_attention_wv / i_ffn_down counters: the tensor's rank in layer order (for models
    # with experts, ffn_down reads its layer from the tensor name instead)
    rank = {role: {i: r for r, i in enumerate(sorted(j for rl, j in roles.values() if rl == role))}
            for role in ("attn_v", "ffn_down")}
    if facts.n_expert > 1:
        rank.pop("ffn_down")
    types: dict[str, Optional[str]] = {}
    for name, (role, i) in roles.items():
        ncols = model.get_submodule(name).weight.shape[1]  # GGUF ne[0]: the row length
        types[name] = _tensor_type(role, rank[role][i] if role in rank else i, ncols, ftype, facts)
    return types


def mix_plan(model: nn.Module, mix: str) -> dict[str, LayerSpec]:
    """Module name -> LayerSpec for the layers file type ``mix`` quantizes, by llama.cpp's rules.

    Every Linear and the token embedding are planned; with tied embeddings the head and the embedding
    share one spec, as they share one tensor in the file. Layers that llama-quantize would keep in F16
    (rows not a multiple of 32) are left out, so they stay float. A type without an implementation in
    ``qat.formats`` is still named here; ``prepare`` reports it.
    """
    return {name: LayerSpec(t) for name, t in mix_types(model, mix).items() if t is not None}
