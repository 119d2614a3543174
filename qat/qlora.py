"""QLoRA-QAT: LoRA adapters on a frozen bitsandbytes NF4 base, trained through the quantization the
merged model is deployed in.

What runs after QLoRA is not the NF4 base plus an adapter but ``Q(W + s * BA)``: the adapter merged into
the base and re-quantized (q4_0, int4, a GGUF mix). With a scheme, every adapted layer here multiplies by
exactly that::

    W_eff = fake_quant(dequant_nf4(W) + (scaling * B) @ A)        y = x @ W_eff.T + bias

``dequant_nf4`` is ``qat.formats.nf4`` (bitwise bitsandbytes' own dequantization) and ``fake_quant`` is
the layer's ``WeightQuantizer``, as in full QAT: observers, ``start_step`` and ``freeze_step`` behave the
same. The base stays frozen in 4 bits and is dequantized every step (no float copy is cached); gradients
reach A and B through the straight-through estimator.

``merge_qlora`` writes ``dequant_nf4(W) + (scaling * B) @ A``, computed by the one function the forward
uses, into plain ``nn.Linear`` layers: never onto the original float weights, which would add the base's
NF4 error back. Where a scheme applies the layer becomes a ``FakeQuantLinear`` holding the training
quantizer, so ``qat.convert`` and the exporters read the very codes the last training forward used::

    model = load_qlora("HuggingFaceTB/SmolLM2-135M", QLoRAConfig(r=16, alpha=32))  # NF4 + k-bit prep + LoRA
    cb = QATCallback(scheme="q4_0", start_step=100)     # detects QLoRA models (or: prepare_qlora(model, "q4_0"))
    ...fit...
    merged = merge_qlora(model)                         # plain HF model, FakeQuantLinear where quantized
    export_gguf(merged, tokenizer, "model.Q4_0.gguf")
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from torch import Tensor, nn

from .formats import QTensor, QuantError, check_finite, get_format
from .formats.nf4 import dequantize_bnb
from .modules import FakeQuantEmbedding, FakeQuantLinear
from .observers import ActQuantizer, WeightQuantizer
from .plan import OUTPUT_NAMES, build_plan

__all__ = ["QLoRAConfig", "QLoRAFakeQuantLinear", "load_qlora", "quantize_nf4", "prepare_kbit", "prepare_qlora",
           "merge_qlora", "merged_weight", "load_qlora_state_dict", "is_qlora"]


@dataclass
class QLoRAConfig:
    """The ``qlora:`` block of a recipe.

    target_modules: peft's ``target_modules``; None means every Linear except the output head.
    compute_dtype:  dtype of the NF4 matmuls (``"bfloat16"``, ``"float32"`` ...); None: bf16 on GPU, fp32 on CPU.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: Optional[Sequence[str] | str] = None
    double_quant: bool = True
    compute_dtype: Optional[str] = None
    gradient_checkpointing: bool = False


def _compute_dtype(name: Optional[str | torch.dtype], device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuantError(f"compute_dtype must be a float dtype name such as 'bfloat16', got {name!r}")
    return dtype


# -- the NF4 base ------------------------------------------------------------------------------------

def quantize_nf4(model: nn.Module, double_quant: bool = True, compute_dtype: Optional[str | torch.dtype] = None,
                 skip: Sequence[str] = OUTPUT_NAMES) -> nn.Module:
    """Replace every ``nn.Linear`` of an in-memory model (except output heads, by name) with a bitsandbytes
    NF4 ``Linear4bit``, quantized by bitsandbytes on the device the weight is on. In place."""
    for name, lin in list(model.named_modules()):
        if type(lin) is not nn.Linear or name.split(".")[-1] in skip:
            continue
        device = lin.weight.device
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, quant_type="nf4",
                              compress_statistics=double_quant, compute_dtype=_compute_dtype(compute_dtype, device),
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4", module=q)
        q.bias = lin.bias
        parent, child = _parent(model, name)
        setattr(parent, child, q.to(device))  # Params4bit quantizes when moved to a device
    model.is_loaded_in_4bit = True  # what peft reads to give 4-bit layers its Linear4bit LoRA layer
    return model


def _load_nf4(path: str | os.PathLike, double_quant: bool, compute_dtype: Optional[str | torch.dtype],
              device_map) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _compute_dtype(compute_dtype, device)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=double_quant)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, dtype=dtype,
                                                device_map=device_map or device.type)


