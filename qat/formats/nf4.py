"""NF4 (QLoRA's 4-bit NormalFloat), bitwise as bitsandbytes 0.50 computes it on CPU.

Rules, read from bitsandbytes (``functional.py``, ``backends/default/ops.py``, ``csrc/cpu_ops.cpp``):

* Blocks of 64 consecutive elements of the flattened tensor (our blocks along the last dim are the
  same blocks, since the last dim is a multiple of 64). ``absmax`` is the block's max ``|w|`` in fp32
  (bf16/fp16 input is first cast to fp32, exactly).
* ``scaled = clamp(w * (1 / max(absmax, 1e-38)), -1, 1)``; the code is the nearest of the 16 NF4
  values, found by ``bucketize`` on the fp32 midpoints ``(c[i] + c[i+1]) / 2``: a value exactly on a
  midpoint takes the *lower* code. An all-zero block gets code 7 (0.0) everywhere.
* Dequantization is ``NF4[code] * absmax`` in fp32. bnb then casts to the weight's dtype with
  round-to-nearest-even, as ``Tensor.to`` does; on CPUs with AVX512-BF16 its bf16 cast
  (VCVTNEPS2BF16) also flushes subnormal values to zero.
* Double quantization (``compress_statistics=True``): ``offset = absmax.mean()`` over the flat absmax
  vector, then ``absmax - offset`` is quantized blockwise (256 per block) to the 8-bit signed dynamic
  map. bnb's CPU kernel does not search the map: it maps ``v / blockmax`` to one of 65536 evenly
  spaced bins of [-1, 1] and reads a precomputed nearest-code table for the bin, so a value near a
  code midpoint may take the farther code. We build the same table. A block whose 256 values are all
  zero gets code 0. The absmax used for dequantization is ``map[code] * blockmax + offset`` in fp32.

Packing in bnb storage: two codes per byte, the first element in the high nibble; ``quantize_4bit``
returns a ``(numel // 2, 1)`` uint8 tensor. Only the bnb conversion helpers at the bottom import
bitsandbytes, and only when called.

Note: ``offset`` is a torch ``mean``; for more than 32768 blocks its last bit can depend on the
number of threads, so to match a model bnb quantized in another process, convert with ``from_bnb``
rather than re-quantizing. bnb's CUDA kernels use their own code-selection rules and are not
what this module reproduces.
"""
from __future__ import annotations

from functools import lru_cache
from math import prod
from typing import Any, Optional

import torch
from torch import Tensor

from . import register_format
from .base import Format, QTensor, QuantError, check_finite, from_blocks, to_blocks

__all__ = ["NF4Format", "NF4", "NF4_CODE", "DQ_BLOCK", "dynamic_map", "pack_nibbles", "unpack_nibbles",
           "dequantize_bnb", "from_bnb", "to_bnb"]

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), normalized to [-1, 1].
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
DQ_BLOCK = 256  # absmax values per block of the nested 8-bit quantization
_LUT_SIZE = 65536  # bins of [-1, 1] in bnb's CPU 8-bit quantizer


