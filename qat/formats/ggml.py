"""GGUF's legacy block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, following llama.cpp's reference
quantizer (``quantize_row_*_ref`` in ggml-quants.c, no imatrix) operation for operation in fp32.

Codes are computed with the fp32 scale and its fp32 reciprocal, the fp16 scale is what is stored
and what dequantization multiplies by: exactly as llama.cpp does, so our fake-quantized weight is
bitwise what llama.cpp reconstructs from the file.

Byte packing into GGUF blocks (``to_bytes``/``from_bytes``) lives here too: it is the format's
storage layout and needs no gguf import.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .base import AffineFormat, QTensor, div, to_blocks

__all__ = ["GGMLFormat", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "GGML_FORMATS", "roundf"]


def roundf(y: Tensor) -> Tensor:
    """C's ``roundf``: half away from zero, exact in fp32 (``floor(|y| + 0.5)`` is not)."""
    a = y.abs()
    f = a.floor()
    return torch.copysign(f + (a - f >= 0.5).float(), y)


def _safe_inv(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / torch.where(d == 0, torch.ones_like(d), d))


class GGMLFormat(AffineFormat):
    block = 32
    scale_dtype = torch.float16
    ggml_type: int  # gguf.GGMLQuantizationType value
    type_size: int  # bytes per block

    def to_bytes(self, q: QTensor) -> np.ndarray:
        """Pack into llama.cpp's block layout: uint8 array ``(*shape[:-1], n_blocks * type_size)``."""
        codes = to_blocks(q.codes, 32) if q.codes.dtype.is_floating_point else q.codes.reshape(*q.codes.shape[:-1], -1, 32)
        lead = codes.shape[:-1]
        parts = [q.scale.to(torch.float16).reshape(*lead, 1).view(torch.uint8)]
        if self.zero_kind == "min":
            parts.append(q.zero.to(torch.float16).reshape(*lead, 1).view(torch.uint8))
        if self.bits == 8:
            parts.append(codes.to(torch.int8).view(torch.uint8))
        else:
            c = codes.to(torch.uint8)  # 0..31
            if self.bits == 5:
                hi_bits = (c >> 4).to(torch.int32)
                qh = (hi_bits << torch.arange(32, dtype=torch.int32)).sum(-1, keepdim=True, dtype=torch.int32)
                parts.append(qh.view(torch.uint8))
            low = c & 0xF
            parts.append(low[..., :16] | (low[..., 16:] << 4))
        out = torch.cat(parts, dim=-1)
        return out.reshape(*q.shape[:-1], -1).contiguous().numpy()

    def from_bytes(self, data: np.ndarray, shape: tuple[int, ...]) -> QTensor:
        raw = torch.from_numpy(np.ascontiguousarray(data)).reshape(*shape[:-1], shape[-1] // 32, self.type_size)
        scale = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
        pos, zero = 2, None
        if self.zero_kind == "min":
            zero = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
            pos = 4
        if self.bits == 8:
            codes = raw[..., pos:].contiguous().view(torch.int8).to(torch.int16)
        else:
            qh = None
            if self.bits == 5:
                qh = raw[..., pos : pos + 4].contiguous().view(torch.int32).to(torch.int64)
                pos += 4
            qs = raw[..., pos:].to(torch.int16)
            codes = torch.cat([qs & 0xF, qs >> 4], dim=-1)
            if qh is not None:
                codes = codes | (((qh >> torch.arange(32, dtype=torch.int64)) & 1) << 4).to(torch.int16)
        codes = codes.reshape(shape)
        return QTensor(self.name, tuple(shape), codes, scale, zero)


class _SymMaxFormat(GGMLFormat):
    """Q4_0 / Q5_0: d = max / -2^(b-1) where max is the signed value of largest magnitude."""

    def choose_params(self, blocks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        idx = blocks.abs().argmax(dim=-1, keepdim=True)  # first index on ties, as llama.cpp
        mx = blocks.gather(-1, idx).squeeze(-1)
        return div(mx, -float(self.offset)), None

    def raw_codes(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        # C: MIN(15, (int8_t)(x*id + 8.5f)); trunc == floor here because clamping to >= 0 follows
        inv = _safe_inv(scale).unsqueeze(-1)
        return torch.floor(blocks * inv + (self.offset + 0.5))


class _MinMaxFormat(GGMLFormat):
    """Q4_1 / Q5_1: d = (max - min) / (2^b - 1), stored min m; w = d*q + m."""

    zero_kind = "min"

    def choose_params(self, blocks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        mn = blocks.amin(-1)
        mx = blocks.amax(-1)
        return div(mx - mn, float(self.qmax)), mn

    def raw_codes(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        inv = _safe_inv(scale).unsqueeze(-1)
        return torch.floor((blocks - zero.unsqueeze(-1)) * inv + 0.5)


class _Q8_0(GGMLFormat):
    name, bits, qmin, qmax, ggml_type, type_size = "q8_0", 8, -128, 127, 8, 34

    def choose_params(self, blocks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return div(blocks.abs().amax(-1), 127.0), None

    def raw_codes(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        # llama.cpp never clamps Q8_0 (|x * 127/amax| <= 127); learned scales can, so encode() clamps.
        return roundf(blocks * _safe_inv(scale).unsqueeze(-1))


class _Q4_0(_SymMaxFormat):
    name, bits, qmin, qmax, offset, ggml_type, type_size = "q4_0", 4, 0, 15, 8, 2, 18


class _Q5_0(_SymMaxFormat):
    name, bits, qmin, qmax, offset, ggml_type, type_size = "q5_0", 5, 0, 31, 16, 6, 22


class _Q4_1(_MinMaxFormat):
    name, bits, qmin, qmax, ggml_type, type_size = "q4_1", 4, 0, 15, 3, 20


class _Q5_1(_MinMaxFormat):
    name, bits, qmin, qmax, ggml_type, type_size = "q5_1", 5, 0, 31, 7, 24


Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = _Q8_0(), _Q4_0(), _Q4_1(), _Q5_0(), _Q5_1()
GGML_FORMATS = {f.name: f for f in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)}
