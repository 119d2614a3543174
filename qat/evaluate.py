"""Perplexity of float vs PTQ vs QAT models on held-out text.

* float: the fine-tuned model without quantization;
* PTQ:   ``qat.prepare(copy of the float model, same scheme and rules, observer="dynamic")``: round to
         nearest with the format's reference rule, no training;
* QAT:   the model trained with fake quantization.

The headline number is the share of the PTQ gap that QAT recovers,
``(ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float)``: 1 is float quality, 0 is no better than rounding.

Quantized models are evaluated through ``bake_weights``: each fake-quantized weight is computed once
(bitwise what its forward computes every step), so evaluation costs what a float forward costs.
Plain torch; the causal-LM task code in ``qat.lm`` calls this.
"""
from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prepare import fake_quant_modules, prepare, set_fake_quant_enabled

__all__ = ["token_nll", "perplexity", "ptq_model", "bake_weights", "gap_recovered", "EvalReport", "format_table"]

LABELS = {"float": "float fine-tune", "ptq": "PTQ {scheme} (round to nearest)", "qat": "QAT {scheme}"}


def token_nll(model: nn.Module, input_ids: Tensor) -> tuple[Tensor, int]:
    """Summed next-token negative log-likelihood (fp32) over a batch, and the number of predicted tokens."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll, targets.numel()


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], device: Optional[torch.device] = None,
               autocast_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """``{"ppl", "nll", "tokens"}``: token-weighted over all batches (not a mean of batch means)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with ctx:
        for batch in batches:
            nll, n = token_nll(model, batch["input_ids"].to(device))
            total += float(nll)
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate")
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


def ptq_model(float_model: nn.Module, scheme: str, rules: Optional[Mapping[str, Optional[str]]] = None,
              activations: Optional[str] = None, act_observer: str = "dynamic", skip_incompatible: bool = False,
              **_: Any) -> nn.Module:
    """A round-to-nearest copy of ``float_model``: the same scheme and rules, the format's reference rule."""
    return prepare(copy.deepcopy(float_model), scheme, rules, observer="dynamic", activations=activations,
                   act_observer=act_observer, skip_incompatible=skip_incompatible)


@torch.no_grad()
def bake_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose fake-quantized weights hold their effective values and whose weight
    fake quant is off: the same outputs without re-quantizing every forward. Activation fake quant stays on.
    All effective weights are computed before any is written, so a weight shared by two layers
    (tied embeddings) is quantized once, never twice."""
    baked = copy.deepcopy(model)
    set_fake_quant_enabled(baked, True)
    effective = {}
    for _, m in fake_quant_modules(baked):
        effective.setdefault(id(m.weight), (m.weight, m.effective_weight().detach().to(m.weight.dtype)))
    for weight, value in effective.values():
        weight.data = value
    for _, m in fake_quant_modules(baked):
        m.weight_fake_quant.enabled = False
    return baked


def gap_recovered(ppl_float: float, ppl_ptq: float, ppl_qat: float) -> Optional[float]:
    """``(ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float)``; None when PTQ is no worse than float (no gap)."""
    gap = ppl_ptq - ppl_float
    return None if gap <= 0 else (ppl_ptq - ppl_qat) / gap


class EvalReport:
    """The rows (``float``/``ptq``/``qat``, whichever were evaluated) and what they were measured on.
    ``measured_by``: None for the PyTorch models, else the runtime that scored exported files (a row's
    ``file`` names its file)."""

    def __init__(self, scheme: Optional[str], rows: dict[str, dict[str, Any]], data: Optional[dict] = None,
                 measured_by: Optional[str] = None):
        self.scheme, self.rows, self.data, self.measured_by = scheme, rows, data or {}, measured_by

    @property
    def gap_recovered(self) -> Optional[float]:
        if not all(k in self.rows for k in ("float", "ptq", "qat")):
            return None
        return gap_recovered(self.rows["float"]["ppl"], self.rows["ptq"]["ppl"], self.rows["qat"]["ppl"])

    def to_dict(self) -> dict[str, Any]:
        out = {"scheme": self.scheme, "results": self.rows, "gap_recovered": self.gap_recovered,
               "gap_recovered_formula": "(ppl_ptq - ppl_qat) / (ppl_ptq - ppl_float)", "data": self.data}
        return out if self.measured_by is None else {**out, "measured_by": self.measured_by}

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def __str__(self) -> str:
        return format_table(self)


def format_table(report: EvalReport) -> str:
    """The comparison as a fixed-width table, with the recovered share of the PTQ gap under it."""
    rows = [(LABELS[k].format(scheme=report.scheme), v) for k, v in report.rows.items()]
    width = max(len(label) for label, _ in rows)
    base = report.rows.get("float", {}).get("ppl")
    files = any("file" in r for _, r in rows)
    lines = [f"measured by {report.measured_by} on the exported files"] if report.measured_by else []
    lines.append(f"{'model':<{width}}  {'ppl':>9}  {'nll/token':>9}  {'vs float':>8}" + ("  file" if files else ""))
    for label, r in rows:
        delta = "" if base is None or label == LABELS["float"] else f"{100 * (r['ppl'] / base - 1):+.1f}%"
        lines.append(f"{label:<{width}}  {r['ppl']:>9.3f}  {r['nll']:>9.4f}  {delta:>8}"
                     + (f"  {r.get('file', '')}" if files else ""))
    g = report.gap_recovered
    if g is not None:
        lines.append(f"QAT recovers {100 * g:.1f}% of the PTQ gap: (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_float)")
    elif all(k in report.rows for k in ("float", "ptq", "qat")):
        lines.append("PTQ is no worse than float here: there is no gap for QAT to recover")
    if report.data:
        d = report.data
        lines.append(f"held out: {d.get('tokens', '?')} tokens ({d.get('blocks', '?')} blocks x {d.get('seq_len', '?')}) "
                     f"of {', '.join(d.get('documents', [])[:8])}")
    return "\n".join(lines)
