"""QLoRA-QAT: an NF4 base built by bitsandbytes, LoRA through peft, fake quant of the merged weight, and a
merge whose exported codes are the ones training used."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import lightning as L  # noqa: E402

import qat  # noqa: E402
from qat import QATCallback  # noqa: E402
from qat.formats import QuantError, get_format  # noqa: E402
from qat.formats.nf4 import NF4, dequantize_bnb, from_bnb  # noqa: E402
from qat.modules import FakeQuantEmbedding, FakeQuantLinear  # noqa: E402
from qat.observers import WeightQuantizer  # noqa: E402
from qat.qlora import (QLoRAConfig, QLoRAFakeQuantLinear, load_qlora, load_qlora_state_dict,  # noqa: E402
                       merge_qlora, merged_weight, prepare_kbit, prepare_qlora, quantize_nf4)

from conftest import tiny_llama  # noqa: E402

VOCAB = 384  # room for tiny_lm's BPE tokenizer, for the GGUF round trip
HEADS, KV_HEADS = 4, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def tiny(hidden=128, inter=256, tie=True, seed=0):
    return tiny_llama(vocab=VOCAB, hidden=hidden, inter=inter, heads=HEADS, kv_heads=KV_HEADS, tie=tie, seed=seed)


def qlora(scheme=None, hidden=128, inter=256, dropout=0.0, seed=0, **prep):
    """A tiny QLoRA model with random B (peft starts B at 0, which would make A's gradient 0)."""
    model = load_qlora(tiny(hidden, inter, seed=seed), QLoRAConfig(r=8, alpha=16, dropout=dropout))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    if scheme is not None:
        prepare_qlora(model, scheme, **prep)
    return model


def lora_layers(model):
    """HF-relative name -> LoRA-on-NF4 layer (names as the merged model will have them)."""
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, peft.tuners.lora.bnb.Linear4bit)}


def reference_weight(layer) -> torch.Tensor:
    """dequant_nf4(W) + s * B @ A, with bitsandbytes' own dequantization."""
    w = layer.base_layer.weight
    nf4 = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return nf4 + layer.scaling["default"] * layer.lora_B.default.weight @ layer.lora_A.default.weight


def train(model, steps=3, lr=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous().view(torch.int32)


# -- 1. the NF4 base --------------------------------------------------------------------------------

def check_nf4_base(model, float_weights):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14  # 7 per layer; the tied head stays float
    for name, m in layers.items():
        qs = m.weight.quant_state
        assert qs.nested and qs.blocksize == 64 and m.compute_dtype == torch.float32
        assert torch.equal(bits(dequantize_bnb(m.weight)), bits(bnb.functional.dequantize_4bit(m.weight.data, qs)))
        # bnb's stored codes and scales are the ones our quantizer computes from the float weight
        ours = NF4.quantize(float_weights[name.removesuffix(".base_layer")])
        theirs = from_bnb(m.weight.data, qs)
        assert torch.equal(ours.codes, theirs.codes) and torch.equal(bits(ours.scale), bits(theirs.scale)), name


def test_in_memory_nf4_base_is_bitsandbytes_and_our_dequant_equals_it():
    float_model = tiny()
    float_weights = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if type(m) is nn.Linear}
    model = load_qlora(float_model, QLoRAConfig(r=8))
    check_nf4_base(model.get_base_model(), float_weights)
    hf = model.get_base_model()
    assert type(hf.lm_head) is nn.Linear and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert len(lora_layers(model)) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)


def test_hf_loaded_nf4_base_is_bitsandbytes_and_merge_drops_the_quantization_config(tmp_path):
    float_model = tiny()
    float_model.save_pretrained(tmp_path)
    float_weights = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if type(m) is nn.Linear}
    model = load_qlora(str(tmp_path), QLoRAConfig(r=8))
    check_nf4_base(model.get_base_model(), float_weights)
    merged = merge_qlora(model)
    assert getattr(merged.config, "quantization_config", None) is None and not merged.is_loaded_in_4bit


# -- 2. QAT of the merged weight ----------------------------------------------------------------------

