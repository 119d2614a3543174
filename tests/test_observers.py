"""Observers: dynamic, mse, learned, frozen; activation observers. State lives in buffers/parameters."""
import pytest
import torch
from torch import nn

from qat.formats import get_format
from qat.formats.base import to_blocks
from qat.observers import ActQuantizer, WeightQuantizer, mse_params


def test_dynamic_recomputes_every_step():
    w = nn.Parameter(torch.randn(4, 64))
    wq = WeightQuantizer("q4_0", w, "dynamic")
    wq(w)
    s0 = wq.scale.clone()
    with torch.no_grad():
        w.mul_(2)
    wq(w)
    assert torch.equal(wq.scale, s0 * 2)


def test_mse_never_worse_than_reference_and_clips_outliers():
    fmt = get_format("int4_g32")
    w = torch.randn(16, 64)
    w[:, 0] = 8.0  # an outlier per block: clipping it lowers the MSE of the rest
    blocks = to_blocks(w, 32)

    def err(scale, zero):
        return (fmt.decode(fmt.encode(blocks, scale, zero), scale, zero) - blocks).pow(2).sum(-1)

    ref = err(*fmt.choose_params(blocks))
    s, z = mse_params(fmt, blocks)
    assert (err(s, z) <= ref).all()
    assert (err(s, z) < ref).any()
    assert (s < fmt.choose_params(blocks)[0]).any()


def test_learned_is_parameter_initialised_from_the_reference_rule():
    w = nn.Parameter(torch.randn(4, 64))
    wq = WeightQuantizer("int4_asym_g32", w, "learned")
    params = dict(wq.named_parameters())
    assert set(params) == {"scale", "zero"}
    s, z = wq.fmt.choose_params(to_blocks(w.detach(), 32))
    assert torch.equal(wq.scale.detach(), s) and torch.equal(wq.zero.detach(), z)
    out = wq(w)
    out.sum().backward()
    assert wq.scale.grad is not None and w.grad is not None


def test_frozen_observer_keeps_its_parameters_and_checkpoints_them():
    w = nn.Parameter(torch.randn(4, 64))
    wq = WeightQuantizer("q4_0", w, "mse")
    wq(w)
    wq.freeze()
    s0 = wq.scale.clone()
    with torch.no_grad():
        w.mul_(3)
    out = wq(w)
    assert torch.equal(wq.scale, s0)
    # codes now come from the stored parameters
    assert torch.equal(out, wq.fmt.dequantize(wq.fmt.quantize_with(w.detach(), s0, None)))
    sd = wq.state_dict()
    assert set(sd) == {"frozen", "scale"} and bool(sd["frozen"])
    fresh = WeightQuantizer("q4_0", torch.randn(4, 64), "mse")
    fresh.load_state_dict(sd)
    assert fresh._frozen and torch.equal(fresh.scale, s0)


def test_disabled_quantizer_is_identity():
    w = torch.randn(2, 32)
    wq = WeightQuantizer("q4_0", w)
    wq.enabled = False
    assert wq(w) is w


def test_non_affine_formats_only_take_dynamic():
    import pytest

    from qat.formats import QuantError
    with pytest.raises(QuantError, match="only observer='dynamic'"):
        fmt = get_format("q4_k")  # exists once k-quants are in
        WeightQuantizer(fmt, torch.randn(2, 256), "mse")


def test_per_token_dynamic_activation_quant():
    aq = ActQuantizer("int8_asym_token")
    x = torch.randn(2, 3, 64)
    out = aq(x)
    fmt = get_format("int8_asym_token")
    ref = fmt.dequantize(fmt.quantize(x.reshape(6, 64))).reshape(2, 3, 64)
    assert torch.equal(out, ref)


