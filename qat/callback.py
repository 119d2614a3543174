"""``QATCallback``: the Lightning face of plan + prepare + observers.

Modules are swapped in ``setup("fit")``, which Lightning runs before checkpoint restore, strategy
wrapping (DDP/FSDP) and ``configure_optimizers``: restored weights land in fake-quant layers, learned
scales exist before the optimizer is built, and FSDP wraps the swapped layers. Nothing patches
``forward``; ``fit`` can run twice and ``validate``/``test``/``predict`` work before and after
``qat.convert``. A QLoRA model (peft LoRA on bitsandbytes NF4 layers) is prepared with
``qat.qlora.prepare_qlora``: the merged weight ``dequant_nf4(W) + s * B @ A`` is what gets fake-quantized.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Mapping, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import adam_floor
from .observers import WeightQuantizer, switch_epoch
from .prepare import fake_quant_modules, layer_errors, prepare, quantizers, set_quantizer_switches

__all__ = ["QATCallback"]


def _full_weights(trainer: L.Trainer):
    """Under Lightning's FSDP strategy, the full (unsharded) parameters on rank 0 for the duration;
    otherwise nothing to do."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True)
    return contextlib.nullcontext()


class QATCallback(L.Callback):
    """Quantization-aware training for any LightningModule.

    Args:
        scheme: a scheme (``q4_0``, ``int4_w_g128``, ``int8da_int4w`` ...) or a named mix (``q4_k_m``).
        rules: ``{fnmatch pattern: scheme or None}`` on module names, first match wins; None keeps float.
        start_step: fake quant is off before this global step (train in float first).
        freeze_step: observers stop updating from this global step on (None: never).
        observer: ``dynamic`` | ``mse`` | ``learned`` (LSQ, initialised from the reference rule).
        activations: activation format for every quantized Linear (e.g. ``int8_asym_token``); schemes
            such as ``int8da_int4w`` bring their own.
        act_observer: ``dynamic`` (per token) | ``moving_average``.
        skip_incompatible: leave layers the scheme cannot take in float (with a warning) instead of failing.
        log_every_n_steps: how often the per-layer error table goes to the logger (0: never).
        step_cache: fake-quantize the non-``learned`` layers once per optimizer step instead of in every
            forward and backward (``qat/step_cache.py``; the same numbers): small layers keep ``w_hat``, large
            4-bit ones their codes (unpacked in the forward and the backward; ``QAT_STEP_CACHE_PACK=0``: they
            fake-quantize as usual). True/False: on/off. None (default):
            the ``QAT_STEP_CACHE`` environment variable (``1`` on, ``0`` off), else on where it was measured
            faster and checked bitwise: weights on a GPU, Lightning's single-device strategy, automatic
            optimization. Never under DDP/FSDP/DeepSpeed, even on one device (they collect the gradients of
            the weights the forward uses as the backward computes them; True warns and runs without it).
            The refresh after each optimizer step runs on a side stream on CUDA, overlapping the next batch's
            host work; every hook of this callback that precedes a forward or a read of the quantizers
            waits for it (``QAT_STEP_CACHE_OVERLAP=0``: on the current stream). A hook of your own that
            runs a *compiled* forward in ``on_train_batch_end`` calls ``wait_for_step_cache()`` first;
            eager forwards need nothing (they fake-quantize as usual until the wait).

    With ``torch.optim.Adam``/``AdamW`` on CUDA, the fake-quantized weights' second moments are kept off exact
    zero (``qat/adam_floor.py``: the clip masks' zeros put CUDA's Adam kernels on a slow path; no weight
    moves differently). ``QAT_ADAM_FLOOR=0`` turns that off.
    """

    def __init__(self, scheme: str, rules: Optional[Mapping[str, Optional[str]]] = None, start_step: int = 0,
                 freeze_step: Optional[int] = None, observer: str = "dynamic", activations: Optional[str] = None,
                 act_observer: str = "dynamic", skip_incompatible: bool = False, log_every_n_steps: int = 50,
                 step_cache: Optional[bool] = None):
        super().__init__()
        self.scheme, self.rules = scheme, dict(rules or {})
        self.start_step, self.freeze_step = start_step, freeze_step
        self.observer, self.activations, self.act_observer = observer, activations, act_observer
        self.skip_incompatible, self.log_every_n_steps = skip_incompatible, log_every_n_steps
        self.last_errors: list[dict] = []
        self.step_cache = step_cache
        self._cache = None
        # the model's quantizers from on_train_start to on_train_end: the schedule is applied twice a step, and
        # walking SmolLM2's ~600 modules for them cost ~0.3 ms of host time each time
        self._quantizers: Optional[list] = None
        self._applied: Optional[tuple] = None  # the schedule's last (enabled, frozen) on them, and switch_epoch() then
        self._floors: list = []  # ``adam_floor.SecondMomentFloor`` hooks, from on_train_start to on_train_end

    # -- surgery ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or any(isinstance(m, WeightQuantizer) for m in pl_module.modules()):
            return  # already prepared (second fit, or a model prepared by hand)
        prepare_fn = prepare
        if "peft" in sys.modules:  # only a model with peft layers can be a QLoRA model; skip the import otherwise
            from .qlora import is_qlora, prepare_qlora
            if is_qlora(pl_module):
                prepare_fn = prepare_qlora  # LoRA on NF4: fake-quantize the merged weight
        prepare_fn(pl_module, self.scheme, self.rules, observer=self.observer, activations=self.activations,
                   act_observer=self.act_observer, skip_incompatible=self.skip_incompatible)
        self._apply_schedule(pl_module, trainer.global_step)
        self._allow_unused_learned_scales(trainer)

    def _allow_unused_learned_scales(self, trainer: L.Trainer) -> None:
        """Learned scales take no part in the loss before ``start_step`` (and get no gradient once frozen
        at ``freeze_step``); DDP then stops with "parameters
        that were not used". We run before the strategy wraps the model, so we can ask DDP to look for
        unused parameters (what the user would otherwise have to pass) instead of faking a gradient,
        which AdamW's weight decay would turn into a real update."""
        if self.observer != "learned" or (self.start_step <= 0 and self.freeze_step is None):
            return
        kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if isinstance(kwargs, dict) and not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True

    def _apply_schedule(self, pl_module: L.LightningModule, step: int) -> None:
        enabled, frozen = step >= self.start_step, self.freeze_step is not None and step >= self.freeze_step
        if self._quantizers is None:
            set_quantizer_switches(quantizers(pl_module), enabled=enabled, frozen=frozen)
            return
        # what this wrote last time, and no quantizer's switch set since (by us or anyone): nothing to write.
        # Every batch's start runs this while the GPU waits for the host; reading 112 quantizers' switches there
        # is ~0.1 ms (~1B Llama, H200's host)
        if self._applied != (enabled, frozen, switch_epoch()):
            set_quantizer_switches(self._quantizers, enabled=enabled, frozen=frozen)
            self._applied = (enabled, frozen, switch_epoch())

    # -- step cache ---------------------------------------------------------------------------------
    def _step_cache_wanted(self, trainer, pl_module) -> bool:
        """Whether to use the step cache this fit; warns where it was asked for and cannot run."""
        asked = self.step_cache
        if asked is None and os.environ.get("QAT_STEP_CACHE") in ("0", "1"):
            asked = os.environ["QAT_STEP_CACHE"] == "1"
        if asked is False:
            return False
        from lightning.pytorch.strategies import SingleDeviceStrategy

        if trainer.world_size > 1 or not isinstance(trainer.strategy, SingleDeviceStrategy):
            if asked:
                rank_zero_warn("QATCallback: step_cache is off: it runs with Lightning's single-device strategy "
                               f"only, not {type(trainer.strategy).__name__} (DDP, FSDP and DeepSpeed take "
                               "the gradients of the weights the forward uses, as the backward computes them)")
            return False
        if asked:
            return True
        # the default: where it was measured faster (BENCHMARKS.md: H200, SmolLM2 compiled 1.007x bf16's
        # step against 1.028x, eager 1.000x against 1.21x) and checked bitwise on the GPU, and where no
        # optimizer step can run between our refresh and a forward (manual optimization may step twice in
        # one training_step; a compiled forward would not see the stale cache)
        on_gpu = any(p.is_cuda for p in pl_module.parameters())
        return on_gpu and getattr(pl_module, "automatic_optimization", True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._quantizers, self._applied = quantizers(pl_module), None
        # the clip masks' exact zeros in Adam's second moments slow CUDA's Adam kernels (qat/adam_floor.py)
        weights = [m.weight for _, m in fake_quant_modules(pl_module)]  # attach_floor keeps the optimizer's
        for floor in self._floors:  # a fit that ended in an exception skipped on_train_end
            floor.remove()
        self._floors = []
        for opt in trainer.optimizers:
            floor = adam_floor.attach_floor(opt, weights)
            if floor is not None:
                self._floors.append(floor)
        if not self._step_cache_wanted(trainer, pl_module):
            return
        from .step_cache import StepCache

        cache = StepCache(pl_module)
        if cache.modules or cache.packed:
            for opt in trainer.optimizers:  # fused AdamW's steps leave the weights' versions as they were
                cache.watch(opt)
            self._cache = cache
            rank_zero_info(f"QATCallback: step cache on for {len(cache.modules)} layers and packed for "
                           f"{len(cache.packed)} large ones (fake quant once per optimizer step; "
                           "QATCallback(step_cache=False) turns it off)")

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._cache is not None:
            # every backward (every micro-batch): whatever reads .grad next (hooks, clipping, fp16's
            # GradScaler, which unscales after the closure) sees the weights' full gradients. The same bits
            # as one flush per step: the mask is 0 or 1, so mask*(g1+g2) == mask*g1 + mask*g2
            self._cache.flush()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._cache is not None:
            self._cache.flush()  # nothing left to move after on_after_backward, unless a backward ran outside Lightning

    # -- schedule -----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._apply_schedule(pl_module, trainer.global_step)
        if self._cache is not None:
            self._cache.refresh_if_stale()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._apply_schedule(pl_module, trainer.global_step)
            if self._cache is not None:
                self._cache.refresh_if_stale()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._cache is not None:
            # right after the optimizer step, while the device still runs it: the refresh's host work (~2 ms on
            # the H200 machine's CPU for the ~1B Llama) hides behind the optimizer's kernels. At the next batch's
            # start instead, that host work came first: the compiled step measured no faster (BENCHMARKS.md,
            # session 14). Its launches go to a side stream (``overlap``): the loss read that ends the step
            # (the progress bar's) does not wait for them, and they run while the GPU would idle in the next
            # batch's hooks and dynamo's guards; the next batch's start waits for them on the device (session 15)
            self._apply_schedule(pl_module, trainer.global_step)
            self._cache.refresh_if_stale(overlap=True)
        step = trainer.global_step
        if self.log_every_n_steps and step % self.log_every_n_steps == 0:
            self.wait_for_step_cache()  # the refresh writes the quantizers' parameters the table reads
            self.log_layer_errors(trainer, pl_module)

    def wait_for_step_cache(self) -> None:
        """The current CUDA stream waits (on the device) for the step cache's refresh after the last optimizer
        step; nothing when there is no cache or nothing pending."""
        if self._cache is not None:
            self._cache.wait()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # before the state dict is copied (ModelCheckpoint saves from its on_train_batch_end, after ours): the
        # quantizers' buffers an overlapped refresh writes
        self.wait_for_step_cache()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.wait_for_step_cache()  # whatever runs next on the current stream (an export, say) comes after the refresh

    def on_train_end(self, trainer, pl_module) -> None:
        self._quantizers = self._applied = None
        for floor in self._floors:
            floor.remove()
        self._floors = []
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self.log_every_n_steps:
            self.log_layer_errors(trainer, pl_module)

    # -- logging ------------------------------------------------------------------------------------
    def log_layer_errors(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every rank calls this: under FSDP the weights are shards outside forward, and gathering them for
        rank 0 is a collective (rank 0 alone computing on its shards failed, and left the other rank
        waiting in the next collective: the hang of the first 2-GPU run)."""
        with _full_weights(trainer):
            if trainer.is_global_zero:
                self._log_layer_errors(trainer, pl_module)

    def _log_layer_errors(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_errors = layer_errors(pl_module)
        if not trainer.loggers or not self.last_errors:
            return
        metrics: dict[str, float] = {}
        for row in self.last_errors:
            metrics[f"qat/rel_mse/{row['layer']}"] = row["rel_mse"]
            if "scale_mean" in row:
                metrics[f"qat/scale_mean/{row['layer']}"] = row["scale_mean"]
        total = sum(r["numel"] for r in self.last_errors)
        metrics["qat/rel_mse_mean"] = sum(r["rel_mse"] * r["numel"] for r in self.last_errors) / total
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "rules": self.rules, "start_step": self.start_step,
                "freeze_step": self.freeze_step, "observer": self.observer, "activations": self.activations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict.get(k) for k in ("scheme", "observer", "activations")}
        mine = {"scheme": self.scheme, "observer": self.observer, "activations": self.activations}
        if saved != mine:
            from .formats import QuantError
            raise QuantError(f"checkpoint was trained with QAT settings {saved}, this run has {mine}; "
                             "resume with the same scheme/observer/activations")