def test_gradients_reach_A_and_B_but_not_the_nf4_base():
    model = qlora("q4_0").train()
    ids = torch.randint(0, VOCAB, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    # non-reentrant gradient checkpointing recomputes the same forward: the same gradients, bitwise
    checkpointed = qlora("q4_0")
    checkpointed.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    checkpointed.train()(input_ids=ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), checkpointed.named_parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n
    for name, layer in lora_layers(model).items():
        assert isinstance(layer, QLoRAFakeQuantLinear), name
        assert layer.lora_A.default.weight.grad.abs().sum() > 0, name
        assert layer.lora_B.default.weight.grad.abs().sum() > 0, name
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("scheme,hidden,inter", [("q4_0", 128, 256), ("int4_w_g128", 128, 256),
                                                 ("q4_k_m", 256, 512)])
def test_forward_is_linear_of_fake_quant_merged_weight_bitwise(scheme, hidden, inter):
    model = qlora(scheme, hidden, inter)
    formats = set()
    for name, layer in lora_layers(model).items():
        fmt = layer.weight_fake_quant.fmt
        formats.add(fmt.name)
        w = reference_weight(layer)
        assert torch.equal(bits(merged_weight(layer)), bits(w)), name
        x = torch.randn(2, 5, layer.in_features)
        assert torch.equal(bits(layer(x)), bits(F.linear(x, fmt.fake(w)))), name
    if scheme == "q4_k_m":  # a mix: k-quants, q6_k bumps, and the frozen tied head/embedding quantized too
        assert {"q4_k", "q6_k"} <= formats
        hf = model.get_base_model()
        assert isinstance(hf.model.embed_tokens, FakeQuantEmbedding) and isinstance(hf.lm_head, FakeQuantLinear)
        assert hf.lm_head.weight_fake_quant is hf.model.embed_tokens.weight_fake_quant
    else:
        assert formats == {get_format(qat.plan.resolve_scheme(scheme).weight).name}


def test_start_step_is_respected_through_qat_callback():
    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = qlora().train()

        def training_step(self, batch, _):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *_):
            layer = pl_module.model.get_base_model().model.layers[0].mlp.down_proj
            w = merged_weight(layer)
            fq = layer.weight_fake_quant.fmt.fake(w)
            eff = layer.effective_weight()
            seen.append((trainer.global_step, layer.weight_fake_quant.enabled,
                         torch.equal(bits(eff), bits(w)), torch.equal(bits(eff), bits(fq))))

    data = torch.utils.data.DataLoader(torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(0)),
                                       batch_size=8)
    module = LM()
    kw = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    cb = QATCallback("q4_0", start_step=2, log_every_n_steps=0)
    L.Trainer(max_steps=4, callbacks=[cb, Spy()], **kw).fit(module, data)
    assert seen == [(0, False, True, False), (1, False, True, False), (2, True, False, True), (3, True, False, True)]
    assert all(isinstance(m, QLoRAFakeQuantLinear) for m in lora_layers(module.model).values())
    L.Trainer(max_steps=5, callbacks=[cb], **kw).fit(module, data)  # a second fit keeps the prepared model