def test_moving_average_activation_observer_updates_only_in_training():
    aq = ActQuantizer("int8_asym_tensor", observer="moving_average", momentum=0.5)
    aq.train()
    aq(torch.full((2, 32), 1.0).index_fill_(1, torch.tensor([0]), -1.0))
    assert float(aq.min_val) == -1.0 and float(aq.max_val) == 1.0
    aq(torch.full((2, 32), 3.0).index_fill_(1, torch.tensor([0]), -3.0))
    assert float(aq.min_val) == -2.0 and float(aq.max_val) == 2.0
    aq.eval()
    aq(torch.full((2, 32), 9.0))
    assert float(aq.max_val) == 2.0
    assert {"min_val", "max_val", "frozen"} <= set(aq.state_dict())


def test_frozen_learned_scales_get_no_gradient_and_stay_bitwise():
    w = nn.Parameter(torch.randn(4, 64))
    wq = WeightQuantizer("int4_asym_g32", w, "learned")
    wq.freeze()
    s0, z0 = wq.scale.detach().clone(), wq.zero.detach().clone()
    out = wq(w)
    out.sum().backward()
    assert wq.scale.grad is None and wq.zero.grad is None and w.grad is not None
    assert torch.equal(out, wq.fmt.dequantize(wq.quantize(w)))
    assert torch.equal(wq.scale.detach(), s0) and torch.equal(wq.zero.detach(), z0)


@pytest.mark.parametrize("observer", ["dynamic", "learned"])
def test_model_cast_keeps_quant_params_fp32(observer):
    """bf16-true training casts the model: scales/zero stay the exact fp32 values (Parameters stay the same
    objects, so optimizers holding them still work)."""
    import qat
    from conftest import tiny_llama
    m = tiny_llama()
    qat.prepare(m, "q4_1", observer=observer)
    q = m.model.layers[0].self_attn.q_proj.weight_fake_quant
    before = {k: (getattr(q, k), getattr(q, k).detach().clone()) for k in ("scale", "zero")}
    m.to(torch.bfloat16)
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    for k, (obj, val) in before.items():
        now = getattr(q, k)
        assert now.dtype == torch.float32 and torch.equal(now, val)
        if observer == "learned":
            assert now is obj


def test_moving_average_uncalibrated_is_a_clear_error_and_calibrate_fills_it():
    """A PTQ model with moving-average activation ranges used to evaluate to NaN: now an uncalibrated one
    says so, and qat.calibrate fills the ranges from a few batches (eval mode, weights untouched)."""
    import qat
    from conftest import tiny_llama
    from qat.formats import QuantError
    m = tiny_llama()
    qat.prepare(m, "int8da_int4w", act_observer="moving_average")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    from qat.prepare import needs_calibration
    assert needs_calibration(m)
    with pytest.raises(QuantError, match="qat.calibrate"):
        m(input_ids=ids)
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith(("min_val", "max_val"))}
    assert qat.calibrate(m, [ids, {"input_ids": ids}], max_batches=8) == 2
    assert not needs_calibration(m) and not m.training
    out = m(input_ids=ids).logits
    assert torch.isfinite(out).all()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    acts = [a for a in m.modules() if type(a).__name__ == "ActQuantizer"]
    assert acts and all(torch.isfinite(a.min_val) and a.min_val <= a.max_val for a in acts)


def test_act_quantizer_freeze_stops_statistics_and_survives_state_dict():
    from qat.observers import ActQuantizer

    aq = ActQuantizer("int8_asym_tensor", observer="moving_average").train()
    aq(torch.randn(4, 32))
    aq.freeze()
    lo, hi = aq.min_val.clone(), aq.max_val.clone()
    aq(10 * torch.randn(4, 32))  # training mode, but frozen: the statistics stay
    assert torch.equal(aq.min_val, lo) and torch.equal(aq.max_val, hi) and bool(aq.frozen)
    fresh = ActQuantizer("int8_asym_tensor", observer="moving_average").train()
    fresh.load_state_dict(aq.state_dict())
    fresh(10 * torch.randn(4, 32))
    assert torch.equal(fresh.min_val, lo), "a frozen observer loaded from a checkpoint stays frozen"
    fresh.freeze(False)
    fresh(10 * torch.randn(4, 32))
    assert not torch.equal(fresh.min_val, lo)
