"""Adam's second moments of the fake-quantized weights, kept off exact zero.

The STE gives a weight element whose code is clamped a gradient of exactly 0 (the clip mask). An element
clamped in every step so far has ``exp_avg_sq == 0`` (and ``exp_avg == 0``), and PyTorch's CUDA Adam/AdamW
kernels then take ``sqrt(0)`` in IEEE precision, whose special-operand path is a slow branch: a warp that
holds one such element waits for it. Measured on an H200 (BENCHMARKS.md, session 17), fused AdamW over
268M bf16 elements: 1.44 ms with no zeros, 1.84 ms with 2 % exact zeros in the states, 1.55 ms with those
zeros raised to 1e-30; on the ~1B Llama at Q4_0, 0.42 % of the states were exactly zero and the QAT step's
``opt.step()`` ran ~0.45 ms (6 %) slower than bf16's on the same shapes.

:class:`SecondMomentFloor` raises those zeros to ``FLOOR`` (1e-35, a normal number in fp32 and bf16) after the
first optimizer step and again before the floor could decay below the normal range. No weight moves
differently (``tests/test_adam_floor.py`` checks it bitwise for PyTorch's Adam/AdamW implementations, in fp32
and bf16): an element with ``exp_avg_sq == 0`` has had no gradient, so ``exp_avg == 0`` and its update is
``0 / denom`` whatever ``denom`` is; a gradient it gets later adds ``(1 - beta2) * g**2`` to the floor, which
absorbs it exactly for ``|g| > 1e-12`` (beta2 0.999, fp32); and below that, ``sqrt(1e-35) / sqrt(1 - beta2)``
is under half an ulp of ``eps`` (``eps >= 1e-8``, PyTorch's default), so ``denom`` is ``eps`` either way.
(With ``eps=0`` Adam computes ``0 / 0 = nan`` for such an element; with the floor its update stays 0.)

No library offers this (torchao's QAT and PyTorch's optimizers leave the zeros); it is ours because our clip
masks make them. ``QATCallback`` attaches it to Adam and AdamW on CUDA; ``QAT_ADAM_FLOOR=0`` turns it off.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import torch
from torch import Tensor

__all__ = ["FLOOR", "SecondMomentFloor", "attach_floor"]

FLOOR = 1e-35
_LOWEST = 1e-37  # re-apply before ``FLOOR * beta2**n`` falls below this (fp32's and bf16's smallest normal: 1.2e-38)
_STATES = ("exp_avg_sq", "max_exp_avg_sq")  # amsgrad's max takes the denominator's place


class SecondMomentFloor:
    """A step post-hook of ``optimizer``: after its first step, and every ``every`` steps after that, every
    ``exp_avg_sq`` (and amsgrad's ``max_exp_avg_sq``) of ``params`` is raised to at least ``floor``.
    ``every`` defaults to the steps ``floor`` takes to decay to 1e-37 at the smallest ``beta2`` of the
    optimizer's groups (4,602 at 0.999). One pass costs one read and write of those states (~1 ms for the
    ~1B Llama's on an H200), once per ``every`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor], floor: float = FLOOR,
                 every: Optional[int] = None):
        self.optimizer, self.floor = optimizer, floor
        self.params = list(params)
        if every is None:
            beta2 = min(g["betas"][1] for g in optimizer.param_groups)
            every = max(1, int(math.log(_LOWEST / floor) / math.log(beta2))) if 0 < beta2 < 1 else 1
        self.every = every
        self.steps = 0  # steps seen since attached (a resumed run applies at its first step: its states are loaded)
        self.applied = 0  # passes so far
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, *_) -> None:
        if self.steps % self.every == 0:
            self.apply()
        self.steps += 1

    @torch.no_grad()
    def apply(self) -> None:
        """Raise the zeros now (every state below ``floor``, which are the zeros and their decay)."""
        states = []
        for p in self.params:
            st = self.optimizer.state.get(p)
            if st:
                states.extend(st[k] for k in _STATES if isinstance(st.get(k), Tensor))
        if states:
            torch._foreach_clamp_min_(states, self.floor)
        self.applied += 1

    def remove(self) -> None:
        self._handle.remove()


def attach_floor(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> Optional[SecondMomentFloor]:
    """A :class:`SecondMomentFloor` for ``params`` (the fake-quantized weights) on ``optimizer``, or None where
    it has nothing to do: an optimizer other than ``torch.optim.Adam``/``AdamW`` (bitsandbytes' 8-bit states,
    SGD), no CUDA weight among ``params`` (a CPU's ``sqrt`` has no slow path to avoid), or ``QAT_ADAM_FLOOR=0``."""
    if os.environ.get("QAT_ADAM_FLOOR", "") == "0" or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = [p for p in params if id(p) in mine]
    if not any(p.is_cuda for p in params):
        return None
    return SecondMomentFloor(optimizer, params)
