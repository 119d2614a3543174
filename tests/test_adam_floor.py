"""qat/adam_floor.py: the floor on Adam's second moments changes no weight, bitwise, and does reach the states."""
import math

import pytest
import torch

import qat
from qat import adam_floor
from qat.adam_floor import FLOOR, SecondMomentFloor, attach_floor

IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _run(cls, impl: str, dtype, amsgrad: bool, floored: bool, steps: int = 25, every=None):
    """``steps`` steps on three weights whose gradients have elements masked to 0 in every step (5 %), some
    steps (5 %), and tiny ones (|g| ~ 1e-20, whose square underflows): as a clip mask leaves them."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 96), (33, 7), (256,)]
    ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype)) for s in shapes]
    always = [torch.rand(s, generator=g) < 0.05 for s in shapes]
    tiny = [torch.rand(s, generator=g) < 0.01 for s in shapes]
    # Adam adds its weight decay to the gradient: none here, or no element would keep a zero gradient
    opt = cls(ps, lr=1e-3, weight_decay=0.01 if cls is torch.optim.AdamW else 0.0, amsgrad=amsgrad, **IMPLS[impl])
    floor = SecondMomentFloor(opt, ps, every=every) if floored else None
    for _ in range(steps):
        for p, a, t in zip(ps, always, tiny):
            grad = torch.randn(p.shape, generator=g) * 1e-3
            grad = torch.where(t, grad * 1e-17, grad)
            grad[a | (torch.rand(p.shape, generator=g) < 0.05)] = 0
            p.grad = grad.to(dtype)
        opt.step()
    return ps, opt, always, floor


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,amsgrad", [(torch.optim.AdamW, False), (torch.optim.Adam, False),
                                         (torch.optim.AdamW, True)])
def test_floor_changes_no_weight_bitwise(impl, dtype, cls, amsgrad):
    ref, ref_opt, always, _ = _run(cls, impl, dtype, amsgrad, floored=False)
    got, opt, _, floor = _run(cls, impl, dtype, amsgrad, floored=True, every=3)
    assert floor.applied == 9  # after steps 1, 4, ... 25
    for p, q, a in zip(ref, got, always):
        assert torch.equal(p.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           q.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert torch.equal(ref_opt.state[p]["exp_avg"], opt.state[q]["exp_avg"])
        for key in ("exp_avg_sq",) + (("max_exp_avg_sq",) if amsgrad else ()):
            zeros, floored = ref_opt.state[p][key][a], opt.state[q][key][a]
            assert zeros.eq(0).all()  # what the clip mask leaves without the floor: the test can fail
            # raised, and decayed since the last pass by beta2 at most twice (max_exp_avg_sq does not decay)
            assert floored.min().item() >= FLOOR * 0.999 ** 2 * (1 - 1e-2)
            # every second moment above the floor's range is untouched (the tiny gradients' squares are
            # denormals on this CPU: those the floor raises)
            nz = ref_opt.state[p][key] > FLOOR * 1e5
            assert nz.float().mean() > 0.8
            assert torch.equal(ref_opt.state[p][key][nz], opt.state[q][key][nz])


def test_every_from_beta2_and_counts():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], betas=(0.9, 0.999))
    f = SecondMomentFloor(opt, [p])
    assert f.every == int(math.log(1e-37 / FLOOR) / math.log(0.999)) == 4602
    assert FLOOR * 0.999 ** f.every >= 1e-37 > 1.2e-38  # still a normal number when applied again
    opt2 = torch.optim.Adam([p], betas=(0.9, 0.95))
    assert SecondMomentFloor(opt2, [p]).every == 89
    for _ in range(5):
        p.grad = torch.zeros(4)
        opt.step()
    assert f.applied == 1 and f.steps == 5
    assert opt.state[p]["exp_avg_sq"].min().item() == pytest.approx(FLOOR * 0.999 ** 4, rel=1e-6)
    f.remove()
    opt.state[p]["exp_avg_sq"].zero_()
    opt.step()
    assert f.steps == 5 and opt.state[p]["exp_avg_sq"].eq(0).all()  # the hook is gone


def test_attach_floor_where_it_applies(monkeypatch):
    p, other = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    # a CPU weight: nothing to avoid (and nothing attached)
    assert attach_floor(torch.optim.AdamW([p]), [p]) is None
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # as if on CUDA, for the rules below
    f = attach_floor(torch.optim.AdamW([p, other]), [p])
    assert isinstance(f, SecondMomentFloor) and f.params == [p]  # only the given weights' states
    assert attach_floor(torch.optim.Adam([other]), [p]) is None  # none of the weights in this optimizer
    assert attach_floor(torch.optim.SGD([p], lr=0.1), [p]) is None  # no second moments
    monkeypatch.setenv("QAT_ADAM_FLOOR", "0")
    assert attach_floor(torch.optim.AdamW([p]), [p]) is None


def test_callback_attaches_the_floor_to_the_fake_quant_weights(monkeypatch):
    from test_callback import LM, loader, trainer

    from qat import QATCallback

    seen, floors = [], []

    def spy(opt, weights):  # on this CPU the real rule attaches nothing: record, and attach one anyway
        seen.append((opt, list(weights)))
        floors.append(SecondMomentFloor(opt, weights, every=2))
        return floors[-1]

    monkeypatch.setattr(adam_floor, "attach_floor", spy)
    module, cb = LM(), QATCallback("q4_0", log_every_n_steps=0)
    trainer(max_steps=3, callbacks=[cb]).fit(module, loader())
    (opt, weights), = seen
    fq = [m.weight for _, m in qat.fake_quant_modules(module)]
    assert len(fq) == 14 and [id(w) for w in weights] == [id(w) for w in fq]
    (floor,) = floors
    assert floor.steps == 3 and floor.applied == 2  # after steps 1 and 3
    assert cb._floors == [] and not opt._optimizer_step_post_hooks  # removed at the end of the fit
    zeros = sum(int(opt.state[w]["exp_avg_sq"].eq(0).sum()) for w in fq)
    assert zeros == 0  # the clip mask's zeros were raised (q4_0 clamps some element in most blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_floor_on_cuda_fused_bitwise():
    ps = [torch.nn.Parameter(torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    o1, o2 = (torch.optim.AdamW(x, lr=1e-3, fused=True) for x in (ps, qs))
    assert attach_floor(o2, qs) is not None and attach_floor(o1, []) is None
    g = torch.Generator(device="cuda").manual_seed(0)
    mask = [torch.rand(p.shape, device="cuda", generator=g) < 0.05 for p in ps]
    for _ in range(10):
        for p, q, m in zip(ps, qs, mask):
            p.grad = torch.randn(p.shape, device="cuda", generator=g, dtype=p.dtype).masked_fill(m, 0)
            q.grad = p.grad.clone()
        o1.step()
        o2.step()
    for p, q, m in zip(ps, qs, mask):
        assert torch.equal(p, q)
        assert o1.state[p]["exp_avg_sq"][m].eq(0).all() and o2.state[q]["exp_avg_sq"][m].gt(0).all()
