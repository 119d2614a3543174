"""``CausalLMModule``: fine-tuning a causal LM in Lightning. AdamW (no decay on norms and biases),
linear warmup then cosine decay per optimizer step, gradient clipping by the Trainer. It knows
nothing about quantization: ``QATCallback`` swaps its layers in ``setup``, before the optimizer exists.
"""
from __future__ import annotations

import fnmatch
import math
import time
from typing import Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from ..evaluate import token_nll

__all__ = ["CausalLMModule", "warmup_cosine", "freeze_except"]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def freeze_except(model: nn.Module, patterns: Sequence[str]) -> tuple[int, int]:
    """Train only parameters whose name matches one of ``patterns`` (fnmatch); ``(trained, total)`` counts."""
    trained = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        total += p.numel()
        trained += p.numel() if p.requires_grad else 0
    return trained, total


class CausalLMModule(L.LightningModule):
    """Wraps a Hugging Face causal LM as ``self.model`` (so checkpoint keys are ``model.<hf name>``)."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, max_steps: int = 100,
                 min_lr_ratio: float = 0.1):
        super().__init__()
        self.model = model.train()  # from_pretrained hands models over in eval mode
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self._last_step_time: Optional[float] = None

    def forward(self, input_ids: Tensor, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids).loss
        now = time.perf_counter()
        bs = ids.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        if self._last_step_time is not None:  # the first step includes start-up: not a throughput
            tokens = ids.numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / (now - self._last_step_time), prog_bar=True, batch_size=bs)
        self._last_step_time = now
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        nll, n = token_nll(self.model, batch["input_ids"])
        self.log("val/loss", nll / n, prog_bar=True, batch_size=int(n), sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # norms, biases and quantizer scales: weight decay would only pull them towards 0
            (no_decay if p.ndim < 2 or "_fake_quant" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
