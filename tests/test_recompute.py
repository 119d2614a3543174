"""QAT_RECOMPUTE (qat/recompute.py): the fake-quantized linear that recomputes ``w_hat`` and its clip mask
in the backward gives today's numbers bitwise (losses, every gradient, observer state, multi-step
trajectories) and keeps no weight-sized tensor but the Parameter itself for the backward.

Eager CPU here; the fused Triton path (all layers in one launch forward, the per-layer kernel in the
backward) through Triton's CPU interpreter where triton is installed, and on CUDA (gpu marker).
"""
import os
import sys
from contextlib import contextmanager
from itertools import product
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import assert_same_run, tiny_llama, tiny_qat_llama  # noqa: E402

import qat  # noqa: E402
from qat.modules import FakeQuantLinear  # noqa: E402
from qat.observers import WeightQuantizer  # noqa: E402


@contextmanager
def _env(key: str, value: str):
    """``key=value`` in the environment for the block; the caller's setting afterwards."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _recompute(flag: str):
    """QAT_RECOMPUTE=flag for the block."""
    return _env("QAT_RECOMPUTE", flag)


def _count_nodes(loss: torch.Tensor, name: str) -> int:
    seen, todo, n = set(), [loss.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n += name in fn.name()
        todo += [f for f, _ in fn.next_functions]
    return n


def _quant_linears(m) -> list:
    return [mod for mod in m.modules() if isinstance(mod, FakeQuantLinear)]


def _train(flag: str, scheme: str, device: str = "cpu", steps: int = 3, dtype=torch.float32, tie=False, rules=None,
           observer="dynamic", hidden=64, inter=128, autocast=False, freeze_at=None, compile=False):
    """Train a tiny Llama a few AdamW steps with QAT_RECOMPUTE=flag; everything a step produces. ``compile``:
    through ``torch.compile`` (CUDA), and ``kept`` is the device memory each forward left for the backward."""
    with _recompute(flag):
        m = tiny_qat_llama(scheme, device, dtype, rules=rules, observer=observer, tie=tie, hidden=hidden, inter=inter)
        if compile:
            torch._dynamo.reset()
        fwd = torch.compile(m) if compile else m
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses, grads, nodes, kept = [], [], [], []
        for step in range(steps):
            if step == freeze_at:
                qat.freeze_observers(m)
            ids = torch.randint(0, 256, (2, 16), generator=g).to(device)
            if device == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = fwd(input_ids=ids, labels=ids).loss
            if device == "cuda":
                kept.append(torch.cuda.memory_allocated() - before)
            nodes.append(_count_nodes(loss, "_RecomputeLinear"))
            loss.backward()
            losses.append(loss.detach().cpu())
            grads.append({n: p.grad.detach().cpu().clone() for n, p in m.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            logits = fwd(input_ids=ids).logits.cpu()
        state = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
        return dict(model=m, losses=losses, grads=grads, nodes=nodes, logits=logits, state=state, kept=kept)


def _check_recompute_vs_today(scheme, device="cpu", **kw) -> tuple[dict, dict]:
    a, b = _train("0", scheme, device, **kw), _train("1", scheme, device, **kw)
    n_lin = len(_quant_linears(b["model"]))
    assert n_lin and all(n == 0 for n in a["nodes"]), (scheme, a["nodes"])
    # every quantized linear ran the recompute path (from the first step a quantizer is enabled)
    assert b["nodes"][-1] == n_lin, (scheme, b["nodes"], n_lin)
    assert_same_run(a, b, scheme)
    return a, b


CASES = {
    "q4_0": dict(scheme="q4_0"),
    "int4_w_g32": dict(scheme="int4_w_g32"),
    "q8_0": dict(scheme="q8_0"),
    "q4_1 tied head": dict(scheme="q4_1", tie=True, rules={"lm_head": "q4_1"}),
    "q4_0 bf16 weights": dict(scheme="q4_0", dtype=torch.bfloat16),
    "q4_0 autocast bf16": dict(scheme="q4_0", autocast=True),
    "int4_asym mse, frozen at step 2": dict(scheme="int4_asym_g32", observer="mse", freeze_at=2),
    "q4_0 dynamic, frozen at step 2": dict(scheme="q4_0", freeze_at=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recompute_is_bitwise_today(case):
    _check_recompute_vs_today(**CASES[case])


@pytest.mark.parametrize("scheme,autocast", [("int4_asym_g32", False), ("q4_0", False), ("q4_1", True)])
def test_recompute_learned_scales_bitwise(scheme, autocast):
    """LSQ: the scale and zero-point gradients come out of the recompute node unchanged too."""
    _check_recompute_vs_today(scheme, observer="learned", autocast=autocast, freeze_at=2, steps=3)


@pytest.mark.parametrize("dtype,grouped", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_recompute_kquant_mix_bitwise(dtype, grouped, monkeypatch):
    """q4_k_m on 256-multiple widths (k-quants; QAT_RECOMPUTE=1 recomputes them too), the embedding and the
    tied head sharing one quantizer: the embedding keeps its STE, the head recomputes. ``grouped``: the
    k-quant layers searched together (kernels/batch.py), in a detached and a graph half per forward."""
    from qat.kernels import batch

    monkeypatch.setattr(batch, "KQ_ON_CPU", grouped)
    monkeypatch.setenv("QAT_BATCHED_FQ", "1")
    _, b = _check_recompute_vs_today("q4_k_m", hidden=256, inter=512, tie=True, dtype=dtype, steps=2)
    group = batch.group_of(next(mod.weight_fake_quant for mod in _quant_linears(b["model"])))
    assert (group.launches > 0) == grouped


def test_default_and_switch(monkeypatch):
    """Unset: on for CUDA weights in affine formats only (CPU: off); "1" on, "0" off; never without grad."""
    lin = torch.nn.Linear(64, 32)
    q, kq = WeightQuantizer("q4_0", lin.weight), WeightQuantizer("q4_k", torch.randn(32, 256))
    monkeypatch.delenv("QAT_RECOMPUTE", raising=False)
    assert not q.recomputes(lin.weight)
    monkeypatch.setenv("QAT_RECOMPUTE", "1")
    assert q.recomputes(lin.weight) and kq.recomputes(torch.randn(32, 256, requires_grad=True))
    with torch.no_grad():
        assert not q.recomputes(lin.weight)
    assert not q.recomputes(lin.weight.detach())
    q.enabled = False
    assert not q.recomputes(lin.weight)
    monkeypatch.setenv("QAT_RECOMPUTE", "0")
    q.enabled = True
    assert not q.recomputes(lin.weight)


@pytest.mark.timeout(900)
def test_ddp_end_state_bitwise(tmp_path, monkeypatch):
    """Lightning DDP on 2 CPU processes (tests/ddp_worker.py: learned scales and zero-points, off at step 0,
    frozen from step 3): every rank ends in the same state with the recompute path as without it."""
    from test_ddp import run

    monkeypatch.setenv("QAT_RECOMPUTE", "0")
    today = run(tmp_path / "today", 2)
    monkeypatch.setenv("QAT_RECOMPUTE", "1")
    rec = run(tmp_path / "recompute", 2)
    for a, b in zip(today, rec):
        assert a.keys() == b.keys()
        assert not [k for k in a if not torch.equal(a[k], b[k])]


# -- the linear alone: every input layout linear distinguishes -------------------------------------------

class _MatmulCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """The matmul-family aten calls with their operands' shapes, strides and dtypes: the same calls on a
    GPU run the same kernels, so equal lists here mean equal bits there."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "sum"):
            self.calls.append(str((func.overloadpacket.__name__, [
                (tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args])))
        return func(*args, **(kwargs or {}))


INPUTS = {  # x as linear sees it: the layouts its decomposition (and autograd's mm backward) tell apart
    "1d": lambda g: torch.randn(64, generator=g),
    "1d strided": lambda g: torch.randn(128, generator=g)[::2],
    "2d": lambda g: torch.randn(5, 64, generator=g),
    "2d column-major": lambda g: torch.randn(64, 5, generator=g).t(),
    "3d": lambda g: torch.randn(3, 4, 64, generator=g),
    "3d leading dims swapped": lambda g: torch.randn(4, 3, 64, generator=g).transpose(0, 1),
    "3d last dims swapped": lambda g: torch.randn(3, 64, 4, generator=g).transpose(1, 2),
    "4d": lambda g: torch.randn(2, 3, 2, 64, generator=g),
}


def _linear_step(flag, make, bias, dtype, autocast, observer):
    with _recompute(flag):
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 32, bias=bias).to(dtype)
        m = FakeQuantLinear(lin, WeightQuantizer("int4_asym_g32", lin.weight, observer))
        g = torch.Generator().manual_seed(1)
        x = make(g).to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(x)
        gy = torch.randn(y.shape, generator=g).to(y.dtype)
        with _MatmulCalls() as calls:
            y.backward(gy)
        return y, [x.grad] + [p.grad for p in m.parameters()], sorted(calls.calls), _count_nodes(y, "_Recompute")


