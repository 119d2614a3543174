"""Integer formats int2..int8, symmetric or asymmetric, per tensor / channel / group / token.

Conventions follow compressed-tensors and torchao, so vLLM and HF transformers reconstruct the same
numbers: symmetric ``scale = amax / ((qmax - qmin) / 2)``, codes in ``[-2^(b-1), 2^(b-1) - 1]``;
asymmetric ``scale = (max - min) / (qmax - qmin)`` with an integer zero-point in the same signed
range, ranges always including 0. Rounding is ``torch.round`` (half to even), as in both libraries.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from .base import AffineFormat, QuantError, div

__all__ = ["IntFormat", "parse_int_format"]

_EPS = torch.finfo(torch.float32).eps


class IntFormat(AffineFormat):
    """``granularity``: "tensor", "channel" (one scale per row; per token for activations) or "group"."""

    def __init__(self, bits: int, symmetric: bool = True, granularity: str = "group", group_size: int = 32,
                 scale_dtype: torch.dtype = torch.float16):
        if not 2 <= bits <= 8:
            raise QuantError(f"integer formats take 2 to 8 bits, got {bits}")
        if granularity not in ("tensor", "channel", "group"):
            raise QuantError(f"granularity must be tensor, channel or group, got {granularity!r}")
        if granularity == "group" and group_size <= 0:
            raise QuantError(f"group size must be positive, got {group_size}")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.group_size = group_size if granularity == "group" else 0
        self.block = self.group_size
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.zero_kind = None if symmetric else "zp"
        self.scale_dtype = scale_dtype
        gran = {"tensor": "tensor", "channel": "channel", "group": f"g{group_size}"}[granularity]
        self.name = f"int{bits}{'' if symmetric else '_asym'}_{gran}"

    def choose_params(self, blocks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.granularity == "tensor":
            lo = blocks.amin().expand(blocks.shape[:-1])
            hi = blocks.amax().expand(blocks.shape[:-1])
        else:
            lo, hi = blocks.amin(-1), blocks.amax(-1)
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = div(amax, (self.qmax - self.qmin) / 2)
            return scale.clamp_min(_EPS).contiguous(), None
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = div(hi - lo, float(self.qmax - self.qmin)).clamp_min(_EPS)
        zp = torch.round(self.qmin - lo / scale).clamp(self.qmin, self.qmax)
        return scale.contiguous(), zp.contiguous()

    def raw_codes(self, blocks: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        q = torch.round(blocks / self.stored_scale(scale).unsqueeze(-1))
        return q if zero is None else q + zero.unsqueeze(-1)


_INT_RE = re.compile(r"^int(?P<bits>[2-8])(?P<asym>_asym)?_(?P<gran>tensor|channel|token|g(?P<g>\d+))$")


def parse_int_format(name: str, scale_dtype: torch.dtype = torch.float16) -> Optional[IntFormat]:
    """``int4_g128``, ``int8_channel``, ``int8_asym_token``, ``int3_asym_tensor`` ... or None."""
    m = _INT_RE.match(name)
    if not m:
        return None
    gran = m["gran"]
    granularity = "group" if m["g"] else ("channel" if gran == "token" else gran)
    fmt = IntFormat(int(m["bits"]), symmetric=not m["asym"], granularity=granularity,
                    group_size=int(m["g"] or 0), scale_dtype=scale_dtype)
    fmt.name = name
    return fmt
