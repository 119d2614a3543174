"""Which layer gets which scheme.

A *scheme* names what a layer becomes at deployment: a weight format and, optionally, an activation
format. Scheme names are GGUF type names where one matches (``q4_0``, ``q8_0``, ``q4_k`` ...),
integer format names (``int4_g128``, ``int8_channel`` ...), or the descriptive aliases below.
A *mix* (``q4_k_m`` ...) assigns schemes per tensor by llama.cpp's rules; see ``qat.mixes``.

Rules are fnmatch patterns on module names; a pattern matches a name or any dotted suffix of it
(``lm_head`` matches ``model.lm_head``). The first matching rule wins; ``None`` keeps a layer in float.
Without rules, every ``nn.Linear`` except the output head is quantized and embeddings stay float;
a mix plans the output head and the token embedding too, as llama.cpp quantizes them.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Optional

from torch import nn

from .formats import QuantError, get_format

__all__ = ["LayerSpec", "SCHEME_ALIASES", "resolve_scheme", "build_plan", "match_rule", "OUTPUT_NAMES"]


@dataclass(frozen=True)
class LayerSpec:
    weight: str                       # format name of the weight
    activations: Optional[str] = None  # format name of the input activations, if quantized

    @property
    def name(self) -> str:
        return self.weight if self.activations is None else f"{self.weight}+act:{self.activations}"


# Descriptive names users know from torchao / vLLM, mapped to formats.
SCHEME_ALIASES: dict[str, LayerSpec] = {
    "int8_w": LayerSpec("int8_channel"),
    "int4_w_g32": LayerSpec("int4_g32"),
    "int4_w_g64": LayerSpec("int4_g64"),
    "int4_w_g128": LayerSpec("int4_g128"),
    "int4_asym_w_g128": LayerSpec("int4_asym_g128"),
    "int8da_int4w": LayerSpec("int4_g32", activations="int8_asym_token"),
    "int8da_int8w": LayerSpec("int8_channel", activations="int8_asym_token"),
}

OUTPUT_NAMES = ("lm_head", "output", "embed_out")  # output heads, left in float unless a rule says otherwise


def resolve_scheme(scheme: str | LayerSpec, activations: Optional[str] = None) -> LayerSpec:
    """A scheme name (or spec) to a LayerSpec, checking that its formats exist."""
    if isinstance(scheme, LayerSpec):
        spec = scheme
    else:
        key = scheme.lower()
        spec = SCHEME_ALIASES.get(key) or LayerSpec(key)
    if activations is not None:
        spec = LayerSpec(spec.weight, activations)
    get_format(spec.weight)
    if spec.activations is not None:
        get_format(spec.activations)
    return spec


def match_rule(name: str, rules: Mapping[str, Optional[str]]):
    """The first rule whose pattern matches ``name`` or a dotted suffix of it: ``(True, value)``, else ``(False, None)``."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    for pattern, value in rules.items():
        if any(fnmatch.fnmatchcase(s, pattern) for s in suffixes):
            return True, value
    return False, None


def _is_output(name: str) -> bool:
    return name.split(".")[-1] in OUTPUT_NAMES


def build_plan(model: nn.Module, scheme: Optional[str], rules: Optional[Mapping[str, Optional[str]]] = None,
               activations: Optional[str] = None) -> dict[str, LayerSpec]:
    """Module name -> LayerSpec for every Linear/Embedding to be quantized. Mixes are expanded here."""
    rules = dict(rules or {})
    base: dict[str, Optional[LayerSpec]] = {}
    from .mixes import MIXES, mix_plan  # local: mixes imports plan

    if scheme is not None and scheme.lower() in MIXES:
        if activations is not None:
            raise QuantError(f"mix {scheme!r} quantizes weights only (as llama.cpp does); "
                             f"activation quantization {activations!r} does not apply to it")
        mixed = mix_plan(model, scheme.lower())
        base_for = lambda name: mixed.get(name)  # noqa: E731
    else:
        default = None if scheme is None else resolve_scheme(scheme, activations)
        base_for = lambda name: None if _is_output(name) else default  # noqa: E731

    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        hit, value = match_rule(name, rules)
        if hit:
            base[name] = None if value is None else resolve_scheme(value, activations if not isinstance(mod, nn.Embedding) else None)
        elif isinstance(mod, nn.Linear):
            base[name] = base_for(name)
        elif scheme is not None and scheme.lower() in MIXES:
            base[name] = base_for(name)
    plan = {k: v for k, v in base.items() if v is not None}
    for name, spec in plan.items():
        if spec.activations is not None and isinstance(model.get_submodule(name), nn.Embedding):
            raise QuantError(f"{name}: embeddings take no activation quantization (scheme {spec.name})")
    return plan