@pytest.mark.parametrize("layout", list(INPUTS))
def test_linear_layouts_bitwise_and_same_calls(layout, one_thread):
    for bias, dtype, autocast, observer in product((False, True), (torch.float32, torch.bfloat16), (False, True),
                                                   ("dynamic", "learned")):
        if dtype == torch.bfloat16 and autocast:
            continue
        what = (layout, bias, dtype, autocast, observer)
        y0, g0, c0, n0 = _linear_step("0", INPUTS[layout], bias, dtype, autocast, observer)
        y1, g1, c1, n1 = _linear_step("1", INPUTS[layout], bias, dtype, autocast, observer)
        assert (n0, n1) == (0, 1), what
        assert torch.equal(y0, y1) and y0.dtype == y1.dtype, what
        for a, b in zip(g0, g1):
            assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b), what
        assert c0 == c1, (what, c0, c1)


def test_output_can_be_modified_in_place():
    with _recompute("1"):
        lin = torch.nn.Linear(64, 32)
        m = FakeQuantLinear(lin, WeightQuantizer("q4_0", lin.weight))
        y = m(torch.randn(2, 3, 64))
        y.mul_(2)  # as nn.Linear's output allows (HF code scales projections in place)
        y.sum().backward()
        assert lin.weight.grad is not None


