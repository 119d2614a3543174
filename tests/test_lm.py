"""The causal-LM task: model loading (tiny, HF dir, GGUF, the embedded SmolLM2), the LightningModule's
optimizer and schedule, evaluation (baked weights = fake-quant forward, PTQ, gap recovered) and
``load_run`` rebuilding exactly the model that was trained."""
from __future__ import annotations

import math

import pytest
import torch

import qat
from qat.cli import UserError
from qat.evaluate import EvalReport, bake_weights, gap_recovered, perplexity, ptq_model
from qat.lm.model import context_length, embedded_gguf, load_model
from qat.lm.module import CausalLMModule, freeze_except, warmup_cosine
from qat.lm.run import load_run
from qat.recipe import ModelConfig, load_recipe
from tiny_run import tiny_recipe


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(kind="tiny"), seed=0)


def batch(vocab: int, n: int = 2, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# -- models ------------------------------------------------------------------------------------------

def test_tiny_model_is_seeded_and_uses_the_embedded_tokenizer(tiny):
    model, tok = tiny
    again, _ = load_model(ModelConfig(kind="tiny"), seed=0)
    other, _ = load_model(ModelConfig(kind="tiny"), seed=1)
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, again.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(w, other.model.layers[0].mlp.up_proj.weight)
    assert model.config.vocab_size == len(tok) == 49152 and model.config.eos_token_id == tok.eos_token_id
    assert context_length(model) == 256


def test_hf_directory_loads_with_trust_remote_code_off(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen = {}
    import transformers
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loaded, _ = load_model(ModelConfig(kind="hf", path=str(tmp_path / "m")))
    assert seen["trust_remote_code"] is False
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_unloadable_model_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load model.path"):
        load_model(ModelConfig(kind="hf", path=str(tmp_path / "empty")))


@pytest.mark.slow
def test_gguf_file_and_embedded_model_load_the_same_weights():
    from_gguf, tok = load_model(ModelConfig(kind="gguf", path=str(embedded_gguf())))
    embedded, tok2 = load_model(ModelConfig(kind="embedded"))  # converted once, then cached
    assert type(from_gguf).__name__ == "LlamaForCausalLM" and from_gguf.config.num_hidden_layers == 30
    assert getattr(from_gguf.config, "quantization_config", None) is None
    assert tok("To be, or not to be").input_ids == tok2("To be, or not to be").input_ids
    for (name, p), q in zip(from_gguf.state_dict().items(), embedded.state_dict().values()):
        assert torch.equal(p, q), name


# -- module ------------------------------------------------------------------------------------------

def test_warmup_then_cosine():
    lr = [warmup_cosine(s, warmup_steps=4, max_steps=14, min_lr_ratio=0.1) for s in range(15)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == 1.0 and math.isclose(lr[9], 0.55) and math.isclose(lr[14], 0.1)
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))


def test_trainable_patterns_and_no_decay_groups(tiny):
    model, _ = tiny
    module = CausalLMModule(model, weight_decay=0.1)
    trained, total = freeze_except(module.model, ["model.layers.1.*"])
    assert 0 < trained < total
    assert all(p.requires_grad == n.startswith("model.layers.1.") for n, p in module.model.named_parameters())
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == trained
    freeze_except(module.model, ["*"])


# -- evaluation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["q4_0", "int8da_int4w"])
def test_baked_model_is_bitwise_the_fake_quant_forward(tiny, scheme):
    model, _ = tiny
    prepared = ptq_model(model, scheme)
    ids = batch(model.config.vocab_size)
    with torch.no_grad():
        want = prepared(input_ids=ids).logits
        got = bake_weights(prepared)(input_ids=ids).logits
    assert torch.equal(want, got)
    assert not any(True for _ in qat.fake_quant_modules(model))  # the float model was copied, not changed


def test_ptq_rounds_to_nearest_with_the_same_rules(tiny):
    model, _ = tiny
    ptq = ptq_model(model, "q4_0", rules={"*.down_proj": "q8_0"})
    fmts = {n.split(".")[-1]: m.weight_fake_quant.fmt.name for n, m in qat.fake_quant_modules(ptq)}
    assert fmts["down_proj"] == "q8_0" and fmts["up_proj"] == "q4_0"
    assert {m.weight_fake_quant.observer for _, m in qat.fake_quant_modules(ptq)} == {"dynamic"}


def test_perplexity_is_token_weighted(tiny):
    model, _ = tiny
    ids = batch(model.config.vocab_size, n=3)
    whole = perplexity(model, [{"input_ids": ids}])
    split = perplexity(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}])
    assert whole["tokens"] == split["tokens"] == 3 * 31
    assert math.isclose(whole["nll"], split["nll"], rel_tol=1e-5)
    assert math.isclose(whole["ppl"], math.exp(whole["nll"]))


def test_gap_recovered_and_report():
    assert gap_recovered(10.0, 20.0, 12.0) == 0.8
    assert gap_recovered(10.0, 9.0, 12.0) is None
    report = EvalReport("q4_0", {"float": {"ppl": 10.0, "nll": 2.3}, "ptq": {"ppl": 20.0, "nll": 3.0},
                                 "qat": {"ppl": 12.0, "nll": 2.48}})
    text = str(report)
    assert "PTQ q4_0 (round to nearest)" in text and "+100.0%" in text and "QAT recovers 80.0%" in text
    assert report.to_dict()["gap_recovered"] == 0.8


# -- load_run ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["qat", "ptq", "qlora"])
def test_load_run_rebuilds_the_trained_model(tmp_path, mode):
    """What load_run returns computes exactly what the training flow evaluated and exported."""
    from qat.lm.data import TextDataModule
    from qat.lm.model import save_model_config
    from qat.lm.run import _adapt, _merge, _new_run_dir, fit
    from qat.recipe import dump_config

    quant = {"scheme": "q4_0", "mode": "ptq" if mode == "ptq" else "qat"}
    if mode == "qat":
        quant["observer"] = "mse"
    extra = {"qlora": {"r": 4, "alpha": 8}} if mode == "qlora" else {}
    recipe = load_recipe(tiny_recipe(tmp_path, quant=quant, wandb={"enabled": False}, **extra))
    run_dir = recipe.run_dir
    _new_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(dump_config(recipe))
    model, tok = load_model(recipe.model)
    save_model_config(model, tok, run_dir / "model")
    data = TextDataModule(recipe.data, tok, 4, seed=0)
    module, _, _ = fit(_adapt(model, recipe), recipe, data, run_dir, mode, quantize=mode != "ptq")
    _merge(module, recipe)
    if mode == "ptq":
        module.model = ptq_model(module.model, "q4_0")
    ids = batch(model.config.vocab_size)
    with torch.no_grad():
        want = module.eval().model(input_ids=ids).logits
    for source in (run_dir, run_dir / "checkpoints" / "last.ckpt"):
        loaded, tok2, config = load_run(source)
        assert config == recipe and len(tok2) == len(tok)
        with torch.no_grad():
            got = loaded.model(input_ids=ids).logits
        assert torch.equal(want, got)
        layers = dict(qat.fake_quant_modules(loaded))
        assert layers and {m.weight_fake_quant.observer for m in layers.values()} == {
            "mse" if mode == "qat" else "dynamic"}
    with pytest.raises(UserError, match="no checkpoint"):
        load_run(tmp_path)
