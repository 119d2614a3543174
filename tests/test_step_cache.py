"""The step cache (qat/step_cache.py): fake quant once per optimizer step gives the numbers of fake quant in
every forward, bitwise (losses, gradients, weights, observer state; gradient accumulation, autocast, a
switch-on step, Lightning with clipping), and falls back where it cannot be used.

CPU (torch path) here; the multi-layer kernel through Triton's CPU interpreter where triton is installed,
and on CUDA, eager and compiled (gpu marker).
"""
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import assert_same_run, reference_fake_quant, tiny_llama, tiny_qat_llama  # noqa: E402

import qat  # noqa: E402
from qat import QATCallback  # noqa: E402
from qat.modules import FakeQuantLinear  # noqa: E402
from qat.step_cache import StepCache  # noqa: E402


@pytest.fixture(autouse=True)
def _switches_unset(monkeypatch):
    """No QAT_* switch from the environment (or from another test) decides what the cache covers."""
    for key in ("QAT_RECOMPUTE", "QAT_STEP_CACHE", "QAT_DISABLE_TRITON", "QAT_BATCHED_FQ"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def _bnb_adamw8bit(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-2)


# optimizers that write the weights without bumping their version counters, and the plain one that does
OPTIMS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
          "fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),  # _fused_adamw_
          "bnb8": _bnb_adamw8bit}  # bitsandbytes' 8-bit AdamW: its own kernels write the weights


def _assert_steps_leave_version(optim: str) -> None:
    """What makes the fused-optimizer cases: ``OPTIMS[optim]`` changes a weight and leaves its version as it
    was (if this fails, torch or bitsandbytes changed, and the case no longer tests what it says)."""
    w = torch.nn.Parameter(torch.ones(64, 64))
    w.grad = torch.ones(64, 64)
    OPTIMS[optim]([w]).step()
    assert w._version == 0 and not torch.equal(w, torch.ones(64, 64))