def prepare_kbit(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """QLoRA's k-bit preparation: every base parameter frozen, norm weights in fp32, optionally
    non-reentrant gradient checkpointing.

    Unlike peft's ``prepare_model_for_kbit_training`` the embeddings and output head keep their dtype
    (upcasting them costs ``vocab x hidden`` fp32 weights and fp32 logits). bitsandbytes' CPU inference
    path is switched off: in eval mode it repacks the NF4 storage with bf16 block scales, which would
    change the base weights training used and that ``merge_qlora`` reads.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if "norm" in type(m).__name__.lower():
            for p in m.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.float()
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def load_qlora(model: nn.Module | str | os.PathLike, config: Optional[QLoRAConfig] = None,
               device_map=None) -> PeftModel:
    """An NF4 base with LoRA adapters, ready to train: a Hugging Face path/name is loaded with
    bitsandbytes NF4; an in-memory model is quantized in place (``quantize_nf4``). Then ``prepare_kbit``
    and peft's ``get_peft_model`` with ``LoraConfig(r, alpha, dropout, target_modules)``."""
    cfg = config or QLoRAConfig()
    if isinstance(model, (str, os.PathLike)):
        model = _load_nf4(model, cfg.double_quant, cfg.compute_dtype, device_map)
    else:
        quantize_nf4(model, cfg.double_quant, cfg.compute_dtype)
    prepare_kbit(model, cfg.gradient_checkpointing)
    targets = cfg.target_modules or "all-linear"  # peft's "all-linear" leaves the output head out
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(targets) if not isinstance(targets, str) else targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_qlora_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """``model.load_state_dict(state_dict)`` (strict) for a model with NF4 layers, e.g. to resume from a
    checkpoint: also restores each NF4 base, its packed codes and bitsandbytes' quant state, which
    bitsandbytes writes next to the weight but does not read back."""
    quant_keys: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            key = f"{name}.weight" if name else "weight"
            if key not in state_dict:
                raise QuantError(f"state dict has no {key}: it was not saved from this model")
            stats = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
            quant_keys |= {f"{key}.{k}" for k in stats}  # (from_prequantized consumes some of `stats`)
            m.weight = bnb.nn.Params4bit.from_prequantized(state_dict[key], stats, device=m.weight.device, module=m)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in quant_keys})


