"""QATCallback in real Lightning runs: numerics, schedule, resume equality, convert/test, logging."""
import numpy as np
import pytest
import torch
import lightning as L
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import qat
from qat import QATCallback

from conftest import tiny_llama


class LM(L.LightningModule):
    def __init__(self, lr=3e-3):
        super().__init__()
        self.model = tiny_llama()
        self.lr = lr

    def training_step(self, batch, _):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def test_step(self, batch, _):
        self.log("test_loss", self.model(input_ids=batch, labels=batch).loss)

    def predict_step(self, batch, _):
        return self.model(input_ids=batch).logits.argmax(-1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.randint(0, 256, (n, 16), generator=g), batch_size=8)


def trainer(**kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kw)


def test_q4_0_effective_weights_equal_llama_cpp_round_trip_bitwise():
    module = LM()
    trainer(max_steps=3, callbacks=[QATCallback("q4_0")]).fit(module, loader())
    mods = list(qat.fake_quant_modules(module))
    assert len(mods) == 14
    for name, m in mods:
        w = m.weight.detach().numpy()
        ref = gguf_dequantize(gguf_quantize(w, T.Q4_0), T.Q4_0)
        ours = m.effective_weight().detach().numpy()
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), name


def test_start_step_and_freeze_step():
    module = LM()
    cb = QATCallback("q4_0", start_step=2, freeze_step=4, observer="mse")
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *_):
            wq = pl_module.model.model.layers[0].self_attn.q_proj.weight_fake_quant
            seen.append((trainer.global_step, wq.enabled, wq._frozen, wq.scale.clone()))

    trainer(max_steps=6, callbacks=[cb, Spy()]).fit(module, loader())
    assert [(s, e, f) for s, e, f, _ in seen] == [(0, False, False), (1, False, False), (2, True, False),
                                                 (3, True, False), (4, True, True), (5, True, True)]
    assert torch.equal(seen[4][3], seen[5][3])       # frozen: no change
    assert not torch.equal(seen[2][3], seen[3][3])   # observing: follows the weights


def test_schedule_writes_only_after_a_switch_was_set(monkeypatch):
    """The schedule skips its pass over the quantizers while no switch was set since its last one, and still
    puts back a switch the user set by hand, as it does every step."""
    import copy

    import qat.callback as qc
    from qat.observers import switch_epoch
    module = LM()
    cb = QATCallback("q4_0", start_step=2)
    from qat.prepare import prepare, quantizers
    prepare(module, "q4_0")
    qs = quantizers(module)
    cb._quantizers = qs
    passes = []
    real = qc.set_quantizer_switches
    monkeypatch.setattr(qc, "set_quantizer_switches", lambda *a, **k: passes.append(1) or real(*a, **k))
    cb._apply_schedule(module, 2)
    assert len(passes) == 1 and all(q.enabled for q in qs)
    cb._apply_schedule(module, 3)
    assert len(passes) == 1  # nothing set since
    before = switch_epoch()
    qs[0].enabled = False  # by hand, between two steps
    assert switch_epoch() != before
    cb._apply_schedule(module, 4)
    assert len(passes) == 2 and qs[0].enabled
    cb._apply_schedule(module, 1)  # the schedule's own change (before start_step)
    assert len(passes) == 3 and not any(q.enabled for q in qs)
    before = switch_epoch()
    qs[1].freeze()
    assert switch_epoch() != before and qs[1]._frozen
    cb._apply_schedule(module, 1)
    assert len(passes) == 4 and not qs[1]._frozen
    # a copy keeps its switch (the setter stores it in the instance)
    assert copy.deepcopy(qs[0]).enabled is False and qs[0].__getstate__()["_enabled"] is False
    state = dict(qs[0].__getstate__())
    state["enabled"] = state.pop("_enabled")  # a quantizer pickled when ``enabled`` was a plain attribute
    old = type(qs[0]).__new__(type(qs[0]))
    old.__setstate__(state)
    assert old.enabled is False


@pytest.mark.parametrize("observer", ["learned", "mse"])
def test_resume_from_end_of_epoch_checkpoint_is_bitwise_equal(tmp_path, observer):
    def make():
        torch.manual_seed(0)
        return LM(), QATCallback("q4_1", start_step=2, freeze_step=5, observer=observer)

    L.seed_everything(0)
    full, cb = make()
    trainer(max_epochs=3, callbacks=[cb]).fit(full, loader())

    L.seed_everything(0)
    part, cb = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer(max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True).fit(part, loader())

    L.seed_everything(123)  # resume must not depend on the fresh process's RNG
    resumed, cb = make()
    trainer(max_epochs=3, callbacks=[cb]).fit(resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt"))

    a, b = full.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any("weight_fake_quant.scale" in k for k in a)


def test_validate_test_predict_before_and_after_convert_and_fit_twice():
    module = LM()
    cb = QATCallback("q8_0", rules={"lm_head": "q8_0"})
    t = trainer(max_steps=2, callbacks=[cb])
    t.validate(module, loader(8))  # before fit: no fake quant yet, plain model
    t.fit(module, loader())
    codes = qat.convert(module)
    assert "model.lm_head" in codes
    out = t.test(module, loader(8))
    assert np.isfinite(out[0]["test_loss"])
    preds = t.predict(module, loader(8))
    assert preds[0].shape == (8, 16)
    t2 = trainer(max_steps=4, callbacks=[cb])
    t2.fit(module, loader())  # second fit: no re-prepare, continues
    assert len(list(qat.fake_quant_modules(module))) == 15


def test_layer_errors_are_logged(tmp_path):
    module = LM()
    logger = CSVLogger(tmp_path)
    cb = QATCallback("q4_0", log_every_n_steps=1)
    trainer(max_steps=2, callbacks=[cb], logger=logger, log_every_n_steps=1).fit(module, loader())
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "qat/rel_mse/model.model.layers.0.self_attn.q_proj" in text
    assert "qat/rel_mse_mean" in text and "qat/scale_mean/" in text
    assert len(cb.last_errors) == 14 and all(0 < r["rel_mse"] < 0.1 for r in cb.last_errors)


def test_resume_with_other_scheme_is_refused(tmp_path):
    module = LM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=1, callbacks=[QATCallback("q4_0"), ckpt], enable_checkpointing=True).fit(module, loader())
    with pytest.raises(Exception, match="resume with the same scheme"):
        trainer(max_steps=2, callbacks=[QATCallback("q8_0")]).fit(LM(), loader(), ckpt_path=str(tmp_path / "last.ckpt"))