def dynamic_map() -> Tensor:
    """bnb's ``create_dynamic_map()`` (signed, 7 exponent bits, 8 bits): 256 sorted fp32 values."""
    data: list[float] = []
    for i in range(7):  # fraction items 2^i + 1 per decade 10^(i-6)
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@lru_cache(maxsize=None)
def _cached(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NF4 code, its midpoints, the dynamic map and bnb's 65536-bin nearest-code table, on ``device``."""
    dmap = dynamic_map()
    bins = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    lut = torch.bucketize(bins, 0.5 * (dmap[:-1] + dmap[1:]))  # first code whose upper midpoint >= bin
    return tuple(t.to(device) for t in (NF4_CODE, NF4_BOUNDS, dmap, lut))  # type: ignore[return-value]


def _quantize_dynamic(x: Tensor, block: int = DQ_BLOCK) -> tuple[Tensor, Tensor]:
    """bnb's ``cquantize_blockwise_cpu_fp32`` with the dynamic map: flat fp32 ``x`` -> (uint8 codes, blockmax)."""
    _, _, _, lut = _cached(x.device)
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % block)).reshape(-1, block)  # zero padding leaves max |x| alone
    blockmax = blocks.abs().amax(-1)
    empty = blockmax == 0  # bnb writes code 0 for these blocks
    inv = torch.where(empty, torch.zeros_like(blockmax), 1.0 / torch.where(empty, torch.ones_like(blockmax), blockmax))
    v = (blocks * inv.unsqueeze(-1)).clamp(-1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # C cast to uint16 truncates
    codes = torch.where(empty.unsqueeze(-1), torch.zeros_like(idx), lut[idx])
    return codes.reshape(-1)[:n].to(torch.uint8), blockmax


def _dequantize_dynamic(codes: Tensor, blockmax: Tensor, block: int, dmap: Optional[Tensor] = None) -> Tensor:
    if dmap is None:
        dmap = _cached(codes.device)[2]
    n = codes.numel()
    scale = blockmax.float().repeat_interleave(block)[:n]
    return dmap.float()[codes.reshape(-1).long()] * scale


class NF4Format(Format):
    """NF4 with blocksize 64; ``double_quant`` as bnb's ``compress_statistics``.

    ``QTensor.scale`` is the absmax dequantization multiplies by (after double quant when on);
    ``extra`` holds what bnb's QuantState stores for it: ``absmax_codes`` (uint8, shaped like scale),
    ``absmax_scale`` (fp32, one per 256 flat absmax values) and ``offset`` (fp32 scalar).
    """

    name, bits, block = "nf4", 4, 64

    def __init__(self, double_quant: bool = True):
        self.double_quant = double_quant

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) == 0 or prod(shape) == 0:
            raise QuantError(f"nf4 needs a non-empty tensor with at least one dimension, got shape {shape}")
        super().check_shape(shape)

    def quantize(self, w: Tensor) -> QTensor:
        check_finite(w)
        self.check_shape(tuple(w.shape))
        return self._quantize(w)

    def _quantize(self, w: Tensor) -> QTensor:
        code, bounds, _, _ = _cached(w.device)
        blocks = to_blocks(w, self.block)
        absmax = blocks.abs().amax(-1)
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).unsqueeze(-1)), -1, 1)
        codes = from_blocks(torch.bucketize(scaled, bounds)).to(torch.int16)
        if not self.double_quant:
            return QTensor(self.name, tuple(w.shape), codes, absmax)
        flat = absmax.reshape(-1)
        offset = flat.mean()
        absmax_codes, absmax_scale = _quantize_dynamic(flat - offset)
        scale = (_dequantize_dynamic(absmax_codes, absmax_scale, DQ_BLOCK) + offset).reshape(absmax.shape)
        extra = {"absmax_codes": absmax_codes.reshape(absmax.shape), "absmax_scale": absmax_scale, "offset": offset}
        return QTensor(self.name, tuple(w.shape), codes, scale, extra=extra)

    def dequantize(self, q: QTensor) -> Tensor:
        code = _cached(q.codes.device)[0]
        values = to_blocks(code[q.codes.long()], self.block) * q.scale.float().unsqueeze(-1)
        return from_blocks(values).reshape(q.shape)

    def fake(self, w: Tensor) -> Tensor:
        return self.dequantize(self._quantize(w))

    def __repr__(self) -> str:
        return f"NF4Format(double_quant={self.double_quant})"


NF4 = register_format(NF4Format())


# -- bnb storage ---------------------------------------------------------------------------------------

def pack_nibbles(codes: Tensor) -> Tensor:
    """Codes 0..15 -> bnb's packed storage ``(ceil(n / 2), 1)`` uint8, first element in the high nibble."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return ((c[0::2] << 4) | c[1::2]).unsqueeze(1)


def unpack_nibbles(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """bnb's packed storage (any storage dtype) -> int16 codes of ``shape``."""
    b = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int16)
    return torch.stack([b >> 4, b & 0xF], dim=-1).reshape(-1)[: prod(shape)].reshape(shape)


