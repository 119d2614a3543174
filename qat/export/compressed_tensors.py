"""Write an integer-quantized causal LM as a compressed-tensors ``pack-quantized`` checkpoint, the
layout HF transformers (with the ``compressed-tensors`` package) and vLLM load as W4A16 / W8A16.

Per quantized Linear ``X`` the checkpoint holds, from ``qat.convert`` (never re-quantized):

* ``X.weight_packed``      int32, ``(rows, ceil(cols * bits / 32))``: codes offset to unsigned
                           (``code + 2^(bits-1)``) and packed densely, element ``i`` of each run of 32
                           at bit ``i * bits`` (LSB first), as ``compressed_tensors.pack_to_int32``;
* ``X.weight_scale``       ``(rows, n_groups)`` (channel: ``(rows, 1)``) in the format's scale dtype;
* ``X.weight_zero_point``  asymmetric only: the signed integer zero-points, packed the same way along
                           dim 0, ``(ceil(rows * bits / 32), n_groups)``;
* ``X.weight_shape``       int64 ``[rows, cols]``.

Dequantization by the runtime is ``(code - zero_point) * scale``, the formula ``IntFormat.decode``
uses, so the loaded model computes with the fake-quant model's effective weights.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..formats import IntFormat, QTensor, get_format
from ..prepare import convert, fake_quant_modules
from .io import ExportError, atomic_dir, check_output

__all__ = ["export_compressed_tensors", "pack_int32", "quantization_config"]


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Dense little-endian bit packing of signed ``bits``-bit codes into int32 along ``dim`` (0 or 1)."""
    v = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    groups = math.ceil(cols / 32)
    v = torch.nn.functional.pad(v, (0, groups * 32 - cols)).reshape(rows, groups, 32)
    out = torch.zeros(rows, groups, bits + 1, dtype=torch.int64)  # one spare word for overflow
    for e in range(32):
        start = e * bits
        word, off = divmod(start, 32)
        out[..., word] |= (v[..., e] << off) & 0xFFFFFFFF
        if off + bits > 32:
            out[..., word + 1] |= v[..., e] >> (32 - off)
    packed = out[..., :bits].reshape(rows, groups * bits)[:, : math.ceil(cols * bits / 32)]
    packed = packed.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else \
        torch.from_numpy(packed.numpy().astype(np.uint32).view(np.int32))
    return (packed.T if dim == 0 else packed).contiguous()


def _weights_args(fmt: IntFormat) -> dict:
    return {
        "num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
        "strategy": fmt.granularity, "group_size": fmt.group_size if fmt.granularity == "group" else None,
        "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
    }


def quantization_config(formats: dict[str, str], linear_names: list[str]) -> dict:
    """``quantization_config`` for config.json: one config group per format; float Linears ignored."""
    by_fmt: dict[str, list[str]] = {}
    for name, f in formats.items():
        by_fmt.setdefault(f, []).append(name)
    groups = {}
    single = len(by_fmt) == 1
    for i, (f, names) in enumerate(sorted(by_fmt.items())):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(names),
            "weights": _weights_args(get_format(f)),
            "input_activations": None, "output_activations": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(n for n in linear_names if n not in formats),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _check(model: nn.Module) -> dict[str, IntFormat]:
    problems, fmts = [], {}
    for name, m in fake_quant_modules(model):
        fmt = m.weight_fake_quant.fmt
        if isinstance(m, nn.Embedding):
            problems.append(f"{name}: quantized embedding (vLLM and transformers load quantized Linear layers "
                            "only; keep it float with rules={'*.embed_tokens': None})")
        elif not isinstance(fmt, IntFormat) or fmt.granularity not in ("group", "channel"):
            problems.append(f"{name}: {fmt.name}")
        elif getattr(m, "act_fake_quant", None) is not None:
            problems.append(f"{name}: activation quantization ({m.act_fake_quant.fmt.name})")
        else:
            fmts[name] = fmt
    if problems:
        raise ExportError(
            "compressed-tensors export takes integer weight-only schemes (W4A16/W8A16: int4_g128, "
            "int8_channel, int4_asym_g128 ...); these layers don't fit:\n  " + "\n  ".join(problems)
            + "\nGGUF schemes (q4_0, q4_k ...) export with --to gguf.")
    return fmts


def _pack_layer(name: str, q: QTensor, fmt: IntFormat) -> dict[str, torch.Tensor]:
    rows, cols = q.shape
    out = {
        f"{name}.weight_packed": pack_int32(q.codes, fmt.bits),
        f"{name}.weight_scale": q.scale.reshape(rows, -1).to(fmt.scale_dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not fmt.symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32(q.zero.reshape(rows, -1).round().to(torch.int64), fmt.bits, dim=0)
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    while getattr(model, "config", None) is None and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return model


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, tokenizer, out_dir: str | os.PathLike, force: bool = False,
                              progress: bool = True) -> Path:
    """Write ``model`` (prepared with int4/int8 weight-only schemes) as a compressed-tensors checkpoint
    directory: ``config.json`` with ``quantization_config``, ``model.safetensors``, tokenizer files."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    model = _unwrap(model)
    out_dir = check_output(out_dir, force, is_dir=True)
    if getattr(model, "config", None) is None or not hasattr(model.config, "to_dict"):
        raise ExportError(f"compressed-tensors export needs a Hugging Face model, got {type(model).__name__}")
    fmts = _check(model)
    if not fmts:
        raise ExportError("the model has no quantized layers; prepare it with an integer scheme (int4_w_g128 ...)")
    qtensors = convert(model)

    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tie = False
    for key, t in tqdm(list(model.state_dict(keep_vars=True).items()), desc="Packing tensors", unit="tensor",
                       disable=not progress):
        if "_fake_quant." in key:
            continue
        mod, _, kind = key.rpartition(".")
        if kind == "weight" and mod in fmts:
            state.update(_pack_layer(mod, qtensors[mod], fmts[mod]))
            continue
        if id(t) in seen:  # a tied head: transformers re-ties it from config.tie_word_embeddings
            tie = True
            continue
        seen[id(t)] = key
        state[key] = t.detach().contiguous().clone()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    lm_head_untied = any(n.split(".")[-1] == "lm_head" for n in fmts) and getattr(model.config, "tie_word_embeddings", False)
    if lm_head_untied:  # the head is quantized, the embedding is not: two different tensors now
        config["tie_word_embeddings"] = False
        emb_key = seen.get(id(model.get_input_embeddings().weight))
        state.setdefault(emb_key, model.get_input_embeddings().weight.detach().clone())
    elif not tie:
        config["tie_word_embeddings"] = getattr(model.config, "tie_word_embeddings", False)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config["quantization_config"] = quantization_config({n: f.name for n, f in fmts.items()}, linear_names)

    with atomic_dir(out_dir, force) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
