"""How quantization parameters are chosen, and where they live.

``WeightQuantizer`` is the per-layer module that owns a weight's quantization state as buffers (or,
for ``learned``, Parameters), so checkpoints hold it and a resumed run continues exactly:

* ``dynamic``        the format's reference rule (llama.cpp's for GGUF types), recomputed every step.
* ``mse``            per block, the clip ratio from a fixed grid that minimises the quantization MSE,
                     recomputed every step. Lower weight error is not lower loss: on SmolLM2 it clips
                     outliers that matter and PTQ perplexity gets worse than the reference rule's.
* ``learned``        LSQ: the scale (and an asymmetric format's zero/min) are Parameters, initialised
                     from the reference rule and trained with the weights.
* frozen             any observer stops updating once ``frozen`` is set (``freeze_step``); the codes
                     are then computed from the stored parameters.

``ActQuantizer`` fake-quantizes activations: ``dynamic`` (per token, from the batch itself) or
``moving_average`` (per tensor, an EMA of min/max kept in buffers while training).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .fake_quant import (fake_quantize, fake_quantize_any, fake_quantize_lsq, lsq_backward, lsq_forward, lsq_grad_scale,
                         ste_forward)
from .kernels.batch import group_of
from .kernels.triton_fq import can_fuse, fused_fake_quant, fused_ste
from .formats import AffineFormat, Format, QTensor, QuantError, get_format
from .formats.base import from_blocks, to_blocks

__all__ = ["OBSERVERS", "WeightQuantizer", "ActQuantizer", "mse_params"]

# The recompute path (qat/recompute.py) by default only for weights this large. Measured on an H200, eager
# q4_0 (BENCHMARKS.md): on a ~1B Llama (4-17M-element layers) it took peak memory from 1.088x to 1.004x
# bf16's for 1.116x -> 1.129x the step time; on SmolLM2 (layers <= 0.9M elements) it saves 0.3 GiB but the
# step went 1.21x -> 1.54x: one kernel per layer in the backward, where the step is bound by launches.
RECOMPUTE_MIN_NUMEL = 1 << 22


@torch.compiler.assume_constant_result
def _recompute_switch() -> str:
    """``QAT_RECOMPUTE`` as a constant of the compiled graph (read once, when dynamo traces)."""
    return os.environ.get("QAT_RECOMPUTE", "")


OBSERVERS = ("dynamic", "mse", "learned")
ACT_OBSERVERS = ("dynamic", "moving_average")

MSE_GRID = torch.linspace(1.0, 0.5, 21).tolist()  # clip ratios searched by the mse observer


@torch.no_grad()
def mse_params(fmt: AffineFormat, blocks: Tensor, grid: list[float] = MSE_GRID) -> tuple[Tensor, Optional[Tensor]]:
    """Per block, the parameters of ``choose_params(r * block)`` for the r in ``grid`` with the lowest
    quantization MSE of the unshrunk block. r = 1 is the reference rule, so this never does worse."""
    best_scale, best_zero = fmt.choose_params(blocks)
    best_err = (fmt.decode(fmt.encode(blocks, best_scale, best_zero), best_scale, best_zero) - blocks).pow(2).sum(-1)
    for r in grid[1:]:
        scale, zero = fmt.choose_params(blocks * r)
        err = (fmt.decode(fmt.encode(blocks, scale, zero), scale, zero) - blocks).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


# How many times any quantizer's switches (``enabled``, frozen) were set. What reads every quantizer's switches
# at every batch's start (``QATCallback``'s schedule, the step cache's state check) reads this one number instead
# while it is unchanged: after the host waited for the device at the step's end, each object touched costs ~1 us
# there while the GPU idles (~1B Llama, 112 quantizers; BENCHMARKS.md, sessions 17-18).
_SWITCHES = [0]


def switch_epoch() -> int:
    """A number that changes whenever any quantizer's ``enabled`` or frozen switch is set."""
    return _SWITCHES[0]


