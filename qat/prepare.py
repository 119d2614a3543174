"""Model surgery: ``prepare`` swaps layers for fake-quantized ones in place, ``convert`` reads out the
integer codes and scales that export writes. Plain PyTorch; no Lightning here."""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from .formats import QTensor, QuantError, check_finite, get_format
from .kernels.batch import attach as attach_batch, unpatch_forward
from .modules import FakeQuantEmbedding, FakeQuantLinear, is_fake_quant
from .observers import ActQuantizer, WeightQuantizer
from .plan import LayerSpec, build_plan

__all__ = ["prepare", "check_plan", "convert", "fake_quant_modules", "set_fake_quant_enabled", "freeze_observers",
           "set_quantizer_switches", "unprepare", "layer_errors", "effective_state_dict", "nonfinite_parameters"]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def prepare(model: nn.Module, scheme: Optional[str] = None, rules: Optional[Mapping[str, Optional[str]]] = None,
            observer: str = "dynamic", activations: Optional[str] = None, act_observer: str = "dynamic",
            skip_incompatible: bool = False) -> nn.Module:
    """Swap every planned Linear/Embedding of ``model`` for its fake-quantized twin, in place.

    A layer whose shape the scheme cannot take is an error naming the layer and the scheme, or, with
    ``skip_incompatible=True``, left in float with a warning. Never silently quantized wrong.
    Tied weights (an output head sharing the embedding's Parameter) share one quantizer, as they share
    one tensor in a GGUF file.
    """
    if any(is_fake_quant(m) for m in model.modules()):
        raise QuantError("model is already prepared for QAT; call qat.unprepare(model) first to re-plan it")
    for group in _checked_plan(model, scheme, rules, activations, skip_incompatible).values():
        first_name, first_spec = group[0]
        wq = WeightQuantizer(first_spec.weight, model.get_submodule(first_name).weight, observer)
        for name, spec in group:
            mod = model.get_submodule(name)
            parent, child = _parent(model, name)
            if isinstance(mod, nn.Embedding):
                new = FakeQuantEmbedding(mod, wq)
            else:
                aq = ActQuantizer(spec.activations, act_observer) if spec.activations else None
                new = FakeQuantLinear(mod, wq, aq)
            new.to(mod.weight.device)
            setattr(parent, child, new)
    attach_batch(model)
    return model


def check_plan(model: nn.Module, scheme: Optional[str] = None, rules: Optional[Mapping[str, Optional[str]]] = None,
               activations: Optional[str] = None, skip_incompatible: bool = False) -> None:
    """Raise the QuantError ``prepare`` would raise for ``model`` (layer shapes, non-finite weights, tied
    layers planned apart), without changing it: a run checks its plan before it trains anything."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prepare warns about skipped layers itself
        _checked_plan(model, scheme, rules, activations, skip_incompatible)


def _checked_plan(model: nn.Module, scheme: Optional[str], rules: Optional[Mapping[str, Optional[str]]],
                  activations: Optional[str], skip_incompatible: bool) -> dict[int, list[tuple[str, LayerSpec]]]:
    """The plan's layers grouped by weight Parameter (tied layers share one quantizer), checked."""
    plan = build_plan(model, scheme, rules, activations)
    problems, by_param, misfits = [], {}, False
    for name, spec in plan.items():
        mod = model.get_submodule(name)
        fmt = get_format(spec.weight)
        try:
            fmt.check_shape(tuple(mod.weight.shape))
            check_finite(mod.weight, f"{name}.weight")
        except QuantError as e:
            if skip_incompatible and "NaN" not in str(e):
                warnings.warn(f"qat: keeping {name} in float: {e}", stacklevel=3)
                continue
            problems.append(f"{name} ({spec.name}): {e}")
            misfits |= "NaN" not in str(e)
            continue
        by_param.setdefault(id(mod.weight), []).append((name, spec))
    if problems:
        raise QuantError("cannot quantize these layers as planned:\n  " + "\n  ".join(problems)
                         + ("\nFix: give them another scheme in `rules` (None keeps float) or pass "
                            "skip_incompatible=True." if misfits else ""))
    for group in by_param.values():
        specs = {spec.weight for _, spec in group}
        if len(specs) > 1:
            names = ", ".join(n for n, _ in group)
            raise QuantError(f"{names} share one weight tensor but were planned as {sorted(specs)}; "
                             "give them the same scheme in `rules`")
    return by_param


def nonfinite_parameters(model: nn.Module) -> str:
    """The names of the parameters holding NaN or Inf (a diverged run, a damaged file), "" if none."""
    bad = [n for n, p in model.named_parameters() if not p.isfinite().all()]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if is_fake_quant(m):
            yield name, m