def _train(cached: bool, scheme="q4_0", device="cpu", steps=3, accum=1, dtype=torch.float32, autocast=False,
           rules=None, observer="dynamic", tie=False, start_step=0, compile=False, refresh=True, hidden=64, inter=128,
           freeze_at=None, optim="adamw", overlap=False):
    """A tiny Llama, a few AdamW steps (``accum`` micro-batches each); everything a step produces. ``optim``: a
    key of ``OPTIMS``; the cache watches the optimizer (``StepCache.watch``) as the callback does. ``overlap``:
    as the callback, an overlapped refresh right after each optimizer step too (``refresh_if_stale`` at the
    next batch's start then waits for it)."""
    m = tiny_qat_llama(scheme, device, dtype, rules=rules, observer=observer, tie=tie, hidden=hidden, inter=inter)
    if compile:
        torch._dynamo.reset()
    fwd = torch.compile(m, backend=compile if isinstance(compile, str) else "inductor") if compile else m
    cache = StepCache(m) if cached else None
    opt = OPTIMS[optim](m.parameters())
    if cache is not None and optim != "adamw":  # the plain one is left unwatched: its steps bump versions
        cache.watch(opt)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for step in range(steps):
        qat.set_fake_quant_enabled(m, step >= start_step)
        if step == freeze_at:
            qat.freeze_observers(m)
        if cache is not None and (refresh or step == 0):
            cache.refresh_if_stale()
        for _ in range(accum):
            ids = torch.randint(0, 256, (2, 16), generator=g).to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = fwd(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach().cpu())
        if cache is not None:
            cache.flush()
        grads.append({n: p.grad.detach().cpu().clone() for n, p in m.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        if cache is not None and overlap and refresh:
            # the callback's on_train_batch_end: the next step's schedule first (a freeze must keep the
            # parameters of the weights the last forward saw, not those the refresh would compute), then the refresh
            qat.set_fake_quant_enabled(m, step + 1 >= start_step)
            if step + 1 == freeze_at:
                qat.freeze_observers(m)
            cache.refresh_if_stale(overlap=True)
    if cache is not None:
        cache.refresh_if_stale()
    with torch.no_grad():
        logits = fwd(input_ids=ids).logits.cpu()
    state = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
    return dict(model=m, cache=cache, losses=losses, grads=grads, logits=logits, state=state)


CASES = {
    "q4_0": dict(scheme="q4_0"),
    "int4_w_g32": dict(scheme="int4_w_g32"),
    "q4_1 (min), tied head quantized": dict(scheme="q4_1", tie=True, rules={"lm_head": "q4_1"}),
    "q8_0 bf16 weights": dict(scheme="q8_0", dtype=torch.bfloat16),
    "q4_0 autocast bf16": dict(scheme="q4_0", autocast=True),
    "q4_0 2 micro-batches per step": dict(scheme="q4_0", accum=2),
    "q4_0 switched on at step 2": dict(scheme="q4_0", start_step=2, steps=4),
    # k-quants on 256-multiple widths (q4_k, q6_k by llama.cpp's mix rules), the plain STE
    "q4_k_m": dict(scheme="q4_k_m", hidden=256, inter=512, steps=2),
    "int4_asym_g32 mse": dict(scheme="int4_asym_g32", observer="mse"),
    "q4_0 dynamic, frozen at step 2": dict(scheme="q4_0", freeze_at=2, steps=4),
    "q4_1 mse, frozen at step 1": dict(scheme="q4_1", observer="mse", freeze_at=1),
    "q4_0 learned (not covered)": dict(scheme="q4_0", observer="learned"),
}


def _check(device: str, names=tuple(CASES), **extra) -> None:
    for name in names:
        kw = dict(CASES[name], **extra)
        a, b = _train(False, device=device, **kw), _train(True, device=device, **kw)
        assert_same_run(a, b, name)
        n_lin = sum(isinstance(mod, FakeQuantLinear) for mod in b["model"].modules())
        covered = len(b["cache"].modules)
        steps = kw.get("steps", 3)
        if "not covered" in name:
            assert covered == 0, name
        else:
            # every linear; a tied head too (the embedding sharing its weight is no fake-quant module here):
            # its weight.grad then adds the embedding's gradient and the cache's
            assert covered == n_lin, (name, covered, n_lin)
            # a refresh before every step (the weights changed in each) and one after the last; every step's
            # gradients came through the caches
            assert b["cache"].moved == covered * (steps - kw.get("start_step", 0)), (name, b["cache"].moved)
            assert b["cache"].refreshes == steps + 1, (name, b["cache"].refreshes)
            # on CUDA the overlapped ones run on the side stream (not the first, nor one after a new plan)
            assert (b["cache"].overlapped > 0) == (bool(kw.get("overlap")) and device == "cuda"), name
            kq = {mod.weight_fake_quant.fmt.name for mod in b["cache"].modules if "_k" in mod.weight_fake_quant.fmt.name}
            assert bool(kq) == ("_k_" in name), (name, kq)  # the mix's k-quant layers are covered too


def test_same_numbers_as_fake_quant_every_forward():
    _check("cpu")


def test_overlapped_refresh_same_numbers():
    """The callback's order: the refresh right after each optimizer step (``overlap=True``), its wait at the
    next batch's start. Bitwise the run without the cache (on the CPU the refresh runs at once; its version
    marks wait)."""
    _check("cpu", overlap=True)


def test_overlapped_refresh_eager_forward_ignores_the_cache_until_wait():
    """Between ``refresh(overlap=True)`` and ``wait()`` the side stream may still be writing the caches: an eager
    forward must not read them. Poisoned caches show which forward reads them: before the wait the logits are
    fake quant's, after it the poison's. A fused optimizer step between the two drops the marks."""
    m = tiny_qat_llama("q4_0", "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(input_ids=ids).logits
    cache = StepCache(m)
    cache.refresh()
    assert all(mod._w_cache_version == mod.weight._version for mod in cache.modules)
    cache.refresh(overlap=True)  # no step between: the marks the last refresh set must not stay valid
    assert all(mod._w_cache_version == -1 for mod in cache.modules)
    with torch.no_grad():
        for mod in cache.modules:
            mod._w_cache.fill_(float("nan"))
        assert torch.equal(m(input_ids=ids).logits, want)
        cache.wait()
        assert all(mod._w_cache_version == mod.weight._version for mod in cache.modules)
        assert m(input_ids=ids).logits.isnan().all()
    cache.refresh()
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, want)
    opt = OPTIMS["fused"](m.parameters())
    cache.watch(opt)
    m(input_ids=ids, labels=ids).loss.backward()
    cache.flush()
    cache.refresh(overlap=True)
    opt.step()  # leaves the versions as they were: only the hook tells
    cache.wait()
    assert all(mod._w_cache_version == -1 for mod in cache.modules) and cache.stale()
    cache.refresh_if_stale()
    assert not cache.stale() and all(mod._w_cache_version == mod.weight._version for mod in cache.modules)
    cache.close()


def test_missed_refresh_falls_back_to_fake_quant(monkeypatch):
    """Weights changed after ``refresh`` (no refresh after the optimizer steps): the layers ignore their
    caches, fake-quantize as usual, and the numbers stay those of the uncached run."""
    a = _train(False)
    b = _train(True, refresh=False)
    assert_same_run(a, b, "no refresh")
    assert all(m._w_cache.grad is None for m in b["cache"].modules)


@pytest.mark.parametrize("optim", ["fused", "bnb8"])
@pytest.mark.parametrize("refresh", [True, False], ids=["refreshed", "missed refresh"])
def test_fused_optimizer_watched(refresh, optim):
    """Fused AdamW and bitsandbytes' 8-bit AdamW leave the weights' versions as they were: the watched step
    marks the caches stale, so a refresh follows it, and a forward without that refresh fake-quantizes as
    usual; the numbers stay those of the uncached run. Without ``watch`` the second step trains on the first
    step's ``w_hat``."""
    _assert_steps_leave_version(optim)
    a = _train(False, optim=optim)
    b = _train(True, optim=optim, refresh=refresh)
    assert_same_run(a, b, optim)
    # one before each of the 3 steps (or only the first) and one before the final eval forward
    assert b["cache"].refreshes == (3 + 1 if refresh else 2), b["cache"].refreshes


def test_watch_marks_stale_until_refresh_and_close_unhooks():
    m = tiny_qat_llama("q4_0", "cpu", torch.float32)
    cache = StepCache(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    cache.refresh()
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert not cache.stale()  # the versions alone miss the step
    cache.watch(opt)
    opt.step()
    assert cache.stale()
    cache.refresh_if_stale()
    assert not cache.stale() and cache.refreshes == 2
    cache.close()
    opt.step()
    assert not cache._hooks and not cache._stepped  # close removed the hook


def test_coverage(monkeypatch):
    m = tiny_llama(vocab=256, hidden=64, inter=128, layers=1, tie=True)
    # the embedding and the tied head, both quantized: one weight, two fake-quant modules: not covered
    qat.prepare(m, "q4_0", rules={"*embed_tokens": "q4_0", "lm_head": "q4_0"})
    cache = StepCache(m)
    assert m.lm_head not in cache.modules
    assert len(cache.modules) == 7
    monkeypatch.setenv("QAT_RECOMPUTE", "1")  # recomputing layers keep no w_hat; a cache would keep one
    assert StepCache(m).modules == []
    monkeypatch.delenv("QAT_RECOMPUTE")
    qat.set_fake_quant_enabled(m, False)  # before start_step: no cache, the layers pass the weight through
    cache = StepCache(m)
    cache.refresh()
    assert len(cache.modules) == 7 and all(mod._w_cache is None for mod in cache.modules)
    qat.set_fake_quant_enabled(m, True)
    assert cache.stale()
    cache.refresh_if_stale()
    assert all(mod._w_cache is not None for mod in cache.modules)


def test_close_and_export_read_the_weights():
    b = _train(True)
    m, cache = b["model"], b["cache"]
    assert all(mod._w_cache is not None for mod in cache.modules)
    q = {n: mod.quantize() for n, mod in qat.fake_quant_modules(m)}
    for mod in cache.modules:  # the cache holds exactly what quantize() (export) gives for the weight now
        name = next(n for n, x in m.named_modules() if x is mod)
        w_file = mod.weight_fake_quant.fmt.dequantize(q[name]).to(mod.weight.dtype).reshape(mod.weight.shape)
        assert torch.equal(mod._w_cache.detach(), w_file), name
    cache.close()
    assert all(mod._w_cache is None for mod in cache.modules)
    assert "_w_cache" not in str(list(m.state_dict()))


class _LM(L.LightningModule):
    def __init__(self, **opt_kw):
        super().__init__()
        self.model = tiny_llama()
        self.opt_kw = opt_kw

    def training_step(self, batch, _):
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, _):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, **self.opt_kw)


def _fit(step_cache: bool, opt_kw=None, **kw):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randint(0, 256, (32, 16), generator=g), batch_size=4)
    module = _LM(**(opt_kw or {}))
    cb = QATCallback("q4_0", start_step=1, freeze_step=3, step_cache=step_cache, log_every_n_steps=0)
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("gradient_clip_val", 0.05)
    t = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, deterministic=True, val_check_interval=2, limit_val_batches=2,
                  accumulate_grad_batches=2, callbacks=[cb], **kw)
    t.fit(module, data, data)
    return module, cb, t