class _Freezable(nn.Module):
    """The switches: ``enabled`` (fake quant on or off; not state) and a ``frozen`` buffer (saved in
    checkpoints) with a Python mirror, so no forward syncs the device to read it. Each setting bumps
    ``switch_epoch()``."""

    _enabled = True

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.__dict__["_enabled"] = value
        _SWITCHES[0] += 1

    def __setstate__(self, state: dict) -> None:
        if "enabled" in state:  # pickled before ``enabled`` was a property
            state["_enabled"] = state.pop("enabled")
        super().__setstate__(state)

    def _init_frozen(self) -> None:
        self._set_frozen(False)
        self.register_buffer("frozen", torch.tensor(False))

    def _set_frozen(self, frozen: bool) -> None:
        self._frozen = frozen
        _SWITCHES[0] += 1

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) updating the parameters/statistics; the stored ones are then used as they are."""
        if frozen != self._frozen:
            self._set_frozen(frozen)
            self.frozen.fill_(frozen)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._set_frozen(bool(self.frozen))


class WeightQuantizer(_Freezable):
    """Fake-quantizes one weight tensor in one format. Holds no reference to the weight itself."""

    def __init__(self, fmt: Format | str, weight: Tensor, observer: str = "dynamic"):
        super().__init__()
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        if observer not in OBSERVERS:
            raise QuantError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
        self.affine = isinstance(self.fmt, AffineFormat)
        if not self.affine and observer != "dynamic":
            raise QuantError(
                f"{self.fmt.name} has its own two-level scale search; only observer='dynamic' applies to it"
            )
        self.observer = observer
        self.enabled = True  # set every step by QATCallback from start_step; not state
        self._init_frozen()
        if self.affine:
            with torch.no_grad():
                blocks = to_blocks(weight.detach(), self.fmt.block)
                # learned starts from the reference rule (no clipping), not from mse: the weight-MSE optimum
                # clips outliers that matter (SmolLM2-135M, Q4_0 PTQ: 33.8 ppl with mse vs 29.9 with the
                # reference rule on 512 held-out tokens), and LSQ then starts from that worse point
                scale, zero = mse_params(self.fmt, blocks) if observer == "mse" else self.fmt.choose_params(blocks)
            if observer == "learned":
                self.scale = nn.Parameter(scale.clone())
                self.zero = None if zero is None else nn.Parameter(zero.clone())
            else:
                self.register_buffer("scale", scale.clone())
                self.register_buffer("zero", None if zero is None else zero.clone())

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` (bf16-true training) must move the quantization parameters but
        # never round them: they are fp32 (what the formats compute and export), whatever the weights are.
        keep = {k: t.data for k in ("scale", "zero") if (t := getattr(self, k, None)) is not None}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = getattr(self, k)
            if new.dtype != old.dtype:
                fixed = old.to(new.device)
                if isinstance(new, nn.Parameter):
                    new.data = fixed
                else:
                    setattr(self, k, fixed)
        return self

    @torch.no_grad()
    def observe(self, w: Tensor) -> None:
        """Update the stored parameters from ``w`` unless frozen or learned."""
        if not self.affine or self.observer == "learned" or self._frozen:
            return
        blocks = to_blocks(w.detach(), self.fmt.block)
        scale, zero = mse_params(self.fmt, blocks) if self.observer == "mse" else self.fmt.choose_params(blocks)
        self.scale.copy_(scale)
        if zero is not None:
            self.zero.copy_(zero)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        return self._fake_quant(w)[0]

    def _fake_quant(self, w: Tensor, detached: bool = False) -> tuple[Tensor, str, tuple]:
        """``(w_hat, how, params)``. ``detached`` (the recompute path, qat/recompute.py): no autograd graph,
        and ``how``/``params`` tell ``redo`` how to give the same bits again in the backward."""
        if torch.compiler.is_compiling():
            w_hat = getattr(self, "_w_hat", None)  # set while a compiled forward runs the group op (kernels/batch.py)
            if w_hat is not None:
                return w_hat, ("fused" if self.affine else "any"), ()
        if not self.affine or (self.observer == "dynamic" and not self._frozen and not torch.compiler.is_compiling()):
            group = group_of(self)  # all layers at once (kernels/batch.py); compile traces per layer
            if group is not None:
                out = group.take(self, w, detached)  # None where the group is not active or does not cover w
                if out is not None:
                    return out, ("fused" if self.affine else "any"), ()
        if detached:
            with torch.no_grad():
                return self._fake_quant_alone(w, detached)
        return self._fake_quant_alone(w, detached)

    def _fake_quant_alone(self, w: Tensor, detached: bool) -> tuple[Tensor, str, tuple]:
        if not self.affine:
            return fake_quantize_any(w, self.fmt), "any", ()
        if self.observer == "learned":
            if self._frozen:  # frozen: the learned values are used as they are, and get no gradient
                zero = self._learned_zero()
                params = (self.scale.detach(), None if zero is None else zero.detach()) if detached else ()
                return fake_quantize(w, self.fmt, self.scale, zero), "ste", params
            return fake_quantize_lsq(w, self.fmt, self.scale, self.zero), "lsq", (self.scale, self.zero)
        dynamic = self.observer == "dynamic" and not self._frozen
        fused = can_fuse(w, self.fmt)  # one GPU kernel: parameters (unless frozen/mse), codes, w_hat, mask
        if not (fused and dynamic):
            self.observe(w)
        params = ()  # dynamic: the parameters are a function of w, recomputed with it
        if detached and not dynamic:  # mse rewrites its buffers every forward: the backward gets a copy
            keep = (lambda t: t) if self._frozen else torch.clone
            params = (keep(self.scale), None if self.zero is None else keep(self.zero))
        if fused:
            return fused_ste(w, self.fmt, self.scale, self.zero, dynamic), "fused", params
        return fake_quantize(w, self.fmt, self.scale, self.zero), "ste", params

    # -- the recompute path (qat/recompute.py) ------------------------------------------------------------
    def recomputes(self, w: Tensor, switch: Optional[str] = None) -> bool:
        """Whether a ``FakeQuantLinear`` using this quantizer runs the recompute path for ``w`` now: eager
        training of ``w``, and ``QAT_RECOMPUTE`` "1", or unset with ``w`` on CUDA in an affine format and
        at least ``RECOMPUTE_MIN_NUMEL`` elements (k-quants and NF4 would repeat their scale search in the
        backward, so they opt in with "1"). ``switch``: ``QAT_RECOMPUTE`` where the caller read it already."""
        if not (self.enabled and w.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return False
        return self.recompute_rule(w, switch)

    def recompute_rule(self, w: Tensor, switch: Optional[str] = None) -> bool:
        """The size rule alone, whatever the training state: ``QAT_RECOMPUTE`` "1", or unset with ``w`` on CUDA
        in an affine format and at least ``RECOMPUTE_MIN_NUMEL`` elements. The eager and compiled paths and
        the step cache (which leaves these layers out) all decide by it."""
        if switch is None:
            switch = os.environ.get("QAT_RECOMPUTE", "")
        return switch == "1" or (switch != "0" and w.is_cuda and self.affine and w.numel() >= RECOMPUTE_MIN_NUMEL)

    def recomputes_compiled(self, w: Tensor) -> bool:
        """Whether a ``FakeQuantLinear`` traced by ``torch.compile`` computes ``w_hat`` in a
        ``torch.utils.checkpoint`` region (``FakeQuantLinear._w_hat_as_used``), so AOTAutograd's partitioner
        recomputes ``w_hat`` and the clip mask in the backward instead of saving them: the compiled
        counterpart of the eager recompute path, by the same rule (``QAT_RECOMPUTE``, read once at trace
        time; unset: CUDA weights of at least ``RECOMPUTE_MIN_NUMEL`` elements). Only where the per-layer
        kernel op runs (``can_fuse``), not the one-op group (``QAT_COMPILE_GROUP``, k-quants), which computes
        every ``w_hat`` up front, and only for ``dynamic`` (frozen or not): ``mse`` writes its buffers in the
        forward.
        Measured on an H200, ~1B Llama config, batch 4 x 2048, compiled q4_0: peak memory 1.122x -> 1.009x
        bf16's, step 1.027x -> 1.032x (BENCHMARKS.md)."""
        if not (self.enabled and self.affine and w.requires_grad and torch.is_grad_enabled()):
            return False
        if getattr(self, "_w_hat", None) is not None or self.observer != "dynamic" or not can_fuse(w, self.fmt):
            return False
        return self.recompute_rule(w, _recompute_switch())  # can_fuse: on CUDA

    def fake_quant_detached(self, w: Tensor) -> tuple[Tensor, str, tuple]:
        """The forward's ``w_hat`` (observer buffers updated as ``forward`` does) without an autograd graph,
        and ``how``/``params`` for ``redo``."""
        return self._fake_quant(w, detached=True)

    def redo(self, w: Tensor, how: str, params: tuple) -> tuple[Tensor, Callable]:
        """In the backward: ``w_hat`` bitwise as ``fake_quant_detached`` gave it (same kernel, same or
        recomputed parameters), and ``ste(grad_w_hat) -> (grad_w, *grad_params)``; ``ste`` may reuse
        ``grad_w_hat``'s memory."""
        fmt = self.fmt
        if how == "any":
            return fake_quantize_any(w, fmt), lambda g: (g,)
        if how == "lsq":
            scale, zero = params
            blocks, w_hat, inside, z = lsq_forward(w, fmt, scale, zero)
            g = lsq_grad_scale(fmt, w.shape[-1])
            return (from_blocks(w_hat).to(w.dtype),
                    lambda gw: lsq_backward(gw, fmt, g, blocks, w_hat, inside, scale, z, zero is not None))
        if how == "fused":
            if params:
                w_hat, inside = fused_fake_quant(w, fmt, params[0], params[1], False)
            else:  # dynamic: the kernel recomputes the parameters, into scratch (the buffers stay as they are)
                scratch = (torch.empty_like(self.scale), None if self.zero is None else torch.empty_like(self.zero))
                w_hat, inside = fused_fake_quant(w, fmt, *scratch, True)
        else:
            scale, zero = params or fmt.choose_params(to_blocks(w, fmt.block))
            w_hat, inside = ste_forward(w, fmt, scale, zero)
        return w_hat, lambda gw: (gw.mul_(inside),)

    @torch.no_grad()
    def quantize(self, w: Tensor) -> QTensor:
        """The integer codes and parameters this quantizer's forward uses for ``w`` (what export writes)."""
        if not self.affine:
            return self.fmt.quantize(w.detach())
        self.observe(w)
        zero = self._learned_zero() if self.observer == "learned" else self.zero
        return self.fmt.quantize_with(w.detach(), self.scale.detach(), None if zero is None else zero.detach())

    def _learned_zero(self):
        """A learned integer zero-point is a float Parameter, rounded where it is used (as LSQ's forward does)."""
        if self.zero is not None and self.fmt.zero_kind == "zp":
            return torch.round(self.zero.detach())
        return self.zero

    def extra_repr(self) -> str:
        return f"format={self.fmt.name}, observer={self.observer}"