def is_qlora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA layers on bitsandbytes NF4 layers."""
    return any(isinstance(m, LoraLinear4bit) for m in model.modules())


# -- the merged weight ---------------------------------------------------------------------------------

def merged_weight(layer: LoraLinear4bit) -> Tensor:
    """``dequant_nf4(W) + (scaling * B) @ A`` over the active adapters, in fp32 with autocast off. (The scale
    goes on B, ``out x r``, rather than on the ``out x in`` product: one full-size elementwise pass less.)

    The one definition of the merged weight: the QAT forward fake-quantizes it and ``merge_qlora`` writes
    it, so both hold the same bits (on the same device)."""
    weight = layer.get_base_layer().weight
    with torch.autocast(weight.device.type, enabled=False):
        w = dequantize_bnb(weight)
        if not layer.disable_adapters:
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                    w = w + (b.float() * layer.scaling[name]) @ a.float()
    return w


class QLoRAFakeQuantLinear(LoraLinear4bit):
    """peft's LoRA-on-NF4 layer whose forward multiplies by ``fake_quant(dequant_nf4(W) + (scaling * B) @ A)``.

    ``from_lora`` builds it from the peft layer it replaces, taking over that layer's submodules,
    Parameters and adapter state as they are: parameter names (``base_layer.weight``,
    ``lora_A.<adapter>.weight`` ...) stay peft's, so adapters save and load with peft, optimizer references
    stay valid, and peft's switches (``disable_adapter()``, ``set_adapter``) keep working; with adapters
    disabled the layer runs ``fake_quant(dequant_nf4(W))``, the base as it would be deployed. Quantizer
    state is added under ``weight_fake_quant.*``. peft's own ``merge`` (which re-quantizes the merged
    weight to NF4) is refused: ``merge_qlora`` is the merge that keeps what was trained.

    LoRA dropout: peft drops the adapter's input, ``B A dropout(x)``. Merged into the weight the adapter
    sees ``x``, so in training ``scaling * B A (dropout(x) - x)`` is added (nothing in eval); with fake
    quant off this is mathematically peft's forward.
    """

    @classmethod
    def from_lora(cls, layer: LoraLinear4bit, weight_fake_quant: WeightQuantizer,
                  act_fake_quant: Optional[ActQuantizer] = None) -> "QLoRAFakeQuantLinear":
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        for registry in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):  # own copies:
            new.__dict__[registry] = type(layer.__dict__[registry])(layer.__dict__[registry])  # `layer` stays as is
        new.weight_fake_quant = weight_fake_quant
        new.act_fake_quant = act_fake_quant
        return new

    def effective_weight(self) -> Tensor:
        """The weight the forward multiplies by (fp32): what ``merge_qlora`` + ``qat.convert`` hand to export."""
        return self.weight_fake_quant(merged_weight(self))

    def quantize(self) -> QTensor:
        """The integer codes and parameters of the effective weight."""
        return self.weight_fake_quant.quantize(merged_weight(self))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if kwargs.get("adapter_names") is not None:
            raise TypeError("QLoRAFakeQuantLinear does not support mixed adapter batches (adapter_names)")
        base = self.get_base_layer()
        w = self.effective_weight()
        xq = x if self.act_fake_quant is None else self.act_fake_quant(x)
        dtype = base.compute_dtype or x.dtype  # as bitsandbytes' Linear4bit: compute in its compute dtype
        y = F.linear(xq.to(dtype), w.to(dtype), None if base.bias is None else base.bias.to(dtype))
        if self.training and not self.disable_adapters:
            for name in self.active_adapters:
                drop = self.lora_dropout[name] if name in self.lora_dropout else None
                if name in self.lora_A and drop is not None and not isinstance(drop, nn.Identity):
                    a, b = self.lora_A[name], self.lora_B[name]
                    xa = x.to(a.weight.dtype)
                    y = y + b(a(drop(xa) - xa)) * self.scaling[name]
        return y.to(x.dtype)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise QuantError("peft's merge re-quantizes the merged weight to NF4, which is not what QAT trained; "
                         "use qat.qlora.merge_qlora(model)")

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)


# -- planning and surgery -------------------------------------------------------------------------------

def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _place(root: nn.Module, name: str, module: Optional[nn.Module] = None) -> nn.Module:
    """Put ``module`` at dotted ``name`` under ``root``, creating empty containers on the way."""
    node = root
    parts = name.split(".") if name else []
    for part in parts[: len(parts) - (module is not None)]:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    if module is not None:
        node.add_module(parts[-1], module)
        node = module
    return node


def _plan_view(model: nn.Module) -> nn.Module:
    """What ``build_plan`` sees: every LoRA or NF4 layer as the ``nn.Linear`` it stands for (meta device,
    same name and shape), float Linear/Embedding layers as themselves (tied weights stay tied), and the
    HF config where the model has it, for mixes. peft's lora_A/lora_B and the packed NF4 storage stay out."""
    view, inside, meta = nn.Module(), [], {}
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        cfg = m.__dict__.get("config")
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            _place(view, name).config = cfg
        if isinstance(m, (LoraLayer, bnb.nn.Linear4bit)):
            base = m.get_base_layer() if isinstance(m, LoraLayer) else m
            _place(view, name, nn.Linear(m.in_features, m.out_features, bias=base.bias is not None, device="meta"))
            inside.append(name + ".")
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            stand_in = nn.Linear(1, 1, bias=False) if isinstance(m, nn.Linear) else nn.Embedding(1, 1)
            if id(m.weight) not in meta:
                meta[id(m.weight)] = nn.Parameter(torch.empty(m.weight.shape, device="meta"), requires_grad=False)
            stand_in.weight = meta[id(m.weight)]
            if isinstance(m, nn.Linear):
                stand_in.in_features, stand_in.out_features = m.in_features, m.out_features
            _place(view, name, stand_in)
    return view


def _is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, WeightQuantizer) for m in model.modules())


