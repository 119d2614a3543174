"""Export a trained run: the hook the training flow calls, and what ``scripts/export.py`` does.

Targets are written ``gguf``, ``gguf:<type>``, ``compressed-tensors`` or ``torchao``. For GGUF the
type is never a request to re-quantize: ``f32``/``f16``/``bf16`` pick how the layers the plan left in
float are stored, and a quantized type (``q4_0``, ``q4_k_m`` ...) must be what the model was trained
with (a mix name is recorded as ``general.file_type``).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn

from ..prepare import fake_quant_modules, nonfinite_parameters
from .io import ExportError

__all__ = ["export_run", "export_to", "parse_target", "TARGETS", "default_name"]

TARGETS = ("gguf", "compressed-tensors", "torchao")
_FLOAT = ("f32", "f16", "bf16")


def parse_target(target: str) -> tuple[str, Optional[str]]:
    """``gguf:q4_0`` -> ("gguf", "q4_0"); ``compressed-tensors`` -> ("compressed-tensors", None)."""
    kind, _, sub = target.strip().lower().partition(":")
    kind = {"ct": "compressed-tensors", "compressed_tensors": "compressed-tensors"}.get(kind, kind)
    if kind not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of gguf[:type], compressed-tensors, torchao")
    if sub and kind != "gguf":
        raise ExportError(f"{kind} takes no type suffix (got {target!r})")
    return kind, sub or None


def _model_of(module: nn.Module) -> nn.Module:
    while getattr(module, "config", None) is None and isinstance(getattr(module, "model", None), nn.Module):
        module = module.model
    return module


def trained_formats(model: nn.Module) -> Counter:
    """Format name -> number of fake-quant layers using it."""
    return Counter(m.weight_fake_quant.fmt.name for _, m in fake_quant_modules(model))


def default_name(model: nn.Module, kind: str, gguf_type: Optional[str] = None) -> str:
    """A file or directory name that says what it holds: ``model.Q4_0.gguf``, ``int4-w-g128/`` ..."""
    fmts = trained_formats(model)
    label = (gguf_type if gguf_type and gguf_type not in _FLOAT else None) or \
        (fmts.most_common(1)[0][0] if len(fmts) == 1 else ("mixed" if fmts else (gguf_type or "f16")))
    if kind == "gguf":
        if fmts and gguf_type in _FLOAT:  # a quantized model whose float layers are stored as gguf_type
            label = f"{label}-{gguf_type}"
        return f"model.{label.upper()}.gguf"
    return f"{label.replace('_', '-')}-{kind}"


def export_to(model: nn.Module, tokenizer, target: str, out: str | os.PathLike, force: bool = False,
              float_type: str = "f16", progress: bool = True) -> Path:
    """Export ``model`` to one target (see the module docstring) at ``out``."""
    model = _model_of(model)
    kind, sub = parse_target(target)
    bad = nonfinite_parameters(model)
    if bad:
        raise ExportError(f"the model's weights hold NaN or Inf values ({bad}): training diverged or the checkpoint "
                          "is damaged; export an earlier checkpoint, or train again with a lower train.lr")
    if kind == "gguf":
        from .gguf import export_gguf
        file_type = None
        if sub in _FLOAT:
            float_type = sub
        elif sub is not None:
            from ..mixes import MIXES
            fmts = trained_formats(model)
            if sub in MIXES:
                file_type = sub
            elif set(fmts) != {sub}:
                trained = ", ".join(sorted(fmts)) or "float (not prepared)"
                raise ExportError(f"the model was trained as {trained}; exporting it as {sub} would re-quantize "
                                  f"it. Use --to gguf (or gguf:f16/bf16/f32 for the float layers).")
        return export_gguf(model, tokenizer, out, float_type=float_type, force=force, file_type=file_type,
                           progress=progress)
    if kind == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors
        return export_compressed_tensors(model, tokenizer, out, force=force, progress=progress)
    from .torchao import export_torchao
    return export_torchao(model, tokenizer, out, force=force)


def export_run(module: nn.Module, tokenizer, config_export_block: Optional[Mapping[str, Any]],
               out_dir: str | os.PathLike, force: bool = False, progress: bool = True) -> list[Path]:
    """The training flow's export step, for the recipe's ``export:`` block (``qat.recipe.ExportConfig``):

        gguf: [q4_0]              # GGUF files; a quantized type must be the trained one, f16/bf16/f32
                                  # set the storage of the layers left in float
        compressed_tensors: true  # an int4/int8 weight-only run as a compressed-tensors directory
        torchao: false
        float_type: f16           # GGUF storage of layers left in float (when not given per file)

    Files go to ``out_dir`` under names that say what they hold. Every target is validated before the
    first is written. Returns the paths written.
    """
    block = dict(config_export_block or {})
    targets = [f"gguf:{t}" for t in (block.pop("gguf", None) or [])]
    if block.pop("compressed_tensors", False):
        targets.append("compressed-tensors")
    if block.pop("torchao", False):
        targets.append("torchao")
    float_type = block.pop("float_type", "f16")
    if block:
        raise ExportError(f"unknown keys in the export block: {', '.join(sorted(block))}")
    model = _model_of(module)
    plan = [(t, *parse_target(t)) for t in targets]
    names = [default_name(model, kind, sub) for _, kind, sub in plan]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [export_to(model, tokenizer, t, out_dir / name, force=force, float_type=float_type, progress=progress)
            for (t, _, _), name in zip(plan, names)]
