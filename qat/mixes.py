"""Named GGUF mixes (q4_k_m ...): per-tensor types by llama.cpp's rules. Filled in with k-quant support."""
from __future__ import annotations

from torch import nn

MIXES: dict[str, object] = {}


def mix_plan(model: nn.Module, mix: str) -> dict:
    raise NotImplementedError(mix)