def prepare_qlora(model: nn.Module, scheme: Optional[str] = None, rules: Optional[Mapping[str, Optional[str]]] = None,
                  observer: str = "dynamic", activations: Optional[str] = None, act_observer: str = "dynamic",
                  skip_incompatible: bool = False) -> nn.Module:
    """QAT of the merged weight, in place: every planned LoRA-on-NF4 layer becomes a
    ``QLoRAFakeQuantLinear``; planned float layers (a frozen head or embedding under a mix or a rule)
    become ``FakeQuantLinear``/``FakeQuantEmbedding`` as in ``qat.prepare``.

    Arguments as ``qat.prepare``: the plan is ``build_plan`` on the layers the adapters sit on, under their
    own names, so ``rules`` and mixes read as they do for full QAT. A planned NF4 layer without an adapter,
    or a planned LoRA layer that is not on NF4, is an error: its weight could not follow the plan.
    """
    if _is_prepared(model):
        raise QuantError("model is already prepared for QAT")
    plan = build_plan(_plan_view(model), scheme, rules, activations)
    problems: list[str] = []
    groups: dict[object, list[tuple[str, nn.Module, object]]] = {}
    for name, spec in plan.items():
        mod = model.get_submodule(name)
        if isinstance(mod, LoraLinear4bit):
            unsupported = [a for a in mod.lora_A if a in mod.lora_variant or mod.lora_bias.get(a)]
            if unsupported:
                problems.append(f"{name} ({spec.name}): adapters {unsupported} use a LoRA variant (DoRA ...) or "
                                "lora_bias, which merged-weight QAT does not support")
                continue
            shape, key = (mod.out_features, mod.in_features), name
        elif isinstance(mod, bnb.nn.Linear4bit):
            problems.append(f"{name} ({spec.name}): NF4 layer without a LoRA adapter; add it to target_modules "
                            "or keep it out of the plan with a rule mapping it to None")
            continue
        elif isinstance(mod, LoraLayer):
            problems.append(f"{name} ({spec.name}): LoRA on a float layer; QLoRA-QAT adapts NF4 layers only")
            continue
        else:
            shape, key = tuple(mod.weight.shape), id(mod.weight)
        try:
            get_format(spec.weight).check_shape(shape)
        except QuantError as e:
            if skip_incompatible:
                warnings.warn(f"qat: keeping {name} in float: {e}", stacklevel=2)
                continue
            problems.append(f"{name} ({spec.name}): {e}")
            continue
        groups.setdefault(key, []).append((name, mod, spec))
    if problems:
        raise QuantError("cannot quantize these layers as planned:\n  " + "\n  ".join(problems) + "\nFix: give "
                         "them another scheme in `rules` (None keeps float) or pass skip_incompatible=True.")
    for group in groups.values():
        if len({spec.weight for _, _, spec in group}) > 1:
            raise QuantError(f"{', '.join(n for n, _, _ in group)} share one weight tensor but were planned as "
                             f"{sorted({spec.weight for _, _, spec in group})}; give them the same scheme in `rules`")
        first = group[0][1]
        w = merged_weight(first) if isinstance(first, LoraLinear4bit) else first.weight
        check_finite(w, f"{group[0][0]}.weight")
        wq = WeightQuantizer(group[0][2].weight, w, observer).to(w.device)
        for name, mod, spec in group:
            aq = ActQuantizer(spec.activations, act_observer).to(w.device) if spec.activations else None
            if isinstance(mod, LoraLinear4bit):
                new = QLoRAFakeQuantLinear.from_lora(mod, wq, aq)
            elif isinstance(mod, nn.Embedding):
                new = FakeQuantEmbedding(mod, wq)
            else:
                new = FakeQuantLinear(mod, wq, aq)
            parent, child = _parent(model, name)
            setattr(parent, child, new)
    return model


# -- merge ----------------------------------------------------------------------------------------------

def _float_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return lin


@torch.no_grad()
def merge_qlora(model: nn.Module) -> nn.Module:
    """Merge every LoRA-on-NF4 layer onto its NF4 base, in place, and return the plain model (the base
    model of a ``PeftModel``), in fp32.

    An adapted layer becomes ``nn.Linear`` with weight ``dequant_nf4(W) + (scaling * B) @ A`` (the
    ``merged_weight`` its forward used, bitwise; run the merge on the device training ran on), wrapped in a
    ``FakeQuantLinear`` holding the training quantizer where a scheme applied, so ``qat.convert`` returns
    the codes the forward used. An NF4 layer without an adapter becomes ``nn.Linear(dequant_nf4(W))``.
    Everything else is cast to fp32 (the merged sums are fp32; a float-only model can be cast down after).
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    merged: list[str] = []
    for name, m in list(base.named_modules()):
        if any(name.startswith(p) for p in merged):
            continue
        if isinstance(m, LoraLinear4bit):
            new = _float_linear(merged_weight(m), m.get_base_layer().bias)
            if isinstance(m, QLoRAFakeQuantLinear):
                new = FakeQuantLinear(new, m.weight_fake_quant, m.act_fake_quant)
        elif isinstance(m, bnb.nn.Linear4bit):
            new = _float_linear(dequantize_bnb(m.weight), m.bias)
        elif isinstance(m, LoraLayer):
            raise QuantError(f"{name}: LoRA on a float layer; merge_qlora merges LoRA on NF4 layers only")
        else:
            continue
        new.train(m.training)
        parent, child = _parent(base, name)
        setattr(parent, child, new)
        merged.append(name + ".")
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(base)
    if getattr(base, "is_loaded_in_4bit", False):
        base.is_loaded_in_4bit = False
    return base.float()