def _check_fit_same_with_and_without_cache(cached=True, **kw) -> None:
    """``_fit`` without the cache and with it (``cached``: True, or None for the default where it is on): after
    every backward (8 micro-batches, 2 per optimizer step) the flush moved the gradients of all 14 layers
    once fake quant was on (from step 1: 6 of them), before the optimizer step nothing was left to move, the
    caches are freed at the end, and the final state and validation loss are bitwise the uncached run's."""
    a, _, ta = _fit(False, **kw)
    assert a.opt_kw == kw.get("opt_kw", {})
    seen, overlapped = [], []
    orig_backward, orig_step = QATCallback.on_after_backward, QATCallback.on_before_optimizer_step

    def after_backward(self, trainer, module):
        before = self._cache.moved
        orig_backward(self, trainer, module)
        seen.append(("backward", self._cache.moved - before))

    def before_step(self, trainer, module, opt):
        before = self._cache.moved
        orig_step(self, trainer, module, opt)
        seen.append(("step", self._cache.moved - before))
        overlapped.append(self._cache.overlapped)

    QATCallback.on_after_backward, QATCallback.on_before_optimizer_step = after_backward, before_step
    try:
        b, cb, tb = _fit(cached, **kw)
    finally:
        QATCallback.on_after_backward, QATCallback.on_before_optimizer_step = orig_backward, orig_step
    moved = [("backward", 0)] * 2 + [("step", 0)] + ([("backward", 14)] * 2 + [("step", 0)]) * 3
    assert seen == moved, seen
    # on a GPU the refresh after an optimizer step ran on the side stream (after step 2: those after steps 1 and
    # 3 follow the switch-on and the freeze, a new plan each)
    assert (overlapped[-1] > 0) == (kw.get("accelerator") == "gpu"), overlapped
    assert cb._cache is None and all(m._w_cache is None for m in b.modules() if isinstance(m, FakeQuantLinear))
    sa, sb = a.state_dict(), b.state_dict()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]
    assert torch.equal(ta.callback_metrics["val_loss"], tb.callback_metrics["val_loss"])


def test_lightning_same_weights_with_clipping_accumulation_validation_and_freezing():
    _check_fit_same_with_and_without_cache()


def test_lightning_overlapped_refresh_waited_for(tmp_path):
    """The callback refreshes with ``overlap=True`` after each optimizer step: a hook after its
    ``on_train_batch_end`` finds the refresh pending, the next batch's start and a checkpoint save wait for it,
    and ``wait_for_step_cache`` does too (and sets the eager forwards' marks)."""
    seen = []

    class _Probe(L.Callback):  # after QATCallback in the list: its hooks run after the callback's
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            cb = trainer.callbacks[0]
            pending = cb._cache._pending is not None
            if pending and trainer.global_step == 2:  # not every step: the next start must do its own wait
                trainer.save_checkpoint(self.dir / f"step{trainer.global_step}.ckpt")
                seen.append(("saved", cb._cache._pending is None))
            seen.append(("end", pending))

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            cb = trainer.callbacks[0]
            if cb._cache is not None:
                seen.append(("start", cb._cache._pending is None))

    probe = _Probe()
    probe.dir = tmp_path
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randint(0, 256, (16, 16), generator=g), batch_size=4)
    cb = QATCallback("q4_0", step_cache=True, log_every_n_steps=0)
    t = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", callbacks=[cb, probe])
    t.fit(_LM(), data)
    assert (tmp_path / "step2.ckpt").exists()
    # every step: the refresh pending after the callback's hook; done after the save and at every next start
    assert seen.count(("end", True)) == 3 and seen.count(("saved", True)) == 1, seen
    assert seen.count(("start", True)) == 3 and ("start", False) not in seen, seen
    m = tiny_qat_llama("q4_0", "cpu", torch.float32)
    cb = QATCallback("q4_0")
    cb.wait_for_step_cache()  # no cache: nothing to do
    cb._cache = StepCache(m)
    cb._cache.refresh(overlap=True)
    assert cb._cache._pending is not None
    cb.wait_for_step_cache()
    assert cb._cache._pending is None
    assert all(mod._w_cache_version == mod.weight._version for mod in cb._cache.modules)


def test_lightning_same_weights_fused_adamw():
    """Fused AdamW writes the weights without bumping their version counters (``_fused_adamw_``, torch 2.11-2.13),
    so the weights' versions cannot tell the cache that they changed: the optimizer's step hook does. Before
    it, every forward after the first optimizer step trained on the first step's ``w_hat``."""
    _assert_steps_leave_version("fused")
    _check_fit_same_with_and_without_cache(opt_kw=dict(fused=True))


