"""The common shape of every quantization format.

A format turns a float tensor into integer codes plus the per-block parameters a runtime stores
(``quantize``), and back (``dequantize``). Blocks run along the last dimension, as in GGUF and in
per-group integer schemes: a ``[rows, cols]`` weight is viewed as ``[rows, cols // block, block]``.

Affine formats (every format except the k-quants and NF4) also expose the three steps the
fake quantizer needs so that observers can supply their own scales:

    scale, zero = fmt.choose_params(blocks)      # the format's reference rule ("dynamic" observer)
    codes       = fmt.encode(blocks, scale, zero)
    w_hat       = fmt.decode(codes, scale, zero)

``scale`` is always kept in fp32 (that is what the reference rules compute codes with); ``decode``
rounds it to ``fmt.scale_dtype``, the dtype the target file stores. Training and export both go
through these functions, so the exported file holds exactly what the model was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["QuantError", "QTensor", "Format", "AffineFormat", "check_finite", "to_blocks", "from_blocks", "div"]


class QuantError(ValueError):
    """Bad input to a quantizer: a shape the format cannot take, or non-finite values."""


@dataclass
class QTensor:
    """A quantized tensor: what a runtime file stores, unpacked.

    codes:  integer codes, one per element, in the float tensor's shape (int16 holds every format's range).
    scale:  per-block scale, shape ``(*shape[:-1], n_blocks)``, in the format's storage dtype.
    zero:   per-block zero-point (integer formats, as float holding integers), or min (GGUF Q4_1/Q5_1,
            in storage dtype); ``None`` for symmetric formats.
    extra:  format-specific parameters (k-quant sub-block scales, NF4 double-quant state ...).
    """

    format: str
    shape: tuple[int, ...]
    codes: Tensor
    scale: Tensor
    zero: Optional[Tensor] = None
    extra: dict[str, Tensor] = field(default_factory=dict)


def check_finite(w: Tensor, what: str = "tensor") -> None:
    # One reduction instead of a bool tensor the size of w: a NaN or Inf anywhere makes the sum
    # non-finite; only then (or on overflow of a finite sum) look element by element.
    if torch.isfinite(w.sum(dtype=torch.float32)) or torch.isfinite(w).all():
        return
    n_nan = int(torch.isnan(w).sum())
    n_inf = int(torch.isinf(w).sum())
    raise QuantError(
        f"{what} has {n_nan} NaN and {n_inf} Inf values; quantization needs finite input. "
        "Fix the weights (e.g. lower the learning rate or load a healthy checkpoint) before quantizing."
    )


def div(a: Tensor, b: float) -> Tensor:
    """IEEE ``a / b`` on every device. PyTorch's CUDA kernel turns division by a Python number (or CPU
    scalar) into multiplication by its reciprocal, which rounds differently from llama.cpp's ``x / 127``;
    a divisor tensor on ``a``'s own device keeps the true division."""
    return a / torch.full((), b, dtype=a.dtype, device=a.device)


def to_blocks(w: Tensor, block: int) -> Tensor:
    """View ``w`` as ``(*w.shape[:-1], n_blocks, block)`` in fp32. ``block == 0`` means one block per row."""
    cols = w.shape[-1]
    block = block or cols
    if cols % block:
        raise QuantError(f"last dimension {cols} is not a multiple of the block size {block}")
    return w.float().reshape(*w.shape[:-1], cols // block, block)


def from_blocks(blocks: Tensor) -> Tensor:
    return blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])


