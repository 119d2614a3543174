"""The fused Triton kernel gives exactly the eager numerics (GPU only; skipped without CUDA)."""
import os

import pytest
import torch

from qat.formats import get_format
from qat.formats.base import to_blocks

from conftest import reference_fake_quant

pytestmark = pytest.mark.gpu

NAMES = ["q4_0", "q5_0", "q8_0", "q4_1", "q5_1", "int4_g32", "int4_asym_g32", "int8_g128", "int4_g128", "int2_asym_g64"]


def weights(seed, rows=96, cols=512, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :32] = 0
    w[1, 3] = 5.0
    w[2, :64] = (torch.arange(64) - 31.5) / 16
    w[3, :32] = 1e-9
    w[4, :] = w[4].abs()
    # fp32 denormals: scales below 2^-126 (Q4_0's d = amax/8 ~ 4e-39), so w_hat = code*d is denormal; a kernel
    # that flushes denormals to zero (Triton's default for libdevice's *_rn functions) would differ here.
    # (Blocks of denormal weights alone make 1/d overflow to inf and the codes NaN-dependent garbage, in C too.)
    w[5, :64] = torch.linspace(-3e-38, 3e-38, 64)
    return w.to(dtype).cuda()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dynamic_matches_eager_bitwise(name, seed, dtype):
    from qat.kernels.triton_fq import fused_fake_quant, kernel_kind
    fmt = get_format(name)
    assert kernel_kind(fmt) is not None
    w = weights(seed, dtype=dtype)
    scale, zero, raw, codes, ref = reference_fake_quant(w, fmt)
    s_buf = torch.full_like(scale, float("nan"))
    z_buf = None if zero is None else torch.full_like(zero, float("nan"))
    out, mask = fused_fake_quant(w, fmt, s_buf, z_buf, dynamic=True)
    # row 5 (denormal scales): torch's CUDA ops give NaN for Q4_1/Q5_1 at the block minimum (measured on an
    # H200); the kernel gives the CPU's (llama.cpp's) 0 there, checked against the CPU below
    keep = torch.arange(w.shape[0], device=w.device) != 5
    assert torch.equal(out[keep].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       ref[keep].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(s_buf.view(torch.int32), scale.view(torch.int32))
    if zero is not None:
        assert torch.equal(z_buf, zero)
    assert torch.equal(mask[keep], (raw == codes).reshape(w.shape)[keep])
    # and the CPU gives the same bits
    cpu = fmt.dequantize(fmt.quantize(w.float().cpu())).to(dtype)
    assert torch.equal(out.cpu().float(), cpu.float())


@pytest.mark.parametrize("name", NAMES)
def test_fused_given_params_matches_eager(name):
    from qat.kernels.triton_fq import fused_fake_quant
    fmt = get_format(name)
    w = weights(7)
    blocks = to_blocks(w, fmt.block)
    scale, zero = fmt.choose_params(blocks * 0.8)
    ref = fmt.decode(fmt.encode(blocks, scale, zero), scale, zero).reshape(w.shape)
    out, _ = fused_fake_quant(w, fmt, scale.clone(), None if zero is None else zero.clone(), dynamic=False)
    assert torch.equal(out, ref)


def test_module_uses_kernel_and_gradients_match_eager():
    from qat.observers import WeightQuantizer
    w = torch.nn.Parameter(weights(3))
    wq = WeightQuantizer("q4_0", w)
    g = torch.randn_like(w)
    wq(w).backward(g)
    fused_grad = w.grad.clone()
    w.grad = None
    os.environ["QAT_DISABLE_TRITON"] = "1"
    try:
        wq(w).backward(g)
    finally:
        del os.environ["QAT_DISABLE_TRITON"]
    assert torch.equal(fused_grad, w.grad)


def test_compiled_module_keeps_the_bits():
    """Under torch.compile the kernel runs as a triton_op: same weights, same outputs as eager."""
    from qat.modules import FakeQuantLinear
    from qat.observers import WeightQuantizer
    lin = torch.nn.Linear(512, 256, bias=False).cuda()
    m = FakeQuantLinear(lin, WeightQuantizer("q4_0", lin.weight))
    x = torch.randn(4, 512, device="cuda")
    eager = m(x)
    compiled = torch.compile(m)(x)
    assert torch.equal(eager, compiled)
    fmt = get_format("q4_0")
    assert torch.equal(m.effective_weight(), fmt.dequantize(fmt.quantize(lin.weight.detach().cpu())).cuda())


@pytest.mark.parametrize("name", ["q4_0", "int4_g32", "q4_1"])
def test_compiled_training_step_no_graph_breaks_and_same_grads(name):
    """Under torch.compile the fake quant is one traced custom op: no graph break, and the forward and the
    weight gradient equal eager's bitwise. The dynamic rule's buffers are not graph inputs there (not
    written); what export reads (``quantize``, which observes the weight) equals eager's."""
    from qat.modules import FakeQuantLinear
    from qat.observers import WeightQuantizer
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256, bias=False).cuda()
    x = torch.randn(8, 512, device="cuda")

    def fresh():
        l2 = torch.nn.Linear(512, 256, bias=False).cuda()
        l2.weight.data.copy_(lin.weight.data)
        return FakeQuantLinear(l2, WeightQuantizer(name, l2.weight))

    me = fresh()
    ye = me(x)
    ye.square().sum().backward()
    mc = fresh()
    explain = torch._dynamo.explain(mc)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    cm = torch.compile(mc)
    yc = cm(x)
    yc.square().sum().backward()
    assert torch.equal(ye, yc)
    assert torch.equal(me.weight.grad, mc.weight.grad)
    assert not mc.weight_fake_quant.scale.requires_grad
    before = mc.weight_fake_quant.scale.clone()
    # more steps: nothing from one step's graph may leak into the next (observer buffers included)
    for m, f in ((me, me), (mc, cm)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.step()
            opt.zero_grad()
            f(x).square().sum().backward()
    assert torch.equal(me.weight.grad, mc.weight.grad)
    assert torch.equal(me.weight, mc.weight)
    assert torch.equal(mc.weight_fake_quant.scale, before)  # no graph input, not written
    assert not torch.equal(me.weight_fake_quant.scale, before)  # eager wrote the last step's parameters
    qe, qc = me.quantize(), mc.quantize()
    assert torch.equal(qe.codes, qc.codes) and torch.equal(qe.scale, qc.scale)
    assert torch.equal(mc.weight_fake_quant.scale, me.weight_fake_quant.scale)  # quantize observed it
    # the compiled graph takes the weights and inputs only: no observer buffer among its inputs
    torch._dynamo.reset()
    gm_inputs = []

    def backend(gm, example_inputs):
        gm_inputs.extend(n.target for n in gm.graph.nodes if n.op == "placeholder")
        return gm

    torch.compile(fresh(), backend=backend)(x)
    assert not any("scale" in str(t) for t in gm_inputs), gm_inputs