def quantizers(model) -> list:
    """Every weight and activation quantizer of ``model`` (a module, or such a list already)."""
    if isinstance(model, nn.Module):
        return [m for m in model.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    return list(model)


def set_quantizer_switches(model, enabled: Optional[bool] = None, frozen: Optional[bool] = None) -> None:
    """Fake quant on or off (``enabled``) and observers frozen or not (``frozen``) in ``model`` (a module, or a
    list of its ``quantizers``), None leaving that switch as it is; one pass, writing only what changes
    (``nn.Module.__setattr__`` costs ~1 us, and ``QATCallback`` sets both at every batch's start, where the GPU
    waits for the host: 8 us for the ~1B Llama's 112 quantizers on this CPU, against 17 us in two passes)."""
    for m in quantizers(model):
        if enabled is not None and m.enabled != enabled:
            m.enabled = enabled
        if frozen is not None and m._frozen != frozen:
            m.freeze(frozen)


def set_fake_quant_enabled(model, enabled: bool) -> None:
    """Turn fake quant on or off in ``model`` (a module, or a list of its ``quantizers``)."""
    set_quantizer_switches(model, enabled=enabled)


def needs_calibration(model: nn.Module) -> bool:
    """Whether ``model`` has activation observers that keep statistics (``moving_average``) not yet filled."""
    return any(isinstance(m, ActQuantizer) and m.observer == "moving_average" and not m.observed
               for m in model.modules())


@torch.no_grad()
def calibrate(model: nn.Module, batches, max_batches: int = 8) -> int:
    """Fill the ``moving_average`` activation statistics of a model that was not trained (PTQ) by running
    up to ``max_batches`` batches (tensors of input ids, or dicts with ``input_ids``) through it in eval
    mode. Returns the number of batches used. Weights and weight quantizers are untouched."""
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for m in acts:
        m.calibrating = True
    n = 0
    try:
        for batch in batches:
            if n >= max_batches:
                break
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            model(input_ids=ids.to(device))
            n += 1
    finally:
        for m in acts:
            m.calibrating = False
        model.train(was_training)
    if n == 0:
        raise QuantError("calibrate: no batches to calibrate the activation observers on")
    return n


def freeze_observers(model, frozen: bool = True) -> None:
    """Freeze (or unfreeze) every observer of ``model`` (a module, or a list of its ``quantizers``)."""
    set_quantizer_switches(model, frozen=frozen)


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Set PyTorch's intra-op thread count for the duration (threads started meanwhile keep it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def convert(model: nn.Module, threads: int = 1, pack: Optional[Callable[[str, QTensor], Any]] = None,
            pack_layer: Optional[Callable[[str, nn.Module], Any]] = None) -> dict[str, Any]:
    """Module name -> the integer codes and parameters of its weight, exactly as its forward uses them.

    ``get_format(q.format).dequantize(q)`` equals the layer's effective weight bitwise. The model is
    left as it is, so ``fit``/``validate``/``test``/``predict`` keep working after ``convert``.

    threads: layers quantized at a time, each on one PyTorch thread (CPU weights only). Many small
             independent layers scale better than each layer on all threads, whose every operation ends
             in a barrier that a core busy with another process stalls.
    pack:    ``pack(name, qtensor)`` run right after quantizing, in the same thread, while the layer is
             in cache (export packs file bytes this way); the dict then holds what it returns.
    pack_layer: ``pack_layer(name, module)`` tried first, in the same thread: where it returns something
             other than None, that is the layer's result and no QTensor is made (export's k-quant bytes).
    """
    jobs: dict[tuple[int, int], tuple[str, nn.Module]] = {}
    names = []
    for name, m in fake_quant_modules(model):
        # tied layers share one weight and one quantizer: quantized once, both names get the result
        key = (id(m.weight), id(m.weight_fake_quant))
        jobs.setdefault(key, (name, m))
        names.append((name, key))

    def run(name: str, m: nn.Module) -> Any:
        with torch.no_grad():  # grad mode is per thread
            if pack_layer is not None:
                out = pack_layer(name, m)
                if out is not None:
                    return out
            q = m.quantize()
            return q if pack is None else pack(name, q)

    if threads > 1 and len(jobs) > 1 and all(m.weight.device.type == "cpu" for _, m in jobs.values()):
        with _intra_op_threads(1), ThreadPoolExecutor(threads, thread_name_prefix="qat-convert") as pool:
            futures = {key: pool.submit(run, *job) for key, job in jobs.items()}
            done = {key: f.result() for key, f in futures.items()}
    else:
        done = {key: run(*job) for key, job in jobs.items()}
    return {name: done[key] for name, key in names}


def unprepare(model: nn.Module) -> nn.Module:
    """Swap fake-quant layers back to plain ones sharing the same Parameters (drops quantizer state)."""
    for name, m in list(fake_quant_modules(model)):
        parent, child = _parent(model, name)
        setattr(parent, child, m.to_float())
    unpatch_forward(model)
    return model


@torch.no_grad()
def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's float state dict with every fake-quantized weight replaced by its effective weight."""
    sd = {k: v for k, v in model.state_dict().items() if "_fake_quant." not in k}
    for name, m in fake_quant_modules(model):
        sd[f"{name}.weight"] = m.effective_weight().detach().to(m.weight.dtype)
    return sd


@torch.no_grad()
def layer_errors(model: nn.Module) -> list[dict]:
    """Per fake-quant layer: relative MSE ``|w - w_hat|^2 / |w|^2`` and scale statistics."""
    rows = []
    for name, m in fake_quant_modules(model):
        wq = m.weight_fake_quant
        w = m.weight.detach().float()
        # a report changes no state: the forward below re-observes ``w`` into the buffers, and under DDP
        # only rank 0 reports, so keeping its result would leave the ranks' observer state different
        saved = [b.detach().clone() for b in wq.buffers()]
        was = wq.enabled
        wq.enabled = True
        try:
            w_hat = wq(w).float()
            rel = float((w - w_hat).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
            row = {"layer": name, "format": wq.fmt.name, "observer": wq.observer, "rel_mse": rel, "numel": w.numel()}
            if wq.affine:
                s = wq.scale.detach().abs().float()
                row.update(scale_mean=float(s.mean()), scale_min=float(s.min()), scale_max=float(s.max()))
        finally:
            wq.enabled = was
            for b, old in zip(wq.buffers(), saved):
                b.copy_(old)
        rows.append(row)
    return rows