class Format:
    """A quantization format. Subclasses set ``name``, ``bits``, ``block`` and implement the two methods."""

    name: str
    bits: int
    block: int  # elements per block along the last dim; 0 = one block per row
    scale_dtype: torch.dtype = torch.float32

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise QuantError if a tensor of this shape cannot be stored in this format."""
        if self.block and shape[-1] % self.block:
            raise QuantError(
                f"{self.name} needs a last dimension that is a multiple of {self.block}, got {shape[-1]}"
            )

    def quantize(self, w: Tensor) -> QTensor:
        check_finite(w)
        self.check_shape(tuple(w.shape))
        return self._quantize(w)

    def _quantize(self, w: Tensor) -> QTensor:  # pragma: no cover - interface
        raise NotImplementedError

    def fake(self, w: Tensor) -> Tensor:
        """``dequantize(quantize(w))`` without the input checks: the fake quantizer's forward."""
        return self.dequantize(self._quantize(w))

    def dequantize(self, q: QTensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class AffineFormat(Format):
    """``w_hat = (codes - zero) * scale`` (zero_kind "zp") or ``codes * scale + zero`` (zero_kind "min")."""

    qmin: int
    qmax: int
    zero_kind: Optional[str] = None  # None (symmetric, fixed offset), "zp" or "min"
    offset: int = 0  # fixed code offset of symmetric formats (GGUF Q4_0 stores q + 8)

    # -- the three steps; all take and return fp32 block views ------------------------------------
    def choose_params(self, blocks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def raw_codes(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        """Codes before clamping to ``[qmin, qmax]``; the fake quantizer's clip mask comes from these."""
        raise NotImplementedError

    def clamp_codes(self, raw: Tensor) -> Tensor:
        # "+ 0.0" turns -0.0 (from rounding a small negative) into +0.0: integer codes have no signed zero,
        # and -0.0 * d would give a weight of -0.0 where the runtime reconstructs +0.0.
        return raw.clamp(self.qmin, self.qmax) + 0.0

    def encode(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        return self.clamp_codes(self.raw_codes(blocks, scale, zero))

    def encode_int(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        """``encode`` as the integer codes ``quantize`` stores (int16, or float codes ``pack`` converts).
        Formats override it to make fewer passes over the weights; it must equal ``encode`` exactly."""
        return self.encode(blocks, scale, zero)

    def decode(self, codes: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        s = self.stored_scale(scale).unsqueeze(-1)
        if self.zero_kind == "min":
            return codes.float() * s + self.stored_zero(zero).unsqueeze(-1)
        if self.zero_kind == "zp":
            return (codes.float() - zero.unsqueeze(-1)) * s
        return (codes.float() - self.offset) * s

    def stored_scale(self, scale: Tensor) -> Tensor:
        """The scale as the file stores it, back in fp32 for arithmetic."""
        return scale.to(self.scale_dtype).float()

    def stored_zero(self, zero: Optional[Tensor]) -> Optional[Tensor]:
        if zero is None:
            return None
        if self.zero_kind == "min":
            return zero.to(self.scale_dtype).float()
        return zero

    # -- public API ----------------------------------------------------------------------------------
    def _quantize(self, w: Tensor) -> QTensor:
        blocks = to_blocks(w, self.block)
        scale, zero = self.choose_params(blocks)
        return self.pack(w.shape, self.encode_int(blocks, scale, zero), scale, zero)

    def quantize_with(self, w: Tensor, scale: Tensor, zero: Optional[Tensor]) -> QTensor:
        """Quantize with given (observer-chosen or learned) parameters instead of the reference rule."""
        check_finite(w)
        self.check_shape(tuple(w.shape))
        return self.pack(w.shape, self.encode_int(to_blocks(w, self.block), scale, zero), scale, zero)

    def pack(self, shape, codes: Tensor, scale: Tensor, zero: Optional[Tensor]) -> QTensor:
        return QTensor(
            format=self.name,
            shape=tuple(shape),
            codes=from_blocks(codes).to(torch.int16),
            scale=scale.to(self.scale_dtype),
            zero=None if zero is None else (zero.to(self.scale_dtype) if self.zero_kind == "min" else zero),
        )

    def dequantize(self, q: QTensor) -> Tensor:
        blocks = to_blocks(q.codes, self.block)
        zero = None if q.zero is None else q.zero.float()
        return from_blocks(self.decode(blocks, q.scale.float(), zero))
