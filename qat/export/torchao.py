"""Write an integer-quantized causal LM as torchao tensor subclasses, saved with ``save_pretrained``.

Each quantized Linear's weight becomes a ``torchao`` ``IntxUnpackedToInt8Tensor`` built directly from
``qat.convert``'s codes, scales and zero-points (no re-quantization): ``qdata`` int8 codes,
``block_size (1, group)``, dequantized as ``(qdata - zero_point) * scale``, the formula the fake
quantizer uses. Weight-only schemes: torchao 0.18 cannot load back the activation quantization of
``int8da_int4w``-style tensors from safetensors, so those are refused. ``transformers`` saves it as safetensors with torchao metadata
and ``AutoModelForCausalLM.from_pretrained(dir)`` loads it back for PyTorch inference (CPU or GPU).

Scales are kept in fp32 (they hold the fp16 values exactly), so an fp32 model reproduces the
fake-quant logits exactly; a bf16/fp16 model computes with scales rounded to its dtype.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..formats import IntFormat
from ..prepare import convert, fake_quant_modules, unprepare
from .io import ExportError, atomic_dir, check_output

__all__ = ["export_torchao"]


def _check(model: nn.Module) -> dict[str, IntFormat]:
    problems, fmts = [], {}
    for name, m in fake_quant_modules(model):
        fmt = m.weight_fake_quant.fmt
        act = getattr(m, "act_fake_quant", None)
        if isinstance(m, nn.Embedding):
            problems.append(f"{name}: quantized embedding (torchao export covers Linear layers)")
        elif not isinstance(fmt, IntFormat) or fmt.granularity not in ("group", "channel"):
            problems.append(f"{name}: {fmt.name}")
        elif act is not None:
            # torchao 0.18's safetensors loader cannot restore IntxUnpackedToInt8Tensor's activation
            # quantization (its enum is not an allowed class), so the file would not load back.
            problems.append(f"{name}: activation quantization ({act.fmt.name}); torchao checkpoints of dynamic-"
                            "activation schemes do not load back with torchao's safetensors support")
        else:
            fmts[name] = fmt
    if problems:
        raise ExportError("torchao export takes integer schemes (int4_w_g32, int8_w, int8da_int4w ...); "
                          "these layers don't fit:\n  " + "\n  ".join(problems))
    if not fmts:
        raise ExportError("the model has no quantized layers; prepare it with an integer scheme first")
    return fmts


def _ao_config(fmts: dict[str, IntFormat]):
    """The TorchAoConfig recorded in config.json (the dominant format; loading reads each tensor's own
    block size and dtype from the checkpoint)."""
    from collections import Counter

    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup
    from transformers import TorchAoConfig
    fmt = Counter(fmts.values()).most_common(1)[0][0]
    gran = PerGroup(fmt.group_size) if fmt.granularity == "group" else PerAxis(0)
    mapping = MappingType.SYMMETRIC if fmt.symmetric else MappingType.ASYMMETRIC
    dtype = getattr(torch, f"int{fmt.bits}")
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran, mapping_type=mapping))


@torch.no_grad()
def export_torchao(model: nn.Module, tokenizer, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Save ``model`` (prepared with int schemes) with torchao tensor-subclass weights to ``out_dir``."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    while getattr(model, "config", None) is None and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    out_dir = check_output(out_dir, force, is_dir=True)
    if not hasattr(model, "save_pretrained"):
        raise ExportError(f"torchao export needs a Hugging Face model, got {type(model).__name__}")
    fmts = _check(model)
    qtensors = convert(model)

    out = copy.deepcopy(model)
    unprepare(out)
    dtype = next(out.parameters()).dtype
    for name, fmt in fmts.items():
        q = qtensors[name]
        rows, cols = q.shape
        n_groups = q.scale.reshape(rows, -1).shape[1]
        zero = torch.zeros(rows, n_groups, dtype=torch.int8) if q.zero is None else \
            q.zero.reshape(rows, n_groups).round().to(torch.int8)
        weight = IntxUnpackedToInt8Tensor(
            q.codes.to(torch.int8), q.scale.reshape(rows, n_groups).float(), zero, getattr(torch, f"int{fmt.bits}"),
            (1, cols // n_groups), dtype, None)
        out.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)
    if any(n.split(".")[-1] == "lm_head" for n in fmts) and getattr(out.config, "tie_word_embeddings", False):
        out.config.tie_word_embeddings = False  # quantized head, float embedding: two tensors now
        out.get_input_embeddings().weight = nn.Parameter(out.get_input_embeddings().weight.detach().clone())
    out.config.quantization_config = _ao_config(fmts)
    out.hf_quantizer = TorchAoHfQuantizer(out.config.quantization_config)
    with atomic_dir(out_dir, force) as tmp:
        out.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