# -- 3. merge and export ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,dropout", [("q4_0", 0.1), ("int4_w_g128", 0.0)])
def test_merged_model_is_the_trained_model_bitwise(scheme, dropout, tmp_path):
    model = train(qlora(scheme, dropout=dropout))
    effective = {n: layer.effective_weight().detach().clone() for n, layer in lora_layers(model).items()}
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    merged = merge_qlora(model)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, peft.tuners.tuners_utils.BaseTunerLayer))
                   for m in merged.modules())
    codes = qat.convert(merged)
    assert set(codes) == set(effective)
    assert sum(int((bits(get_format(q.format).dequantize(q)) != bits(effective[n])).sum())
               for n, q in codes.items()) == 0
    with torch.no_grad():
        assert torch.equal(bits(merged(input_ids=ids).logits), bits(logits))

    if scheme == "q4_0" and importlib.util.find_spec("qat.export.gguf") is not None:
        gguf = pytest.importorskip("gguf")
        from qat.export import export_gguf
        from tiny_lm import bpe_tokenizer

        path = export_gguf(merged, bpe_tokenizer(VOCAB), tmp_path / "tiny.Q4_0.gguf", float_type="f32", progress=False)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, merged.config.num_hidden_layers)
        want = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in qat.effective_state_dict(merged).items()
                if k != "lm_head.weight"}  # tied: one tensor
        got = {}
        for t in gguf.GGUFReader(path).tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            got[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        assert differing_gguf_weights(got, want) == 0
        if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp's own dequantization of the file
            from qat.llamacpp import dequantize_gguf
            assert differing_gguf_weights(dequantize_gguf(path), want) == 0

    if scheme == "int4_w_g128" and importlib.util.find_spec("compressed_tensors") is not None:
        import json

        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from safetensors.torch import load_file

        from qat.export import export_compressed_tensors
        from tiny_lm import bpe_tokenizer

        out = export_compressed_tensors(merged, bpe_tokenizer(VOCAB), tmp_path / "ct", progress=False)
        args = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
        ct_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args["weights"]))
        state = load_file(out / "model.safetensors")
        differing = 0
        for name, w in effective.items():  # compressed-tensors' own decompressor, fp32 inference
            layer = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".weight_")}
            layer["weight_scale"] = layer["weight_scale"].float()
            got = PackedQuantizationCompressor.decompress(layer, ct_scheme)["weight"]
            differing += int((bits(got) != bits(w)).sum())
        assert differing == 0


def differing_gguf_weights(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> int:
    """Elements (bitwise) where a GGUF file's tensors, back in HF row order, differ from ``want``."""
    from qat.export.gguf import rope_unpermute

    assert set(got) == set(want)
    differing = 0
    for name, w in got.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = rope_unpermute(w, HEADS if "attn_q" in name else KV_HEADS)
        differing += int((bits(torch.from_numpy(np.ascontiguousarray(w))) != bits(want[name])).sum())
    return differing


def test_without_a_scheme_the_merge_is_dequant_nf4_plus_scaled_BA_exactly():
    model = train(qlora(dropout=0.1))
    assert not any(isinstance(m, WeightQuantizer) for m in model.modules())
    with torch.no_grad():  # an eval forward through bnb's Linear4bit leaves the NF4 storage as trained
        model(input_ids=torch.randint(0, VOCAB, (1, 8)))
    want = {n: reference_weight(layer).detach().clone() for n, layer in lora_layers(model).items()}
    merged = merge_qlora(model)
    for name, w in want.items():
        lin = merged.get_submodule(name)
        assert type(lin) is nn.Linear and lin.bias is None
        assert torch.equal(bits(lin.weight), bits(w)), name


def test_adapters_save_and_load_with_peft_under_their_names(tmp_path):
    model = train(qlora("q4_0"))
    model.save_pretrained(tmp_path)
    want = {n: layer.effective_weight().detach() for n, layer in lora_layers(model).items()}
    base = prepare_kbit(quantize_nf4(tiny()))  # the same float weights: bnb quantizes them identically
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    prepare_qlora(loaded, "q4_0")
    got = {n: layer.effective_weight().detach() for n, layer in lora_layers(loaded).items()}
    assert set(got) == set(want)
    assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want)


def test_a_checkpoint_restores_base_adapters_and_quantizers():
    model = train(qlora("q4_0"))
    want = {n: layer.effective_weight().detach() for n, layer in lora_layers(model).items()}
    other = qlora("q4_0", seed=7)  # another base: the NF4 weights must come from the checkpoint
    load_qlora_state_dict(other, model.state_dict())
    got = {n: layer.effective_weight().detach() for n, layer in lora_layers(other).items()}
    assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want)


# -- misuse -------------------------------------------------------------------------------------------------

def test_misuse_is_reported():
    model = load_qlora(tiny(), QLoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(QuantError, match="without a LoRA adapter"):
        prepare_qlora(model, "q4_0")
    prepare_qlora(model, "q4_0", rules={"*.q_proj": "q4_0", "*.v_proj": "q4_0", "*": None})
    with pytest.raises(QuantError, match="already prepared"):
        prepare_qlora(model, "q4_0")
    with pytest.raises(QuantError, match="merge_qlora"):
        model.merge_and_unload()
