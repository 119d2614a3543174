"""Adam's second moments of the fake-quantized weights, kept off exact zero.

The STE gives a weight element whose code is clamped a gradient of exactly 0 (the clip mask). An element
clamped in every step so far has ``exp_avg_sq == 0`` (and ``exp_avg == 0``), and PyTorch's CUDA Adam/AdamW
kernels are slower on such elements (IEEE ``sqrt`` and division take a slow branch for special operands; a
warp that holds one waits for it). Measured on an H200 (``bench/adam_zeros.py``, BENCHMARKS.md, session 17),
fused AdamW over 268M bf16 elements: 1.50 ms with no zeros; with 2 % zeros 1.87 ms, 1.73 ms with the floor;
with 0.42 % (the ~1B Llama's share at Q4_0) 1.55 ms, 1.52 ms with the floor. So the floor takes back about
half of what the zeros cost in the fused kernel (the zero ``exp_avg`` stays: its division is the rest; the
foreach kernels: 3.90 -> 3.88 ms at 0.42 %, 3.75 ms with none), ~0.1 ms of the 1B step's ~7 ms AdamW: not
the whole ~0.45 ms by which that step's AdamW has run slower than bf16's (sessions 14-17, near the noise).

:class:`SecondMomentFloor` raises those zeros to ``FLOOR`` (1e-35, a normal number in fp32 and bf16) after the
first optimizer step and again before the floor could decay below the normal range. No weight moves
differently (``tests/test_adam_floor.py`` checks it bitwise for PyTorch's Adam/AdamW implementations, in fp32
and bf16, with always-, sometimes- and tiny-gradient elements). An element with ``exp_avg_sq == 0`` has had
no gradient (or only ones whose squares underflow): its ``exp_avg`` is 0 (or tiny), and ``denom`` is ``eps``
with or without the floor, since ``sqrt(1e-35) / sqrt(1 - beta2)`` is under half an ulp of ``eps`` (``eps >=
1e-8``, PyTorch's default). When it gets a gradient later, ``(1 - beta2) * g**2`` absorbs the floor exactly
for ``|g| > 1e-12`` (beta2 0.999, fp32), and below that ``denom`` is ``eps`` again.
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
