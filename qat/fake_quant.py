"""Fake quantization with straight-through gradients.

Forward is always the format's own ``decode(encode(w))`` (so training sees the file's numbers).
Backward:

* ``fake_quantize`` (observer-chosen, non-learned parameters): the straight-through estimator,
  ``dL/dw = dL/dw_hat`` where the code was not clamped, 0 where it was (outside the clip range).
* ``fake_quantize_lsq`` (learned scale, and learned zero for asymmetric formats): the same gradient
  for ``w`` plus LSQ's gradients (Esser et al. 2020) for the scale, ``(w_hat - w) / s`` inside the
  clip range and ``(w_hat - m) / s`` at a clamped code, scaled by ``1 / sqrt(block * q_pos)``; for a
  learned zero-point ``-s`` (integer formats) or ``1`` (GGUF's min) at clamped codes, 0 inside.

Both are explicit ``autograd.Function``s that save only the clip mask, so no extra activations are
kept and the gradients are exactly the hand-derived ones (no ``s * (1/s) != 1`` rounding).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .formats.base import AffineFormat, Format, from_blocks, to_blocks

__all__ = ["fake_quantize", "fake_quantize_lsq", "fake_quantize_any", "lsq_grad_scale", "ste_forward", "lsq_forward",
           "lsq_backward"]


def ste_forward(w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(w_hat, inside)``: the fake-quantized weight in ``w``'s dtype and the clip mask its STE uses."""
    blocks = to_blocks(w, fmt.block)
    raw = fmt.raw_codes(blocks, scale, zero)
    codes = fmt.clamp_codes(raw)
    return from_blocks(fmt.decode(codes, scale, zero)).to(w.dtype), from_blocks(raw == codes).reshape(w.shape)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        w_hat, inside = ste_forward(w, fmt, scale, zero)
        ctx.save_for_backward(inside)
        return w_hat

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


class _PassThrough(torch.autograd.Function):
    """Plain STE for formats without a single affine clip range (k-quants, NF4): identity gradient."""

    @staticmethod
    def forward(ctx, w: Tensor, fmt: Format) -> Tensor:
        return fmt.fake(w).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def lsq_grad_scale(fmt: AffineFormat, row_len: int) -> float:
    """LSQ's ``g = 1 / sqrt(N * Q_p)``: N elements share a scale, Q_p is the largest positive level."""
    n = fmt.block or row_len
    q_pos = fmt.qmax - (fmt.offset if fmt.zero_kind is None else fmt.qmin)
    return 1.0 / math.sqrt(n * max(q_pos, 1))


def lsq_forward(w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor]):
    """LSQ's forward: ``(blocks, w_hat, inside, z)`` in fp32 block views, ``z`` the zero as used (rounded "zp")."""
    blocks = to_blocks(w, fmt.block)
    z = None if zero is None else (torch.round(zero) if fmt.zero_kind == "zp" else zero)
    raw = fmt.raw_codes(blocks, scale, z)
    codes = fmt.clamp_codes(raw)
    return blocks, fmt.decode(codes, scale, z), raw == codes, z


def lsq_backward(grad: Tensor, fmt: AffineFormat, g: float, blocks: Tensor, w_hat: Tensor, inside: Tensor,
                 scale: Tensor, z: Optional[Tensor], has_zero: bool):
    """``(grad_w, grad_scale, grad_zero)`` from the gradient of ``w_hat`` (module docstring)."""
    gb = to_blocks(grad, fmt.block)
    s = fmt.stored_scale(scale).unsqueeze(-1)
    safe_s = torch.where(s == 0, torch.ones_like(s), s)
    at_clip = w_hat - fmt.stored_zero(z).unsqueeze(-1) if fmt.zero_kind == "min" else w_hat
    ds = torch.where(inside, (w_hat - blocks) / safe_s, at_clip / safe_s)
    grad_scale = (gb * ds).sum(-1) * g
    grad_zero = None
    if has_zero:
        dz = torch.ones_like(s) if fmt.zero_kind == "min" else -s
        grad_zero = (gb * (~inside) * dz).sum(-1) * g
    return from_blocks(gb * inside).reshape(grad.shape), grad_scale, grad_zero


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, zero: Optional[Tensor], fmt: AffineFormat, g: float) -> Tensor:
        blocks, w_hat, inside, z = lsq_forward(w, fmt, scale, zero)
        ctx.save_for_backward(blocks, w_hat, inside, scale, z if z is not None else scale.new_empty(0))
        ctx.fmt, ctx.g, ctx.has_zero = fmt, g, zero is not None
        return from_blocks(w_hat).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        blocks, w_hat, inside, scale, z = ctx.saved_tensors
        grad_w, grad_scale, grad_zero = lsq_backward(grad, ctx.fmt, ctx.g, blocks, w_hat, inside, scale, z,
                                                     ctx.has_zero)
        return grad_w, grad_scale, grad_zero, None, None


def fake_quantize(w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor] = None) -> Tensor:
    """``decode(encode(w))`` with the given (fp32) parameters; STE backward zero outside the clip range."""
    return _STE.apply(w, fmt, scale.detach(), None if zero is None else zero.detach())


def fake_quantize_lsq(w: Tensor, fmt: AffineFormat, scale: Tensor, zero: Optional[Tensor] = None,
                      grad_scale: Optional[float] = None) -> Tensor:
    """LSQ fake quant: gradients reach ``w``, ``scale`` and (asymmetric formats) ``zero``."""
    g = lsq_grad_scale(fmt, w.shape[-1]) if grad_scale is None else grad_scale
    return _LSQ.apply(w, scale, zero, fmt, g)


def fake_quantize_any(w: Tensor, fmt: Format) -> Tensor:
    """Reference-rule fake quant for any format (k-quants and NF4 included), identity STE gradient."""
    return _PassThrough.apply(w, fmt)