def _unwrap(weight: Any) -> tuple[Tensor, Any]:
    if isinstance(weight, (tuple, list)):
        packed, qs = weight
    else:  # bnb.nn.Params4bit
        packed, qs = weight.data, getattr(weight, "quant_state", None)
    if qs is None:
        raise QuantError("weight has no quant_state: it is not bnb-quantized yet (move Params4bit to a device first)")
    if qs.quant_type != "nf4":
        raise QuantError(f"expected an nf4 bnb weight, got quant_type={qs.quant_type!r}")
    if getattr(qs, "packing_format_for_cpu", False):
        raise QuantError(
            "this bnb weight is in bnb's CPU inference layout (bf16 absmax, repacked codes), set by "
            "Linear4bit.forward in eval/no-grad mode on CPU; undo it with "
            "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse or keep the module in train mode"
        )
    return packed, qs


def _bnb_absmax(qs: Any) -> Tensor:
    """The fp32 absmax bnb's ``dequantize_4bit`` multiplies by (flat, one per block)."""
    if not qs.nested:
        return qs.absmax.float().reshape(-1)
    s2 = qs.state2
    return _dequantize_dynamic(qs.absmax, s2.absmax, s2.blocksize, s2.code) + qs.offset.float()


def dequantize_bnb(weight: Any) -> Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` for an nf4 ``Params4bit`` or ``(packed, quant_state)``,
    in fp32 (bitwise bnb's result for fp32 weights). For bf16/fp16 weights bnb rounds this to the weight's
    dtype; ``.to(dtype)`` matches it except that on CPUs with AVX512-BF16 bnb's bf16 cast flushes
    subnormal values to zero."""
    packed, qs = _unwrap(weight)
    shape = tuple(qs.shape)
    codes = unpack_nibbles(packed, shape).reshape(-1).long()
    absmax = _bnb_absmax(qs).repeat_interleave(qs.blocksize)[: codes.numel()]
    # bnb's own codebook (equal to NF4_CODE), as the nested absmax uses its map: no lru_cache on this path,
    # so torch.compile traces it whole
    return (qs.code.float()[codes] * absmax).reshape(shape)


def from_bnb(packed: Tensor, quant_state: Any) -> QTensor:
    """bnb nf4 storage (blocksize 64, nested blocksize 256 if double-quantized) -> QTensor."""
    packed, qs = _unwrap((packed, quant_state))
    shape = tuple(qs.shape)
    if qs.blocksize != NF4.block or (qs.nested and qs.state2.blocksize != DQ_BLOCK):
        raise QuantError(f"nf4 format uses blocksize {NF4.block} (nested {DQ_BLOCK}); bnb weight has "
                         f"{qs.blocksize}" + (f" (nested {qs.state2.blocksize})" if qs.nested else ""))
    NF4.check_shape(shape)
    block_shape = (*shape[:-1], shape[-1] // NF4.block)
    codes = unpack_nibbles(packed, shape)
    scale = _bnb_absmax(qs).reshape(block_shape)
    extra: dict[str, Tensor] = {}
    if qs.nested:
        extra = {"absmax_codes": qs.absmax.reshape(block_shape), "absmax_scale": qs.state2.absmax.float(),
                 "offset": qs.offset.float().reshape(())}
    return QTensor(NF4.name, shape, codes, scale, extra=extra)


def to_bnb(q: QTensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Any]:
    """QTensor -> (packed uint8, bnb QuantState); ``dtype`` is the dtype bnb dequantizes to."""
    from bitsandbytes.functional import QuantState, create_dynamic_map, get_4bit_type

    device = q.codes.device
    common = dict(shape=torch.Size(q.shape), code=get_4bit_type("nf4", device=device), blocksize=NF4.block,
                  quant_type="nf4", dtype=dtype)
    if "absmax_codes" in q.extra:
        state2 = QuantState(absmax=q.extra["absmax_scale"].float(), code=create_dynamic_map().to(device),
                            blocksize=DQ_BLOCK, dtype=torch.float32)
        qs = QuantState(absmax=q.extra["absmax_codes"].reshape(-1).to(torch.uint8),
                        offset=q.extra["offset"].float(), state2=state2, **common)
    else:
        qs = QuantState(absmax=q.scale.float().reshape(-1), **common)
    return pack_nibbles(q.codes), qs