class ActQuantizer(_Freezable):
    """Fake-quantizes activations (e.g. int8 per token, asymmetric, for int8da_int4w)."""

    def __init__(self, fmt: Format | str, observer: str = "dynamic", momentum: float = 0.01):
        super().__init__()
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        if not isinstance(self.fmt, AffineFormat):
            raise QuantError(f"activation quantization needs an integer format, got {self.fmt.name}")
        if observer not in ACT_OBSERVERS:
            raise QuantError(f"unknown activation observer {observer!r}; choose one of {', '.join(ACT_OBSERVERS)}")
        self.observer, self.momentum = observer, momentum
        self.enabled = True
        self.calibrating = False  # set by qat.calibrate: update the statistics in eval mode too
        self._init_frozen()
        self.observed = False  # python mirror of "min_val is finite": no device sync per forward to check it
        if observer == "moving_average":
            self.register_buffer("min_val", torch.tensor(float("inf")))
            self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.observed = self.observer == "moving_average" and not bool(torch.isinf(self.min_val))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        flat = x.reshape(-1, x.shape[-1])
        blocks = to_blocks(flat, self.fmt.block)
        if self.observer == "dynamic":
            scale, zero = self.fmt.choose_params(blocks.detach())
        else:
            if (self.training or self.calibrating) and not self._frozen:
                with torch.no_grad():
                    lo, hi = blocks.min(), blocks.max()
                    first = torch.isinf(self.min_val)
                    m = self.momentum
                    self.min_val.copy_(torch.where(first, lo, (1 - m) * self.min_val + m * lo))
                    self.max_val.copy_(torch.where(first, hi, (1 - m) * self.max_val + m * hi))
                self.observed = True
            elif not self.observed:
                raise QuantError(
                    "activation observer 'moving_average' has no statistics yet (never trained or calibrated): "
                    "run qat.calibrate(model, batches) on a few training batches first, or use act_observer='dynamic'")
            ref = torch.stack([self.min_val, self.max_val]).expand(*blocks.shape[:-1], 2)
            scale, zero = self.fmt.choose_params(ref)
        return fake_quantize(flat, self.fmt, scale, zero).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"format={self.fmt.name}, observer={self.observer}"