# -- what the backward keeps ---------------------------------------------------------------------------

def _saved_storages(flag: str, dtype, scheme="q4_0", autocast=False):
    """Non-Parameter storages the autograd graph of one forward keeps, {ptr: (bytes, shapes saved)}, and the model.
    Per-layer fake quant (``QAT_BATCHED_FQ=0``): the one-launch group (active on CPU tensors under Triton's
    interpreter) keeps its masks on its autograd context, where saved-tensor hooks do not see them."""
    with _env("QAT_BATCHED_FQ", "0"), _recompute(flag):
        torch.manual_seed(0)
        m = tiny_llama(vocab=256, hidden=64, inter=128, layers=2)
        qat.prepare(m, scheme)
        m.to(dtype).train()
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                saved.setdefault(st.data_ptr(), [st.nbytes(), set()])[1].add(tuple(t.shape))
            return t

        ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))  # 21 tokens: no weight's shape
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return saved, m


@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)])
def test_backward_keeps_no_weight_copy(dtype, autocast):
    today, m = _saved_storages("0", dtype, autocast=autocast)
    rec, _ = _saved_storages("1", dtype, autocast=autocast)
    lins = _quant_linears(m)
    w_shapes = {tuple(mod.weight.shape) for mod in lins} | {tuple(mod.weight.shape)[::-1] for mod in lins}

    def weight_sized(saved):
        return [shapes for _, shapes in saved.values() if shapes & w_shapes]

    assert weight_sized(today), "the test must see today's w_hat and masks"
    assert not weight_sized(rec), weight_sized(rec)  # only the Parameters themselves (not counted) remain
    b_today, b_rec = sum(b for b, _ in today.values()), sum(b for b, _ in rec.values())
    w_hat = 2 if (dtype == torch.bfloat16 or autocast) else 4  # what the matmul saved: bf16 or fp32 w_hat
    n = sum(mod.weight.numel() for mod in lins)
    print(f"\nsaved for backward ({dtype}, autocast={autocast}): today {b_today} B, recompute {b_rec} B, "
          f"drop {b_today - b_rec} B; quantized params {n}, w_hat + mask = {n * (w_hat + 1)} B")
    assert b_today - b_rec >= n * (w_hat + 1)


# -- the fused kernels: forward from the one-launch group, backward from the per-layer kernel -------------

def _fused_checks(device: str) -> None:
    from qat.kernels.batch import group_of

    os.environ["QAT_BATCHED_FQ"] = "1"
    cases = [("q4_0", {}), ("int4_w_g32", {}), ("q4_1", dict(tie=True, rules={"lm_head": "q4_1"})),
             # the embedding and the tied head share one quantizer: the group computes both modes per forward
             ("q4_0", dict(tie=True, rules={"*embed_tokens": "q4_0", "lm_head": "q4_0"})),
             ("q4_0", dict(observer="learned", freeze_at=1)),
             ("q8_0", dict(dtype=torch.bfloat16)), ("q4_0", dict(autocast=True))]
    for scheme, kw in cases:
        a, b = _train("0", scheme, device, **kw), _train("1", scheme, device, **kw)
        assert b["nodes"][-1] == len(_quant_linears(b["model"])), (scheme, kw, b["nodes"])
        assert_same_run(a, b, (scheme, kw))
        q = next(mod.weight_fake_quant for mod in b["model"].modules() if isinstance(mod, FakeQuantLinear))
        group = group_of(q)
        if kw.get("observer") is None:
            # one launch per forward and mode, nothing recomputed in the group (3 steps + 1 eval forward)
            per_fwd = 2 if "*embed_tokens" in (kw.get("rules") or {}) else 1
            assert group.launches == 3 * per_fwd + 1, (scheme, kw, group.launches)
    print("recompute fused checks passed")