def test_lightning_step_cache_switch(monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    class _T:  # what on_train_start reads
        world_size, precision, strategy, optimizers = 2, "bf16-mixed", DDPStrategy(), []

    module = _LM()
    qat.prepare(module, "q4_0")
    _T.optimizers = [torch.optim.AdamW(module.parameters(), fused=True)]
    cb = QATCallback("q4_0", step_cache=True)
    with pytest.warns(UserWarning, match="step_cache is off: it runs with Lightning's single-device strategy"):
        cb.on_train_start(_T(), module)
    assert cb._cache is None
    monkeypatch.setenv("QAT_STEP_CACHE", "1")
    with pytest.warns(UserWarning, match="step_cache is off: it runs with Lightning's single-device strategy"):
        QATCallback("q4_0").on_train_start(_T(), module)
    _T.world_size = 1  # DDP on one process (or FSDP, DeepSpeed): its hooks would miss the cached layers
    with pytest.warns(UserWarning, match="single-device strategy only, not DDPStrategy"):
        QATCallback("q4_0").on_train_start(_T(), module)
    _T.strategy = SingleDeviceStrategy("cpu")
    QATCallback("q4_0", step_cache=False).on_train_start(_T(), module)  # the argument wins over the variable
    for precision in ("bf16-mixed", "16-mixed", "32-true"):
        _T.precision = precision
        cb = QATCallback("q4_0")
        cb.on_train_start(_T(), module)
        assert cb._cache is not None and len(cb._cache.modules) == 14 and len(cb._cache._hooks) == 1
        cb._cache.close()
        assert not cb._cache._hooks and not _T.optimizers[0]._optimizer_step_post_hooks
    monkeypatch.delenv("QAT_STEP_CACHE")
    # the default: on for GPU weights only, and not with manual optimization (checked on a GPU below)
    cb = QATCallback("q4_0")
    cb.on_train_start(_T(), module)
    assert cb._cache is None


class _ManualLM(_LM):
    """Manual optimization, two optimizer steps per ``training_step`` with a forward between them (the case
    the default leaves out) and the module's own gradient clipping after ``manual_backward``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, _):
        opt = self.optimizers()
        for half in batch.chunk(2):
            loss = self.model(input_ids=half, labels=half).loss
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
            opt.step()
        return loss


def test_lightning_manual_optimization_with_the_cache_asked_for():
    """``step_cache=True`` with manual optimization (eager): the flush after ``manual_backward`` gives the
    module's clipping the full gradients, and the forward after the first ``opt.step()`` in the same
    ``training_step`` sees a weight newer than its cache and fake-quantizes as usual: the weights end bitwise
    where they end without the cache."""
    ends = []
    for cache in (False, True):
        L.seed_everything(0)
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.DataLoader(torch.randint(0, 256, (16, 16), generator=g), batch_size=4)
        module = _ManualLM()
        cb = QATCallback("q4_0", step_cache=cache, log_every_n_steps=0)
        L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", callbacks=[cb]).fit(module, data)
        ends.append(module.state_dict())
    bad = [k for k in ends[0] if "fake_quant" not in k and not torch.equal(ends[0][k], ends[1][k])]
    assert not bad, bad[:5]


# -- the multi-layer kernel ---------------------------------------------------------------------------------

def _kernel_checks(device: str) -> None:
    from qat.step_cache import StepCache as SC

    launched = []
    orig = SC._launch

    def spy(self, group, outs, dynamic, mode):
        launched.append((len(group), mode))
        return orig(self, group, outs, dynamic, mode)

    SC._launch = spy
    names = [n for n in CASES if "not covered" not in n]
    _check(device, names)
    assert launched and {mode for _, mode in launched} == {1, 2}, launched
    print("step cache kernel checks passed")


def test_kernel_path_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _kernel_checks; _kernel_checks('cpu')", "step cache kernel checks passed")


@pytest.mark.gpu
def test_kernel_path_cuda():
    _kernel_checks("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["q4_0", "q4_0 autocast bf16", "q8_0 bf16 weights", "q4_0 switched on at step 2"])
def test_compiled_same_numbers_no_fake_quant_in_the_graph(name, monkeypatch):
    """Compiled with the cache: the numbers of the compiled run without it (both compiled), and no fake-quant
    kernel traced into the graphs (the forward is an unquantized model's).

    The ``dynamic`` observers' buffers are left out of the state comparison: the compiled op without the
    cache does not write them (kernels/triton_fq.py: they would be graph inputs), where the cache's refresh
    does. Here they must hold the parameters of the final weights."""
    from qat.kernels import triton_fq as tfq

    traced = []
    launch = tfq._launch
    monkeypatch.setattr(tfq, "_launch", lambda *a: (traced.append(1), launch(*a))[1])
    kw = dict(CASES[name], steps=4)
    a = _train(False, device="cuda", compile=True, **kw)
    n_uncached, traced[:] = len(traced), []
    b = _train(True, device="cuda", compile=True, **kw)
    assert n_uncached > 0 and not traced, (n_uncached, len(traced))
    if kw.get("dtype") == torch.bfloat16:
        assert_same_run(a, b, name, state=False)
        bad = [k for k in a["state"] if "fake_quant" not in k and not torch.equal(a["state"][k], b["state"][k])]
        assert not bad, (name, "state", bad[:5])
    else:  # inductor's reduction order may differ between the two graphs (see test_recompute.py)
        assert torch.equal(a["losses"][0], b["losses"][0])
        torch.testing.assert_close(torch.stack(a["losses"]), torch.stack(b["losses"]), rtol=1e-3, atol=0)
    for m in b["cache"].modules:
        q = m.weight_fake_quant
        kept = q.scale.detach().clone()
        q.observe(m.weight)
        assert torch.equal(kept, q.scale), name


def test_resume_from_checkpoint_bitwise_with_the_cache(tmp_path):
    """A run with the cache, stopped after 2 epochs and resumed to 3, ends bitwise where the uninterrupted run
    with the cache ends (the cache is no state: the resumed weights are new, so the first batch refreshes it),
    and with the weights of the run without the cache. (The ``dynamic`` observers' buffers differ from that
    run's: refreshed after the last optimizer step they hold the parameters of the final weights, where
    without the cache they hold those of the last forward; ``quantize``/export recompute them anyway.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    import test_callback as tc

    def make(cache=True):
        torch.manual_seed(0)
        return tc.LM(), QATCallback("q4_1", start_step=2, step_cache=cache, log_every_n_steps=0)

    ends = []
    for cache in (False, True):
        L.seed_everything(0)
        full, cb = make(cache)
        tc.trainer(max_epochs=3, callbacks=[cb]).fit(full, tc.loader())
        ends.append(full.state_dict())
    L.seed_everything(0)
    part, cb = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    tc.trainer(max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True).fit(part, tc.loader())
    assert not any("_w_cache" in k for k in torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"])
    L.seed_everything(123)
    resumed, cb = make()
    tc.trainer(max_epochs=3, callbacks=[cb]).fit(resumed, tc.loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    ends.append(resumed.state_dict())
    plain, cached, resumed = ends
    bad = [k for k in cached if not torch.equal(cached[k], resumed[k])]
    assert not bad, bad[:5]
    weights = [k for k in plain if "fake_quant" not in k]
    assert len(weights) > 14 and all(torch.equal(plain[k], cached[k]) for k in weights)


@pytest.mark.parametrize("name", ["q4_0", "q4_0 switched on at step 2", "q4_0 2 micro-batches per step"])
def test_traced_by_dynamo_same_numbers_no_recompiles(name):
    """Through dynamo and AOTAutograd (``aot_eager``: the traced graphs run as they are, so the arithmetic is
    eager's): the cached run gives the uncached eager run's numbers bitwise, the caches take the gradients
    (a graph input that is no Parameter), and steps after the first do not recompile."""
    from torch._dynamo.utils import counters

    kw = dict(CASES[name], steps=4)
    a = _train(False, **kw)
    counters.clear()
    b = _train(True, compile="aot_eager", **kw)
    assert_same_run(a, b, name)
    assert b["cache"].moved == len(b["cache"].modules) * (4 - kw.get("start_step", 0))
    # one graph for training, one for the no-grad eval forward; the switch-on adds one
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 2 + (kw.get("start_step", 0) > 0), dict(counters["stats"])


@pytest.mark.gpu
def test_overlapped_refresh_cuda():
    """The refresh on its side stream (``_check`` asserts it ran there): eager, bitwise the run without the
    cache; packed (every layer large), eager and compiled."""
    _check("cuda", overlap=True)
    _packed_checks("cuda", overlap=True)
    _packed_checks("cuda", compile="inductor", overlap=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_cuda_default_same_weights(precision):
    """The callback on one GPU with its default (the cache on; the kernel path: one launch per format and
    step), bf16-mixed and fp16-mixed (the GradScaler unscales after the closure, so after the flush)."""
    _check_fit_same_with_and_without_cache(None, accelerator="gpu", devices=1, precision=precision)


@pytest.mark.gpu
def test_lightning_cuda_fused_adamw():
    """As above with fused AdamW (CUDA's ``_fused_adamw_``), which does not bump the weights' versions; without
    clipping, which Lightning's mixed precision refuses for fused optimizers."""
    _check_fit_same_with_and_without_cache(None, accelerator="gpu", devices=1, precision="bf16-mixed",
                                           opt_kw=dict(fused=True), gradient_clip_val=None)


@pytest.mark.gpu
def test_default_off_with_manual_optimization_or_the_variable(monkeypatch):
    module = _LM().cuda()
    module.automatic_optimization = False

    from lightning.pytorch.strategies import SingleDeviceStrategy

    class _T:
        world_size, precision, strategy = 1, "bf16-mixed", SingleDeviceStrategy("cuda:0")

    qat.prepare(module, "q4_0")
    assert QATCallback("q4_0")._step_cache_wanted(_T(), _LM().cuda())
    assert not QATCallback("q4_0")._step_cache_wanted(_T(), module)
    monkeypatch.setenv("QAT_STEP_CACHE", "0")
    assert not QATCallback("q4_0")._step_cache_wanted(_T(), _LM().cuda())


# -- the packed cache: large layers keep 4-bit codes for the step, not w_hat ------------------------------------

PACKED_CASES = {name: CASES[name] for name in (
    "q4_0", "int4_w_g32", "int4_asym_g32 mse", "q8_0 bf16 weights", "q4_0 autocast bf16",
    "q4_0 2 micro-batches per step", "q4_0 switched on at step 2", "q4_0 dynamic, frozen at step 2")}
PACKED_CASES["q4_1 bf16 weights"] = dict(scheme="q4_1", dtype=torch.bfloat16)
# two packed groups (two formats): every layer must read its own group's buffers, under compile too
PACKED_CASES["q4_0 attention, q4_1 mlp"] = dict(scheme="q4_0", rules={"*mlp.*": "q4_1"})
INDUCTOR_CASES = ("q4_0 autocast bf16", "q4_1 bf16 weights")


def _packed_checks(device: str, compile=False, **train_kw) -> None:
    """Every layer taken as large (``QAT_RECOMPUTE=1``): the 4-bit ones keep codes, parameters and clip bits
    for the step, unpack ``w_hat`` in the forward and again in the backward, and ``flush`` applies the STE's
    mask to their weights' gradients. Bitwise the uncached eager run, eager or through dynamo and AOTAutograd
    (``compile="aot_eager"``); with inductor, the uncached compiled run's numbers; compiled, with no graph
    break and no recompile. Q8_0 (8-bit codes) is not packed: those layers keep the recompute path."""
    import os

    import torch._dynamo
    from torch._dynamo.utils import counters

    from qat.kernels import triton_fq as tfq

    os.environ["QAT_RECOMPUTE"] = "1"
    try:
        for name, kw in PACKED_CASES.items():
            kw = dict(kw, **train_kw)
            if compile == "aot_eager" and kw.get("dtype") == torch.bfloat16:
                continue  # the traced bf16 graphs differ from eager outside fake quant (the q8_0 case, unpacked)
            if compile == "inductor" and name not in INDUCTOR_CASES:
                continue  # two inductor compiles per case: the cases the eager run does not cover already
            print("packed:", name, flush=True)
            # aot_eager runs the traced graphs as they are: against eager; inductor: against the uncached compiled run
            a = _train(False, device=device, compile=compile if compile == "inductor" else False, **kw)
            counters.clear()
            b = _train(True, device=device, compile=compile, **kw)
            cache = b["cache"]
            n_lin = sum(isinstance(mod, FakeQuantLinear) for mod in b["model"].modules())
            assert cache.modules == [], name
            # overlapped on CUDA: on the side stream (not the first refresh, nor one after a new plan)
            assert (cache.overlapped > 0) == (bool(kw.get("overlap")) and device == "cuda" and "q8_0" not in name), name
            if "q8_0" in name:
                assert cache.packed == [] and cache.masked == 0, name
            else:
                assert len(cache.packed) == n_lin, (name, len(cache.packed))
                assert len(cache._bufs) == (2 if "mlp" in name else 1), (name, list(cache._bufs))
                on = kw.get("steps", 3) - kw.get("start_step", 0)
                assert cache.masked == n_lin * on, (name, cache.masked)  # one flush per step
                clipped = sum(int(torch.tensor([bin(w & 0xFFFFFFFF).count("1") for w in buf.words.tolist()]).sum())
                              for buf in cache._bufs.values())
                # the mask is not all ones: flush has something to do (Q4_1's min/max range clips nothing)
                assert clipped > 0 or kw["scheme"] == "q4_1", name
            if compile:
                assert sum(counters["graph_break"].values()) == 0, (name, dict(counters["graph_break"]))
                # training and eval; a switch-on, or a freeze (the packed buffers of frozen parameters are new
                # tensors), adds one
                extra = (kw.get("start_step", 0) > 0) + (kw.get("freeze_at") is not None)
                assert counters["stats"]["unique_graphs"] <= 2 + extra, (name, dict(counters["stats"]))
            if compile == "inductor":
                # inductor may order the rest of the backward's sums differently around other ops (measured on
                # an H200: Q4_1 with bf16 weights, the third loss 5.5814 against 5.5817); the kernels' bits are
                # checked eager above
                assert torch.equal(a["losses"][0], b["losses"][0]), name
                torch.testing.assert_close(torch.stack(a["losses"]), torch.stack(b["losses"]), rtol=1e-3, atol=0)
            else:
                assert_same_run(a, b, name)
        # without flush's mask the gradients are the identity STE's: the run differs
        orig = tfq.clip_zero
        tfq.clip_zero = lambda *args: None
        try:
            a, b = _train(False, device=device), _train(True, device=device)
            assert not all(torch.equal(x, y) for x, y in zip(a["state"].values(), b["state"].values()))
        finally:
            tfq.clip_zero = orig
    finally:
        del os.environ["QAT_RECOMPUTE"]
    print("packed cache checks passed")


def test_packed_cache_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _packed_checks; _packed_checks('cpu')", "packed cache checks passed")


def test_packed_cache_overlapped_interpreted():
    """The callback's order (``_train(overlap=True)``): the packed layers' version marks wait for ``wait()``."""
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _packed_checks; _packed_checks('cpu', overlap=True)",
                    "packed cache checks passed")


def test_packed_cache_traced_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _packed_checks; _packed_checks('cpu', compile='aot_eager')",
                    "packed cache checks passed")


@pytest.mark.gpu
def test_packed_cache_cuda():
    _packed_checks("cuda")


@pytest.mark.gpu
def test_packed_cache_compiled_cuda():
    _packed_checks("cuda", compile="inductor")


def test_packed_coverage_and_fallbacks(monkeypatch):
    """Which large layers are packed (4-bit affine formats, ``dynamic``/``mse``, an unshared weight), the
    switch, and where packing cannot run (no Triton, e.g. this CPU without the interpreter): the layers
    keep the recompute path and nothing is packed."""
    monkeypatch.setenv("QAT_RECOMPUTE", "1")
    m = tiny_llama(vocab=256, hidden=64, inter=128, layers=1)
    qat.prepare(m, "q4_0", rules={"*mlp.down_proj": "q8_0", "*mlp.up_proj": "q5_0"})
    cache = StepCache(m)
    names = {n for n, mod in m.named_modules() if mod in cache.packed}
    # 8- and 5-bit codes are not packed; large, they recompute (no w_hat cache either)
    assert len(names) == 5 and not any("down_proj" in n or "up_proj" in n for n in names), names
    assert cache.modules == []
    # a quantized head tied to a plain embedding: its weight's gradient is the sum of both, which flush would
    # mask whole; it recomputes instead
    tied = tiny_llama(vocab=256, hidden=64, inter=128, layers=1, tie=True)
    qat.prepare(tied, "q4_0", rules={"lm_head": "q4_0"})
    assert isinstance(tied.lm_head, FakeQuantLinear) and tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head not in StepCache(tied).packed and len(StepCache(tied).packed) == 7
    monkeypatch.setenv("QAT_STEP_CACHE_PACK", "0")
    assert StepCache(m).packed == []
    monkeypatch.delenv("QAT_STEP_CACHE_PACK")
    monkeypatch.setenv("QAT_DISABLE_TRITON", "1")
    cache.refresh()
    assert all(mod._w_packed is None for mod in cache.packed) and not cache._bufs
    cache.close()


def test_packed_missed_refresh_falls_back_interpreted():
    from conftest import run_interpreted

    code = ("import os; os.environ['QAT_RECOMPUTE'] = '1'; import torch; from conftest import assert_same_run; "
            "from test_step_cache import _train; a = _train(False); b = _train(True, refresh=False); "
            "assert_same_run(a, b, 'no refresh'); c = b['cache']; "
            "assert len(c.packed) == 14 and c.masked == 14, c.masked; "
            "a = _train(False, optim='fused'); b = _train(True, refresh=False, optim='fused'); "
            "assert_same_run(a, b, 'fused, no refresh'); c = b['cache']; "
            "assert len(c.packed) == 14 and c.masked == 14, c.masked; "
            "b = _train(True, optim='fused'); assert_same_run(a, b, 'fused'); "
            "print('missed refresh ok')")
    run_interpreted(code, "missed refresh ok")


def _packed_fit_checks() -> None:
    """``QATCallback(step_cache=True)`` with every layer taken as large (``QAT_RECOMPUTE=1``): packed, with
    clipping, accumulation, validation during fit, a switch-on and a freeze; the final state and validation
    loss are bitwise the uncached run's, flush masked the gradients (one launch per micro-batch), and the
    caches are gone."""
    import os

    from qat.kernels import triton_fq as tfq

    os.environ["QAT_RECOMPUTE"] = "1"
    calls = []
    orig = tfq.clip_zero
    tfq.clip_zero = lambda *a: (calls.append(len(a[0])), orig(*a))[1]
    a, _, ta = _fit(False)
    assert not calls
    b, cb, tb = _fit(True)
    # 6 of 8 micro-batches with fake quant on (from step 1): one launch each, for the 14 layers
    assert calls == [14] * 6, calls
    sa, sb = a.state_dict(), b.state_dict()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]
    assert torch.equal(ta.callback_metrics["val_loss"], tb.callback_metrics["val_loss"])
    mods = [m for m in b.modules() if isinstance(m, FakeQuantLinear)]
    assert cb._cache is None and all(m._w_packed is None for m in mods)
    print("packed fit checks passed")


def test_packed_lightning_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _packed_fit_checks; _packed_fit_checks()", "packed fit checks passed")


def _sign_max_checks(device: str) -> None:
    """Q4_0/Q5_0's scale is the block's signed value of largest magnitude, the first on a tie. The kernels take
    it from the block's max and min and run the first-index rule only in programs holding a block where
    those tie (equal magnitudes, an all-zero block): blocks with a +-tie either way round, all -0, +0 and -0
    mixed, next to plain ones, in programs with and without a tie. The fake quant kernel and the packed
    refresh give the reference rule's bits (scale, w_hat, mask; codes and clip bits)."""
    import os

    from qat.formats import get_format
    from qat.kernels import triton_fq as tfq

    g = torch.Generator().manual_seed(5)
    for name in ("q4_0", "q5_0"):
        fmt = get_format(name)
        # bf16 on CUDA only: Triton's CPU interpreter rounds fp32 -> bf16 toward zero (w_hat off by an ulp)
        for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
            w = torch.randn(256, 64, generator=g) * 0.02
            w[0, 3], w[0, 9] = -0.5, 0.5  # the negative first
            w[1, 2], w[1, 7] = 0.5, -0.5  # the positive first
            w[2, :32] = -0.0
            w[3, :32] = 0.0
            w[3, 0] = -0.0
            w[4, 32 + 31], w[4, 32] = 0.25, -0.25  # the tie's second element last in its block
            w[200, 5], w[200, 6] = -1.0, 1.0  # a tie in another program, the rest tie-free
            w = w.to(dtype).to(device)
            scale, _, raw, codes, ref = reference_fake_quant(w, fmt)
            s_buf = torch.full_like(scale, float("nan"))
            out, mask = tfq.fused_fake_quant(w, fmt, s_buf, None, dynamic=True)
            bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
            assert torch.equal(s_buf.view(torch.int32), scale.view(torch.int32)), (name, dtype)
            assert torch.equal(out.view(bits), ref.view(bits)), (name, dtype)
            assert torch.equal(mask, (raw == codes).reshape(w.shape)), (name, dtype)
            if name == "q4_0":  # 4-bit: the packed refresh too
                m = torch.nn.Sequential(torch.nn.Linear(64, 256, bias=False)).to(device, dtype)
                with torch.no_grad():
                    m[0].weight.copy_(w)
                os.environ["QAT_RECOMPUTE"] = "1"
                try:
                    qat.prepare(m, "q4_0", rules={"*": "q4_0"})
                    cache = StepCache(m)
                    cache.refresh()
                finally:
                    del os.environ["QAT_RECOMPUTE"]
                pk = m[0]._w_packed
                got = pk.w_hat(m[0].weight.detach())
                assert torch.equal(got.view(bits), ref.view(bits)), (name, dtype)
                unpacked = torch.stack([pk.buf.codes & 15, pk.buf.codes >> 4], 1).reshape(w.shape)
                assert torch.equal(unpacked.long(), codes.reshape(w.shape).long()), (name, dtype)
                clip = (raw != codes).reshape(-1, 32).long() << torch.arange(32, device=device)
                words = clip.sum(1)
                words = torch.where(words >= 2**31, words - 2**32, words).int()
                assert torch.equal(pk.buf.words, words), (name, dtype)
    print("sign max checks passed")


def test_sign_max_ties_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _sign_max_checks; _sign_max_checks('cpu')", "sign max checks passed")


@pytest.mark.gpu
def test_sign_max_ties_cuda():
    _sign_max_checks("cuda")


def _regrad_checks() -> None:
    """A packed layer's gradient is masked once per backward: a second flush leaves it alone, and a new
    gradient after ``zero_grad`` without an optimizer step (a step fp16's GradScaler skipped) is masked again,
    though the weights, and maybe the gradient's address, are the same."""
    import os

    from qat.kernels import triton_fq as tfq

    os.environ["QAT_RECOMPUTE"] = "1"
    torch.manual_seed(0)
    m = tiny_qat_llama("q4_0")
    cache = StepCache(m)
    cache.refresh()
    ids = torch.randint(0, 256, (2, 16))
    launches = []
    orig = tfq.clip_zero
    tfq.clip_zero = lambda *a: (launches.append(len(a[0])), orig(*a))[1]
    try:
        grads = []
        for _ in range(2):
            m(input_ids=ids, labels=ids).loss.backward()
            cache.flush()
            cache.flush()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
            m.zero_grad(set_to_none=True)
    finally:
        tfq.clip_zero = orig
    n = len(cache.packed)
    assert n > 0 and launches == [n, n], launches
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    print("regrad checks passed")


def test_packed_mask_once_per_gradient_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _regrad_checks; _regrad_checks()", "regrad checks passed")


def _clip_zero_checks(dev: str) -> None:
    """``clip_zero`` against torch's ``grad * mask`` with the mask from the clip words, over words with no bit,
    one bit (any of the 32, bit 31 too), many and all 32; several gradients of odd sizes in one launch, at
    several program sizes; -0 and nan where masked. Bitwise (bf16 on CUDA only: the CPU interpreter's bf16
    stores drop the sign of -0 and nan's bits, for every kernel)."""
    from qat.kernels import triton_fq as tfq

    torch.manual_seed(0)
    sizes = [32 * 300, 32 * 7, 32 * 1001]
    n_words = sum(sizes) // 32
    pick = torch.rand(n_words)
    full = torch.randint(-2**31, 2**31 - 1, (n_words,), dtype=torch.int64)
    one = 1 << torch.randint(0, 32, (n_words,))
    words = torch.where(pick < 0.3, 0, torch.where(pick < 0.7, one, full))
    words[:4] = torch.tensor([-1, 2**31, 2**31 - 1, 3 << 30])  # all 32 bits, bit 31 alone, bits 0-30, 30-31
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(dev)
    offs = [0, sizes[0] // 32, (sizes[0] + sizes[1]) // 32]
    dtypes = (torch.float32, torch.bfloat16) if dev == "cuda" else (torch.float32,)
    per0 = tfq.CLIP_WORDS
    try:
        for dt in dtypes:
            grads = [torch.randn(n, device=dev).to(dt) for n in sizes]
            grads[0][:3] = torch.tensor([float("nan"), -1.0, -0.0])  # in word 0: all bits set
            want = []
            for g, o in zip(grads, offs):
                w = words[o:o + g.numel() // 32].to(torch.int64) & 0xFFFFFFFF
                bits = (w[:, None] >> torch.arange(32, device=dev)) & 1
                want.append(g * (bits.flatten() == 0).to(dt))
            assert want[0][1].item() == 0 and torch.signbit(want[0][1]) and want[0][0].isnan()
            for per in (64, 256):
                tfq.CLIP_WORDS = per
                got = [g.clone() for g in grads]
                tfq.clip_zero(got, words, offs, {})
                iv = torch.int32 if dt == torch.float32 else torch.int16
                for a, b in zip(got, want):
                    assert torch.equal(a.view(iv), b.view(iv)), (dt, per)
    finally:
        tfq.CLIP_WORDS = per0
    print("clip zero checks passed")


def test_clip_zero_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_step_cache import _clip_zero_checks; _clip_zero_checks('cpu')", "clip zero checks passed")


@pytest.mark.gpu
def test_clip_zero_cuda():
    _clip_zero_checks("cuda")



def test_refresh_if_stale_sees_every_change():
    """``refresh_if_stale`` (every batch's start; the quantizers' switches read only after one was set) refreshes
    on each change ``stale()`` sees and only then: a new version, a moved weight, requires_grad, a switch set, a freeze, a
    watched optimizer's step; the eager forwards read their marks from one list (``_Marks``)."""
    m = tiny_qat_llama("q4_0")
    cache = StepCache(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    cache.watch(opt)
    cache.refresh()
    a = cache.modules[0]
    assert a._w_cache_version == a.weight._version

    def refreshes_once(change):
        n = cache.refreshes
        cache.refresh_if_stale()
        assert cache.refreshes == n  # nothing changed yet
        change()
        assert cache.stale()
        cache.refresh_if_stale()
        assert cache.refreshes == n + 1 and not cache.stale()
        cache.refresh_if_stale()
        assert cache.refreshes == n + 1

    def bump():
        with torch.no_grad():
            a.weight.mul_(0.5)

    def step():
        a.weight.grad = torch.ones_like(a.weight)
        opt.step()

    def frozen_again():
        a.weight.requires_grad_(True)

    refreshes_once(bump)
    refreshes_once(lambda: setattr(a.weight, "data", a.weight.data.clone()))
    refreshes_once(lambda: a.weight.requires_grad_(False))
    assert a._w_cache is None  # a weight that does not train keeps no cache
    refreshes_once(frozen_again)
    refreshes_once(lambda: setattr(cache.modules[1].weight_fake_quant, "enabled", False))
    assert cache.modules[1]._w_cache is None
    refreshes_once(lambda: setattr(cache.modules[1].weight_fake_quant, "enabled", True))
    refreshes_once(lambda: cache.modules[2].weight_fake_quant.freeze())
    refreshes_once(step)
    assert a._w_cache_version == a.weight._version
    cache._unmark()
    assert all(mod._w_cache_version == -1 for mod in cache.modules)
    cache.close()
    assert all(mod._w_cache_version == -1 for mod in cache.modules)


def test_plan_made_once_per_layout(monkeypatch):
    """``refresh`` groups the layers once and reuses the grouping while the layout stays (where the weights are,
    their dtype, which layers train): a weight changed in place is refreshed with the same plan; a layer
    switched off, or a weight moved, makes a new plan (the switched-off layer drops its cache)."""
    m = tiny_qat_llama("q4_0")
    cache = StepCache(m)
    plans = []
    make = cache._make_plan
    monkeypatch.setattr(cache, "_make_plan", lambda: plans.append(1) or make())
    cache.refresh()
    cache.refresh()
    assert len(plans) == 1
    a, b = cache.modules[0], cache.modules[1]
    with torch.no_grad():
        a.weight.mul_(-3.0)  # a new version, same place
    assert cache.stale()
    cache.refresh()
    assert len(plans) == 1 and not cache.stale()
    w_hat = reference_fake_quant(a.weight.detach(), a.weight_fake_quant.fmt)[4]
    assert torch.equal(a._w_cache.detach(), w_hat)
    b.weight_fake_quant.enabled = False
    cache.refresh()
    assert len(plans) == 2 and b._w_cache is None and a._w_cache is not None
    b.weight_fake_quant.enabled = True
    a.weight.data = a.weight.data.clone()  # moved: the cache is filled from the new storage
    cache.refresh()
    assert len(plans) == 3 and b._w_cache is not None
    for lay in (a, b):
        assert torch.equal(lay._w_cache.detach(), reference_fake_quant(lay.weight.detach(), lay.weight_fake_quant.fmt)[4])
    cache.close()
    cache.refresh()
    assert len(plans) == 4
