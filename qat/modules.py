"""Fake-quantized drop-in modules.

``FakeQuantLinear`` / ``FakeQuantEmbedding`` subclass ``nn.Linear`` / ``nn.Embedding`` and hold the
very same Parameter objects as the module they replace: state-dict keys of the weights stay as they
were (quantizer state is added under ``weight_fake_quant.*``), optimizer references stay valid, and
``isinstance(m, nn.Linear)`` still holds for code (peft, FSDP wrap policies) that looks for it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .formats import QTensor
from .observers import ActQuantizer, WeightQuantizer
from .recompute import recompute_linear

__all__ = ["FakeQuantLinear", "FakeQuantEmbedding", "FAKE_QUANT_MODULES", "is_fake_quant"]


class FakeQuantLinear(nn.Linear):
    _w_cache: Optional[Tensor] = None  # this step's w_hat, set by qat/step_cache.py
    _w_cache_at = None  # where the step cache marks the version of the weight it was computed from
    _w_packed = None  # or a large layer's 4-bit codes for this step (qat/step_cache.py ``_Packed``)

    def __init__(self, linear: nn.Linear, weight_fake_quant: WeightQuantizer,
                 act_fake_quant: Optional[ActQuantizer] = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_fake_quant = weight_fake_quant
        self.act_fake_quant = act_fake_quant
        self.train(linear.training)

    @property
    def _w_cache_version(self) -> int:
        """The weight's version ``_w_cache`` was computed from; -1 (no version a weight has) while unmarked."""
        at = self._w_cache_at  # (the step cache's ``_Marks``, this layer's index)
        return -1 if at is None else at[0].version(at[1])

    def effective_weight(self) -> Tensor:
        """The weight the forward multiplies by: exactly what export writes."""
        return self.weight_fake_quant(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_fake_quant is not None:
            x = self.act_fake_quant(x)
        cache = self._w_cache
        if cache is not None and (torch.compiler.is_compiling() or self.weight._version == self._w_cache_version):
            return F.linear(x, cache, self.bias)  # w_hat computed once per optimizer step (qat/step_cache.py)
        packed = self._w_packed
        if packed is not None:  # codes computed once per optimizer step, w_hat unpacked in forward and backward
            if torch.compiler.is_compiling():
                return F.linear(x, checkpoint(self._w_hat_packed, self.weight, use_reentrant=False), self.bias)
            if self.weight._version == packed.version:
                if torch.is_grad_enabled() and self.weight.requires_grad:
                    return recompute_linear(x, self.weight, self.bias, packed)
                return F.linear(x, packed.w_hat(self.weight), self.bias)
        if torch.compiler.is_compiling():
            if self.weight_fake_quant.recomputes_compiled(self.weight):  # w_hat/mask recomputed in the backward
                return F.linear(x, checkpoint(self._w_hat_as_used, self.weight, use_reentrant=False), self.bias)
        elif self.weight_fake_quant.recomputes(self.weight):  # keeps no w_hat/mask for the backward
            return recompute_linear(x, self.weight, self.bias, self.weight_fake_quant)
        return F.linear(x, self.effective_weight(), self.bias)

    def _w_hat_as_used(self, w: Tensor) -> Tensor:
        """``w_hat`` in the dtype the matmul takes it (autocast's cast, done here, is the same cast ``F.linear``
        would do). Under compile, the checkpoint region: exactly what the partitioner recomputes in the
        backward (the fake quant kernel and the cast), while ``x``, its cast and the matmul stay as in an
        unquantized layer. A region around the whole linear made it recompute the matmuls too (measured:
        ~1B Llama, 1.139x bf16's step)."""
        w_hat = self.weight_fake_quant(w)
        if torch.is_autocast_enabled(w.device.type):
            w_hat = w_hat.to(torch.get_autocast_dtype(w.device.type))
        return w_hat

    def _w_hat_packed(self, w: Tensor) -> Tensor:
        """``_w_hat_as_used`` from the packed cache: the unpack op and autocast's cast, recomputed in the
        backward by the partitioner as there."""
        w_hat = self._w_packed.compiled_w_hat(w)
        if torch.is_autocast_enabled(w.device.type):
            w_hat = w_hat.to(torch.get_autocast_dtype(w.device.type))
        return w_hat

    def quantize(self) -> QTensor:
        return self.weight_fake_quant.quantize(self.weight)

    def to_float(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's Parameters (undoes ``prepare`` for this layer)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin


class FakeQuantEmbedding(nn.Embedding):
    def __init__(self, emb: nn.Embedding, weight_fake_quant: WeightQuantizer):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(emb, attr))
        self.weight = emb.weight
        self.weight_fake_quant = weight_fake_quant
        self.train(emb.training)

    def effective_weight(self) -> Tensor:
        return self.weight_fake_quant(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self.effective_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    def quantize(self) -> QTensor:
        return self.weight_fake_quant.quantize(self.weight)

    def to_float(self) -> nn.Embedding:
        emb = nn.Embedding.__new__(nn.Embedding)
        nn.Module.__init__(emb)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(emb, attr, getattr(self, attr))
        emb.weight = self.weight
        emb.train(self.training)
        return emb


FAKE_QUANT_MODULES = (FakeQuantLinear, FakeQuantEmbedding)


def is_fake_quant(m: nn.Module) -> bool:
    return isinstance(m, FAKE_QUANT_MODULES)