def test_fused_path_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_recompute import _fused_checks; _fused_checks('cpu')", "recompute fused checks passed")


@pytest.mark.gpu
def test_fused_path_cuda():
    _fused_checks("cuda")


@pytest.mark.gpu
def test_cuda_default_is_on_for_large_affine_weights(monkeypatch):
    """Unset: on for CUDA weights in affine formats with at least RECOMPUTE_MIN_NUMEL elements."""
    from qat import observers

    monkeypatch.delenv("QAT_RECOMPUTE", raising=False)
    m = tiny_llama(vocab=256, hidden=256, inter=320, layers=1)  # ffn_down 320 wide: Q5_0/Q8_0 fallback
    qat.prepare(m, "q4_k_m")
    m.cuda().train()
    lins = _quant_linears(m)
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    n_affine = sum(mod.weight_fake_quant.affine for mod in lins)
    assert 0 < n_affine < len(lins)  # the mix has k-quant layers (kept on today's path) and affine ones
    loss = m(input_ids=ids, labels=ids).loss
    assert _count_nodes(loss, "_RecomputeLinear") == 0  # all of them below the size limit
    monkeypatch.setattr(observers, "RECOMPUTE_MIN_NUMEL", 0)
    loss = m(input_ids=ids, labels=ids).loss
    assert _count_nodes(loss, "_RecomputeLinear") == n_affine


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["q4_0 bf16 weights", "q4_0 autocast bf16", "int4_w_g32", "q4_1 tied head",
                                  "q4_0 dynamic, frozen at step 2"])
def test_compiled_recompute_same_numbers_and_keeps_no_weight_copy(case):
    """Under torch.compile, QAT_RECOMPUTE=1 wraps each layer's fake quant in a checkpoint: the forward leaves at
    least ``w_hat`` + mask less memory for the backward than the compiled run that saves them, and the numbers
    are that run's. Bitwise: the first loss, and the whole trajectory with bf16 weights. With fp32 weights or
    autocast, inductor sums the norms' weight gradients in another order once the graph has the checkpoint
    regions (measured on an H200: RMSNorm weight gradients differ in the last bits at step 0, every
    quantized layer's gradient equal), so there the gradients and losses are compared to float tolerance."""
    kw = dict(CASES[case], steps=4, hidden=256, inter=512)
    a = _train("0", device="cuda", compile=True, **kw)
    b = _train("1", device="cuda", compile=True, **kw)
    lins = _quant_linears(b["model"])
    if kw.get("dtype") == torch.bfloat16:
        assert_same_run(a, b, case)
    else:
        assert torch.equal(a["losses"][0], b["losses"][0])
        quantized = {n + ".weight" for n, mod in b["model"].named_modules() if isinstance(mod, FakeQuantLinear)}
        for name, ga in a["grads"][0].items():
            gb = b["grads"][0][name]
            if name in quantized and "norm" not in name:
                assert torch.equal(ga, gb), name
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(torch.stack(a["losses"]), torch.stack(b["losses"]), rtol=1e-3, atol=0)
    n = sum(mod.weight.numel() for mod in lins)
    w_hat = 2 if (kw.get("dtype") == torch.bfloat16 or kw.get("autocast")) else 4
    drop = a["kept"][-1] - b["kept"][-1]
    print(f"\n{case}: forward kept {a['kept'][-1]} B saving w_hat, {b['kept'][-1]} B recomputing; "
          f"w_hat + mask = {n * (w_hat + 1)} B")
    assert drop >= n * (w_hat + 1), (drop, n * (w_hat + 1))


@pytest.mark.gpu
def test_compiled_default_recomputes_large_weights_only(monkeypatch):
    """Unset, the compiled rule is the eager one: CUDA weights of at least RECOMPUTE_MIN_NUMEL elements."""
    from qat import observers

    monkeypatch.delenv("QAT_RECOMPUTE", raising=False)
    lin = torch.nn.Linear(512, 256, bias=False).cuda()
    q = WeightQuantizer("q4_0", lin.weight)
    assert not q.recomputes_compiled(lin.weight)
    monkeypatch.setattr(observers, "RECOMPUTE_MIN_NUMEL", lin.weight.numel())
    assert q.recomputes_compiled(lin.weight)
    assert not q.recomputes_compiled(lin.weight.detach())
    assert not WeightQuantizer("q4_0", lin.weight, observer="mse").recomputes_compiled(lin.weight)
    assert not WeightQuantizer("q4_0", lin.weight.cpu()).recomputes_compiled(lin.weight.cpu())
