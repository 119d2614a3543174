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

from . import llama_encoder
from .base import AffineFormat, QTensor, check_finite, div, to_blocks

__all__ = ["GGMLFormat", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "GGML_FORMATS", "roundf"]


def roundf(y: Tensor) -> Tensor:
    """C's ``roundf``: half away from zero, exact in fp32 (``floor(|y| + 0.5)`` is not)."""
    a = y.abs()
    f = a.floor()
    return torch.copysign(f + (a - f >= 0.5).float(), y)


def _safe_inv(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / torch.where(d == 0, torch.ones_like(d), d))


# The largest float below 0.5: trunc(y + copysign(_BELOW_HALF, y)) is roundf(y) for every fp32 y
# (checked exhaustively over |y| <= 129); y + 0.5 is not (0.49999997 + 0.5 rounds up to 1.0).
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))


def _fast_path(blocks: Tensor) -> bool:
    """Whether the one-pass parameter rules apply: on CPU (their tie check reads a flag back, a
    device sync elsewhere) and outside autograd (they assign in place)."""
    return blocks.device.type == "cpu" and not (blocks.requires_grad and torch.is_grad_enabled())


def _signed_absmax(blocks: Tensor) -> Tensor:
    """Per block, the first value of largest magnitude (llama.cpp's ``max``), from amax and amin
    instead of an argmax: two plain reductions. Where a positive and a negative value tie in
    magnitude (or the block is all zeros, +0 and -0 alike) only the argmax knows which came first."""
    mx, mn = blocks.amax(-1), blocks.amin(-1)
    neg = mn.neg()
    m = torch.where(neg > mx, mn, mx)
    tie = neg == mx
    if bool(tie.any()):
        at = tie.nonzero(as_tuple=True)
        sub = blocks[at]
        m[at] = sub.gather(-1, sub.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    return m


_LLAMA = {"off": False, "calls": {}}  # llama.cpp's encoder for these: off after a mismatch; calls per format


class GGMLFormat(AffineFormat):
    block = 32
    scale_dtype = torch.float16
    ggml_type: int  # gguf.GGMLQuantizationType value
    type_size: int  # bytes per block

    def quantize_bytes(self, w: Tensor) -> np.ndarray:
        """``to_bytes(quantize(w))``: the reference rule's blocks of ``w``, ``(*shape[:-1], bytes)``.

        This is what a layer with the ``dynamic`` observer trains with and exports, so export takes it
        from llama.cpp's own encoder where llama-cpp-python is installed: our per-layer torch encoding was
        a third of a Q4_0 export of SmolLM2 (0.13 of 0.37 s on 2 cores) and llama.cpp's whole quantize
        run took 0.29 s. The first tensor of each format is checked row by row against ours (as for the
        k-quants, ``kquants.py``); a difference hands over to ours for the process, with a warning."""
        check_finite(w)
        self.check_shape(tuple(w.shape))
        if llama_encoder.enabled():
            enc = llama_encoder.checked_blocks(self, w, lambda rows: self.to_bytes(self.quantize(rows)), _LLAMA)
            if enc is not None:
                return enc[1].reshape(*w.shape[:-1], -1)
        return self.to_bytes(self.quantize(w))

    def to_bytes(self, q: QTensor) -> np.ndarray:
        """Pack into llama.cpp's block layout: uint8 array ``(*shape[:-1], n_blocks * type_size)``."""
        codes = to_blocks(q.codes, 32) if q.codes.dtype.is_floating_point else q.codes.reshape(*q.codes.shape[:-1], -1, 32)
        lead = codes.shape[:-1]
        out = torch.empty(*lead, self.type_size, dtype=torch.uint8, device=codes.device)  # filled field by field
        halves = out.view(torch.int16)  # the fp16 fields as one strided column each, not 2-byte rows
        halves[..., 0] = q.scale.to(torch.float16).reshape(lead).view(torch.int16)
        pos = 2
        if self.zero_kind == "min":
            halves[..., 1] = q.zero.to(torch.float16).reshape(lead).view(torch.int16)
            pos = 4
        if self.bits == 8:
            out[..., pos:].view(torch.int8).copy_(codes)  # int8 codes, two's complement bytes
        else:
            # One code per byte, eight bytes per int64 word, four words per block: the bit work runs
            # on whole words (long contiguous operations) with no carry from one byte into the next.
            words = codes.to(torch.uint8).contiguous().view(torch.int64).reshape(-1)  # codes 0..31
            if self.bits == 5:
                # bit 4 of each code, eight bytes gathered into one by the multiply: qh bit j = code j
                hi = (words >> 4) & 0x0101010101010101
                qh = ((hi * 0x0102040810204080) >> 56) & 0xFF
                out[..., pos:pos + 4] = qh.to(torch.uint8).reshape(*lead, 4)
                pos += 4
            # byte j: low nibble of code j, high nibble the low nibble of code j + 16 (word i + 2)
            nib = words & 0x0F0F0F0F0F0F0F0F
            packed = torch.empty_like(nib)
            torch.bitwise_or(nib[:-2], nib[2:] << 4, out=packed[:-2])
            out[..., pos:] = packed.view(*lead, 4)[..., :2].view(torch.uint8)
        return out.reshape(*q.shape[:-1], -1).cpu().numpy()

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
        if _fast_path(blocks):
            mx = _signed_absmax(blocks)
        else:
            idx = blocks.abs().argmax(dim=-1, keepdim=True)  # first index on ties, as llama.cpp
            mx = blocks.gather(-1, idx).squeeze(-1)
        return div(mx, -float(self.offset)), None

    def raw_codes(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        # C: MIN(15, (int8_t)(x*id + 8.5f)); trunc == floor here because clamping to >= 0 follows
        inv = _safe_inv(scale).unsqueeze(-1)
        return torch.floor(blocks * inv + (self.offset + 0.5))

    def encode_int(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        # raw_codes, clamp, floor in three in-place passes: clamped to [0, qmax] first, the
        # conversion's truncation is the floor
        y = blocks * _safe_inv(scale).unsqueeze(-1)
        y += self.offset + 0.5
        return y.clamp_(self.qmin, self.qmax).to(torch.int16)


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

    def encode_int(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        y = blocks - zero.unsqueeze(-1)
        y *= _safe_inv(scale).unsqueeze(-1)
        y += 0.5
        return y.clamp_(self.qmin, self.qmax).to(torch.int16)  # truncation of [0, qmax] is the floor


class _Q8_0(GGMLFormat):
    name, bits, qmin, qmax, ggml_type, type_size = "q8_0", 8, -128, 127, 8, 34

    def choose_params(self, blocks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if _fast_path(blocks):  # max(amax, -amin) is the largest |x| exactly; abs_ makes a -0.0 +0.0
            amax = torch.maximum(blocks.amax(-1), blocks.amin(-1).neg()).abs_()
        else:
            amax = blocks.abs().amax(-1)
        return div(amax, 127.0), None

    def raw_codes(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        # llama.cpp never clamps Q8_0 (|x * 127/amax| <= 127); learned scales can, so encode() clamps.
        return roundf(blocks * _safe_inv(scale).unsqueeze(-1))

    def encode_int(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        # clamp(roundf(y)) == roundf(clamp(y)) on these integer bounds; then roundf(y) is the
        # conversion's truncation of y + copysign(_BELOW_HALF, y)
        y = blocks * _safe_inv(scale).unsqueeze(-1)
        y.clamp_(self.qmin, self.qmax)
        y += torch.copysign(torch.tensor(_BELOW_HALF, dtype=y.dtype, device=y.device), y)
        return y.to(torch.int16)


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
