"""Model surgery: same Parameters, state-dict keys, rules, skips, errors, convert."""
import pytest
import torch
from torch import nn

import qat
from qat.formats import QuantError, get_format
from qat.modules import FakeQuantEmbedding, FakeQuantLinear

from conftest import tiny_llama


def test_prepare_keeps_parameters_keys_and_optimizer_references(llama):
    before = dict(llama.named_parameters())
    keys = set(llama.state_dict())
    opt = torch.optim.SGD(llama.parameters(), lr=0.1)
    qat.prepare(llama, "q4_0")
    after = dict(llama.named_parameters())
    assert all(after[k] is before[k] for k in before)
    assert keys <= set(llama.state_dict())
    assert all(".weight_fake_quant." in k for k in set(llama.state_dict()) - keys)
    q_proj = llama.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FakeQuantLinear) and isinstance(q_proj, nn.Linear)
    assert "forward" not in vars(q_proj)  # no monkey-patching
    w0 = q_proj.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 16))
    llama(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(q_proj.weight.detach(), w0)


def test_default_plan_quantizes_linears_but_not_head_or_embeddings(llama):
    qat.prepare(llama, "q8_0")
    names = {n for n, _ in qat.fake_quant_modules(llama)}
    assert len(names) == 2 * 7
    assert "lm_head" not in names and "model.embed_tokens" not in names


def test_rules_first_match_wins_none_keeps_float_and_suffixes_match(llama):
    rules = {"lm_head": "q8_0", "*.embed_tokens": "q4_1", "*.0.mlp.*": None, "*.mlp.down_proj": "q5_0", "*down_proj": "q4_1"}
    qat.prepare(llama, "q4_0", rules)
    fmts = {n: m.weight_fake_quant.fmt.name for n, m in qat.fake_quant_modules(llama)}
    assert fmts["lm_head"] == "q8_0"
    assert fmts["model.embed_tokens"] == "q4_1"
    assert isinstance(llama.model.embed_tokens, FakeQuantEmbedding)
    assert "model.layers.0.mlp.down_proj" not in fmts and "model.layers.0.mlp.up_proj" not in fmts
    assert fmts["model.layers.1.mlp.down_proj"] == "q5_0"
    assert fmts["model.layers.1.mlp.up_proj"] == "q4_0"


def test_incompatible_layer_is_an_error_naming_layer_and_scheme():
    model = tiny_llama(hidden=64, inter=96)  # down_proj has in_features 96: not a multiple of 64
    with pytest.raises(QuantError) as e:
        qat.prepare(model, "int4_g64")
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj (int4_g64)" in msg and "skip_incompatible" in msg
    assert not any(True for _ in qat.fake_quant_modules(model))  # nothing half-done


def test_incompatible_layer_skipped_with_warning_when_asked():
    model = tiny_llama(hidden=64, inter=96)
    with pytest.warns(UserWarning, match="keeping model.layers.0.mlp.down_proj in float"):
        qat.prepare(model, "int4_g64", skip_incompatible=True)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)


def test_unknown_scheme_and_nan_weights_are_errors(llama):
    with pytest.raises(QuantError, match="Did you mean"):
        qat.prepare(llama, "q4_O")
    with torch.no_grad():
        llama.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantError, match="o_proj.*NaN"):
        qat.prepare(llama, "q4_0")


def test_prepare_twice_is_an_error(llama):
    qat.prepare(llama, "q4_0")
    with pytest.raises(QuantError, match="already prepared"):
        qat.prepare(llama, "q4_0")
    qat.unprepare(llama)
    assert not any(True for _ in qat.fake_quant_modules(llama))
    qat.prepare(llama, "q8_0")


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "int4_w_g32", "int8_w", "int8da_int4w",
                                    "int4_asym_g32"])
@pytest.mark.parametrize("observer", ["dynamic", "mse", "learned"])
def test_convert_codes_reproduce_the_forward_weight_bitwise(llama, scheme, observer):
    qat.prepare(llama, scheme, {"*.embed_tokens": "q8_0"}, observer=observer)
    ids = torch.randint(0, 256, (2, 8))
    llama(input_ids=ids, labels=ids).loss.backward()
    codes = qat.convert(llama)
    assert len(codes) == 15
    for name, mod in qat.fake_quant_modules(llama):
        q = codes[name]
        deq = get_format(q.format).dequantize(q)
        assert torch.equal(deq, mod.effective_weight().detach()), name
    # the model still runs after convert
    llama(input_ids=ids)


def test_activation_schemes_quantize_inputs(llama):
    qat.prepare(llama, "int8da_int4w")
    q = llama.model.layers[0].self_attn.q_proj
    assert q.act_fake_quant is not None and q.act_fake_quant.fmt.name == "int8_asym_token"
    assert q.weight_fake_quant.fmt.name == "int4_g32"
    x = torch.randn(3, 64)
    ref = torch.nn.functional.linear(q.act_fake_quant(x), q.effective_weight())
    assert torch.equal(q(x), ref)


def test_tied_embedding_and_head_share_one_quantizer():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qat.prepare(model, "q4_0", {"*.embed_tokens": "q8_0", "lm_head": "q8_0"})
    assert model.lm_head.weight_fake_quant is model.model.embed_tokens.weight_fake_quant
    with pytest.raises(QuantError, match="share one weight tensor"):
        qat.prepare(tiny_llama(tie=True), "q4_0", {"*.embed_tokens": "q8_0", "lm_head": "q4_0"})


def test_effective_state_dict_has_plain_keys_and_quantized_values(llama):
    keys = set(llama.state_dict())
    qat.prepare(llama, "q4_0")
    sd = qat.effective_state_dict(llama)
    assert set(sd) == keys
    w = llama.model.layers[0].mlp.up_proj.weight.detach()
    fmt = get_format("q4_0")
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], fmt.dequantize(fmt.quantize(w)))


@pytest.mark.parametrize("observer", ["dynamic", "mse", "learned"])
def test_layer_errors_reports_without_changing_observer_state(observer):
    """The per-layer report (the callback logs it on rank 0 only) re-observes the current weights, but leaves
    every quantizer's buffers as the last forward left them: ranks stay identical under DDP."""
    m = tiny_llama()
    qat.prepare(m, "q4_0", observer=observer)
    ids = torch.randint(0, 256, (2, 8))
    m(input_ids=ids)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)  # an optimizer step after the last forward
    before = {k: v.clone() for k, v in m.state_dict().items() if "_fake_quant." in k}
    rows = qat.layer_errors(m)
    after = {k: v for k, v in m.state_dict().items() if "_fake_quant." in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert rows and all(r["rel_mse"] > 0 for r in rows)
    if observer == "dynamic":  # the report's scales are the current weights' (1.5x), not the buffers'
        lin = next(mod for mod in m.modules() if isinstance(mod, FakeQuantLinear))
        row = next(r for r in rows if r["layer"].endswith("q_proj"))
        assert row["scale_mean"] == pytest.approx(1.5 * float(lin.weight_fake_quant.scale.abs().float().mean()), rel=1e-2)
