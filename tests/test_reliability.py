"""Reliability (issue 8): a run killed with -9 resumes bitwise; a killed export leaves the previous file or
nothing; every bad input is one message and exit code 2; untrusted files are refused; long runs don't drift.

Bad inputs tested elsewhere, not repeated here:
  unknown recipe key, wrong type, YAML errors (script)   test_recipe.py::test_script_exits_2_without_traceback_...
  sequence longer than the context (script)              test_train_smoke.py::test_run_time_user_errors_exit_2_...
  empty dataset, sequence too long (API)                 test_data.py::test_missing_file_empty_data_and_too_long_...
  group size not dividing a layer, NaN weights (API)     test_prepare.py
  no GGUF equivalent, activation quantization, arch,
  full disk, permission denied, read-only dir (API)      test_export_gguf.py ("errors and safe writes")
  export.py: missing run, bad target, --force            test_export_run.py
Here the rest is driven through the scripts, as a user meets it.
"""
from __future__ import annotations

import ast
import csv
import errno
import gc
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tiny_run import REPO, tiny_recipe, write_corpus

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
TINY = {"kind": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process work; the scripts run with OMP_NUM_THREADS=1


def command(name: str, *args: str, patch: str = "") -> list[str]:
    """``scripts/<name> args`` for a fresh interpreter; ``patch`` is Python run first (a simulated fault)."""
    if not patch:
        return [sys.executable, str(REPO / "scripts" / name), *args]
    return [sys.executable, "-c", f"import runpy, sys\nsys.argv = {[name, *args]!r}\n{patch}\n"
            f"runpy.run_path({str(REPO / 'scripts' / name)!r}, run_name='__main__')"]


def script(name: str, *args: str, cwd: Path, patch: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(command(name, *args, patch=patch), cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def user_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, one ``error:`` message holding every fragment, no traceback."""
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stderr.count("error: ") == 1, out.stderr
    message = out.stderr[out.stderr.index("error: "):]
    for fragment in fragments:
        assert fragment in message, message
    return message


def recipe(tmp: Path, name: str = "run", **sections) -> Path:
    """A very small QAT recipe (1-layer, 32-wide Llama; 8 blocks of 16 tokens, 4 batches an epoch), no eval."""
    corpus = write_corpus(tmp / "small", n_docs=3, lines=5)
    base = dict(model=TINY, data={"paths": [str(corpus / "*.txt")], "val_documents": ["doc2"], "seq_len": 16,
                                  "val_max_blocks": 2},
                train={"max_steps": 6, "batch_size": 2, "num_threads": 1},
                quant={"scheme": "q4_0", "log_every_n_steps": 0}, eval={"enabled": False}, wandb={"enabled": False})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_recipe(tmp, name=name, **base)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ---------------------------------------------------------------------------------------------------
# 1. kill -9 during training, then --resume
# ---------------------------------------------------------------------------------------------------

def losses(run: Path) -> dict[int, str]:
    """step -> train/loss as logged (the CSV holds the float's repr: equal strings are equal floats)."""
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}


def test_kill_9_mid_training_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """Killed at a random point (seeded) of a 14-step QAT run that checkpoints every step, resumed with
    --resume: the rest of the loss curve, the weights, learned scales and zero-points, the frozen flags,
    the activation observers' running min/max, AdamW's moments, the LR schedule and the callback's
    start_step/freeze_step all equal the uninterrupted run's, bitwise. Epochs are 4 steps, so the kill
    lands mid-epoch or on an epoch's end, before or after fake quant starts (3) and observers freeze (8)."""
    path = recipe(tmp_path, train={"max_steps": 14, "warmup_steps": 2, "checkpoint_every_n_steps": 1},
                  quant={"scheme": "q4_1", "observer": "learned", "start_step": 3, "freeze_step": 8,
                         "activations": "int8_asym_tensor", "act_observer": "moving_average"})
    full = script("train.py", str(path), "name=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    rng = random.Random(int(os.environ.get("QAT_KILL_SEED", "1234")))  # another seed, another kill point
    kill_after = rng.randint(2, 12)  # checkpoints written before the kill
    ckpt = tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(command("train.py", str(path), "name=killed"), cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = set()  # each checkpoint is a new file renamed into place: a new (inode, mtime)
    while len(seen) < kill_after and proc.poll() is None:
        try:
            st = os.stat(ckpt)
            seen.add((st.st_ino, st.st_mtime_ns))
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.1))  # anywhere in the next step, checkpoint write included
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    at = load(ckpt)["global_step"]  # whatever the kill interrupted, last.ckpt is whole
    assert 2 <= at < 14

    resumed = script("train.py", str(path), "name=killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt} (step {at} of 14)" in resumed.stdout
    assert leftovers(ckpt.parent) == []  # a temporary the kill left is gone after the next write

    a, b = load(tmp_path / "runs" / "full" / "checkpoints" / "last.ckpt"), load(ckpt)
    assert a["global_step"] == b["global_step"] == 14 and a["epoch"] == b["epoch"]
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same(a[key], b[key], key)
    qat_state = [k for k in a["callbacks"] if k.startswith("QATCallback")]
    assert qat_state and all(a["callbacks"][k] == b["callbacks"][k] for k in qat_state)
    assert any(k.endswith("weight_fake_quant.zero") for k in a["state_dict"])
    assert any(k.endswith("act_fake_quant.min_val") for k in a["state_dict"])
    curve, logged = losses(tmp_path / "runs" / "full"), losses(tmp_path / "runs" / "killed")
    assert set(range(at, 14)) <= set(logged) and {s: curve[s] for s in logged} == logged


class Recorder(L.LightningModule):
    """Records which samples each step trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, _):
        self.seen.append((self.global_step, batch["input_ids"][:, 0].tolist()))
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:.*ended before the epoch ended")  # EpochShuffle resumes mid-epoch
@pytest.mark.parametrize("accumulate,stop", [(1, 2), (1, 5), (1, 7), (2, 3), (2, 4)])
def test_data_order_resumes_mid_epoch_and_at_epoch_ends(tmp_path, accumulate, stop):
    """The training flow's data module under Lightning: stopped after ``stop`` optimizer steps (a
    checkpoint every step), resumed in a fresh Trainer, the rest of the batches are the uninterrupted
    run's. 9 samples in batches of 2: 5 batches an epoch (the last one short), so 5 steps an epoch, or
    3 with gradient accumulation over 2 (Lightning steps at an epoch's end)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from qat.lm.data import TextDataModule
    from qat.recipe import DataConfig

    def data():
        dm = TextDataModule(DataConfig(seq_len=2), tokenizer=None, batch_size=2, seed=5)
        dm.train_set = [{"input_ids": torch.tensor([i, i])} for i in range(9)]  # setup() keeps it
        return dm

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            trainer.should_stop = trainer.global_step >= stop

    def trainer(**kw):
        return L.Trainer(max_steps=12, max_epochs=-1, accumulate_grad_batches=accumulate, accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         **kw)

    full = Recorder()
    trainer(enable_checkpointing=False).fit(full, datamodule=data())
    first = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer(callbacks=[ckpt, Stop()]).fit(first, datamodule=data())
    assert load(tmp_path / "last.ckpt")["global_step"] == stop
    rest = Recorder()
    trainer(enable_checkpointing=False).fit(rest, datamodule=data(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert first.seen + rest.seen == full.seen
    epochs = [sorted(sum((s for _, s in full.seen[i:i + 5]), [])) for i in range(0, len(full.seen) - 4, 5)]
    assert all(e == list(range(9)) for e in epochs)  # every epoch is a permutation of the data


def test_epoch_shuffle_is_the_order_a_seeded_shuffled_dataloader_gives():
    """Runs that never stop see the same data order as before resume support (results stay comparable)."""
    from torch.utils.data import DataLoader

    from qat.lm.data import EpochShuffle
    data = list(range(23))
    old = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
    new = DataLoader(data, batch_size=4, sampler=EpochShuffle(23, 7), generator=torch.Generator())
    for epoch in range(4):
        new.sampler.set_epoch(epoch)
        order = [b.tolist() for b in old]
        assert [b.tolist() for b in new] == order, epoch
        assert list(EpochShuffle(23, 7, epoch=epoch, skip=8)) == sum(order, [])[8:]


def test_epoch_shuffle_shards_across_ranks_like_distributed_sampler():
    """world > 1: each rank every world-th index of the one permutation, padded with its first indices as
    DistributedSampler pads; a rank's skip counts its own samples; world 1 is unchanged."""
    from qat.lm.data import EpochShuffle
    for n, world in ((9, 2), (10, 2), (7, 3), (2, 4)):
        for epoch in range(3):
            perm = list(EpochShuffle(n, 5, epoch=epoch))
            padded = (perm * world)[:-(-n // world) * world]
            shards = [list(EpochShuffle(n, 5, epoch=epoch, rank=r, world=world)) for r in range(world)]
            assert shards == [padded[r::world] for r in range(world)], (n, world, epoch)
            assert all(len(s) == len(EpochShuffle(n, 5, world=world)) == -(-n // world) for s in shards)
            assert sorted(set(sum(shards, []))) == list(range(n))
            assert list(EpochShuffle(n, 5, epoch=epoch, skip=1, rank=world - 1, world=world)) == shards[-1][1:]
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        EpochShuffle(9, 5, rank=2, world=2)


@pytest.mark.timeout(900)
def test_ddp_mid_epoch_resume_is_the_uninterrupted_run(tmp_path):
    """Lightning DDP on 2 CPU processes with the recipe runner's data module (EpochShuffle sharding itself,
    use_distributed_sampler=False): stopped at a step inside an epoch, resumed in fresh processes from that
    step's checkpoint, every rank sees the uninterrupted run's batches and ends in its state, bitwise."""
    worker = Path(__file__).with_name("ddp_data_worker.py")

    def run(out, stop=0, ckpt=None):
        args = [sys.executable, str(worker), str(out), str(stop)] + ([str(ckpt)] if ckpt else [])
        res = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-4000:]
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    full = run(tmp_path / "full")
    first = run(tmp_path / "first", stop=4)  # 5 samples a rank, batches of 2: 3 steps an epoch; 4 is inside epoch 1
    ckpt = next((tmp_path / "first" / "ckpt").glob("*step=4.ckpt"))
    rest = run(tmp_path / "rest", ckpt=ckpt)
    for r in (0, 1):
        assert first[r]["seen"] + rest[r]["seen"] == full[r]["seen"], r
        assert [step for step, _ in rest[r]["seen"]] == list(range(4, 8))
        for k, v in full[r]["state"].items():
            assert torch.equal(rest[r]["state"][k], v), (r, k)
    assert full[0]["seen"] != full[1]["seen"]  # the ranks train on different samples
    for k, v in full[0]["state"].items():
        assert torch.equal(full[1]["state"][k], v), k


def test_resume_refuses_another_recipe_and_a_corrupt_or_pickled_checkpoint(tmp_path):
    """--resume continues only the run that was interrupted, from a checkpoint it can trust."""
    from qat.recipe import dump_config, load_recipe
    path = recipe(tmp_path)
    run = tmp_path / "runs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_recipe(path, ["train.max_steps=4"])))
    user_error(script("train.py", str(path), "--resume", cwd=tmp_path),
               "--resume: the recipe differs from", "in train.max_steps;", "drop --resume to start afresh")

    (run / "config.yaml").write_text(dump_config(load_recipe(path)))
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "global_step": 1, "x": _Payload(marker)}, run / "checkpoints" / "last.ckpt")
    user_error(script("train.py", str(path), "--resume", cwd=tmp_path),
               "holds Python objects other than tensors", "refusing to load it")
    assert not marker.exists()  # a truncated or corrupt one: test_truncated_corrupt_pickled_and_mismatched_...


class _Payload:
    """Unpickling this makes a directory: a stand-in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# ---------------------------------------------------------------------------------------------------
# runs made in-process (no training): what scripts/export.py and scripts/eval.py read
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from qat.lm.model import embedded_tokenizer
    return embedded_tokenizer()


def tiny_model(tok, **kw):
    from qat.lm.model import tiny_llama
    return tiny_llama(tok, **{**TINY["tiny"], **kw})


def fake_run(root: Path, model, tok, quant: dict | None = None, name: str = "run", model_kind: str = "tiny") -> Path:
    """A run directory as scripts/train.py leaves it (config.yaml, model/, checkpoints/last.ckpt), for ``model``
    as it is; ``quant`` as the recipe's (a ptq run needs no quantizer state in the checkpoint)."""
    from qat.lm.model import save_model_config
    from qat.recipe import Recipe, dump_config
    run = root / name
    save_model_config(model, tok, run / "model")
    kind = {"kind": "hf", "path": str(run / "model")} if model_kind == "hf" else {"kind": model_kind}
    config = Recipe(name=name, output_dir=str(root), model=kind, quant=quant, wandb={"enabled": False})
    (run / "config.yaml").write_text(dump_config(config))
    (run / "checkpoints").mkdir()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1}, run / "checkpoints" / "last.ckpt")
    return run


PTQ_Q8 = {"mode": "ptq", "scheme": "q8_0"}


# ---------------------------------------------------------------------------------------------------
# 2. kill -9 during export
# ---------------------------------------------------------------------------------------------------

SLOW_GGUF = """
import time, gguf
_pad = gguf.GGUFWriter.write_padding
def _slow(self, fp, n, align=None):
    _pad(self, fp, n, align)
    fp.flush()
    time.sleep(0.05)
gguf.GGUFWriter.write_padding = _slow
"""


def _kill_mid_export(run: Path, out: Path, cwd: Path, rng: random.Random, *extra: str) -> None:
    """Start scripts/export.py (its GGUF writer slowed down), SIGKILL it part-way through writing the file."""
    proc = subprocess.Popen(command("export.py", str(run), "--to", "gguf", "--out", str(out), *extra, patch=SLOW_GGUF),
                            cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        temps = list(out.parent.glob(f".{out.name}.*.tmp"))
        if temps and temps[0].stat().st_size > 0:  # the header is out, tensors are on their way
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the export finished before it could be killed"


def test_kill_9_mid_export_leaves_nothing_or_the_previous_file(tmp_path, tok):
    """No file at the target after a killed first export; the previous file intact after a killed
    re-export (--force); the killed writers' temporaries gone after the next export."""
    import gguf
    run = fake_run(tmp_path, tiny_model(tok), tok, PTQ_Q8)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.Q8_0.gguf"
    rng = random.Random(99)

    _kill_mid_export(run, out, tmp_path, rng)
    assert not out.exists() and len(leftovers(out_dir)) == 1  # what -9 leaves: a temporary, never the target

    done = script("export.py", str(run), "--to", "gguf", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert leftovers(out_dir) == [] and [p.name for p in out_dir.iterdir()] == [out.name]
    previous = out.read_bytes()
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"

    _kill_mid_export(run, out, tmp_path, rng, "--force")
    assert out.read_bytes() == previous and len(leftovers(out_dir)) == 1
    from qat.export.io import remove_stale_temporaries
    assert len(remove_stale_temporaries(out)) == 1 and leftovers(out_dir) == []  # what the next export does first


def test_stale_temporaries_of_dead_writers_are_removed_and_a_moved_aside_export_restored(tmp_path):
    """What the next write to a path cleans up: temporaries of writers that are gone (file or directory),
    never those of a live writer; a previous directory export that a kill left moved aside goes back."""
    from qat.export.io import remove_stale_temporaries
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = gone.pid, os.getpid()
    out = tmp_path / "int8-w-compressed-tensors"
    (tmp_path / f".{out.name}.{dead}.abc.tmp").mkdir()
    (tmp_path / f".{out.name}.{dead}.def.old" / "x").mkdir(parents=True)  # killed between the two renames
    (tmp_path / f".{out.name}.{dead}.def.old" / "x" / "config.json").write_text("{}")
    (tmp_path / f".{out.name}.{alive}.ghi.tmp").mkdir()
    (tmp_path / f".m.gguf.{dead}.jkl.tmp").write_bytes(b"half")
    (tmp_path / ".m.gguf.notes").write_text("not ours")
    assert len(remove_stale_temporaries(out)) == 2
    assert (out / "config.json").read_text() == "{}"
    assert leftovers(tmp_path) == [f".{out.name}.{alive}.ghi.tmp", f".m.gguf.{dead}.jkl.tmp", ".m.gguf.notes"]
    assert len(remove_stale_temporaries(tmp_path / "m.gguf")) == 1
    assert leftovers(tmp_path) == [f".{out.name}.{alive}.ghi.tmp", ".m.gguf.notes"]


def test_exports_get_the_permissions_of_a_plain_open(tmp_path, tok):
    """Temporaries are private (0600) while written; the finished file is readable as umask allows, so
    llama.cpp or Ollama running as another user can load it."""
    import qat
    from qat.export.run import export_to
    model = tiny_model(tok)
    old = os.umask(0o022)
    try:
        gguf_file = export_to(model, tok, "gguf", tmp_path / "m.gguf", progress=False)
        qat.prepare(model, "int8_w")
        ct = export_to(model, tok, "compressed-tensors", tmp_path / "ct", progress=False)
    finally:
        os.umask(old)
    assert gguf_file.stat().st_mode & 0o777 == 0o644
    assert ct.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in ct.iterdir())


# ---------------------------------------------------------------------------------------------------
# 3. bad input through the scripts: one message naming problem and fix, exit 2, nothing overwritten
# ---------------------------------------------------------------------------------------------------

def test_missing_model_and_data_paths(tmp_path):
    path = recipe(tmp_path)
    user_error(script("train.py", str(path), "model.kind=hf", "model.path=./no/such/model",
                      f"data.paths=[{tmp_path / 'nowhere'}/*.txt]", cwd=tmp_path),
               "2 problems", "model: model directory './no/such/model' not found",
               f"data.paths: no file matches '{tmp_path / 'nowhere'}/*.txt'")


def _previous_run(tmp_path: Path, name: str = "run") -> Path:
    """A finished run of that name, which a failing new run must leave as it was."""
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    (run / "eval.json").write_text("{}\n")
    return run


def test_empty_dataset_fails_before_the_previous_run_is_replaced(tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text(" \n\n")
    (tmp_path / "blank" / "b.txt").write_text("")
    previous = _previous_run(tmp_path)
    user_error(script("train.py", str(recipe(tmp_path)), f"data.paths=[{tmp_path / 'blank'}/*.txt]",
                      "data.val_documents=[b]", cwd=tmp_path), "the dataset is empty")
    assert sorted(p.name for p in previous.iterdir()) == ["config.yaml", "eval.json"]


def test_group_size_not_dividing_a_layer_fails_before_training(tmp_path):
    """int4_w_g64 on a 32-wide model: refused when the run starts, not after the float twin has trained."""
    previous = _previous_run(tmp_path)
    out = script("train.py", str(recipe(tmp_path)), "quant.scheme=int4_w_g64", "eval.enabled=true", cwd=tmp_path)
    user_error(out, "cannot quantize these layers as planned",
               "model.layers.0.self_attn.q_proj (int4_g64): int4_g64 needs a last dimension that is a multiple of "
               "64, got 32", "Fix: give them another scheme in `rules` (None keeps float) or pass skip_incompatible")
    assert "training" not in out.stdout and "float twin" not in out.stdout
    assert sorted(p.name for p in previous.iterdir()) == ["config.yaml", "eval.json"]


def test_nan_and_inf_weights(tmp_path, tok):
    """A model loaded with NaN/Inf weights does not train; a checkpoint holding them does not export. The
    Inf sits in a layer no quantizer checks (the final norm); NaN in a quantized layer: test_prepare.py."""
    model = tiny_model(tok)
    with torch.no_grad():
        model.model.norm.weight[3] = float("inf")
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    previous = _previous_run(tmp_path)
    user_error(script("train.py", str(recipe(tmp_path)), "model.kind=hf", f"model.path={tmp_path / 'hf'}",
                      cwd=tmp_path), "the model's weights hold NaN or Inf values (model.norm.weight)",
               "load an intact copy")
    assert sorted(p.name for p in previous.iterdir()) == ["config.yaml", "eval.json"]

    run = fake_run(tmp_path, model, tok, PTQ_Q8, name="diverged")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    user_error(script("export.py", str(run), "--to", "gguf", "--out", str(out), "--force", cwd=tmp_path),
               "the model's weights hold NaN or Inf values (model.norm.weight)", "export an earlier checkpoint")
    assert out.read_bytes() == b"previous"


def test_export_scheme_without_gguf_equivalent_and_unsupported_architecture(tmp_path, tok):
    from transformers import GPT2Config, GPT2LMHeadModel
    run = fake_run(tmp_path, tiny_model(tok), tok, {"mode": "ptq", "scheme": "int8_w"})
    user_error(script("export.py", str(run), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), cwd=tmp_path),
               "these layers have no GGUF equivalent", "int8_channel", "--to compressed-tensors")

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    run = fake_run(tmp_path, gpt2, tok, name="gpt2", model_kind="hf")
    user_error(script("export.py", str(run), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), cwd=tmp_path),
               "GGUF export does not support GPT2LMHeadModel", "supported: LlamaForCausalLM")
    assert not (tmp_path / "m.gguf").exists()


def test_truncated_corrupt_pickled_and_mismatched_checkpoints(tmp_path, tok):
    """export.py and eval.py on a damaged or hostile last.ckpt: refused with the reason, nothing executed."""
    run = fake_run(tmp_path, tiny_model(tok), tok, PTQ_Q8)
    ckpt = run / "checkpoints" / "last.ckpt"
    good = ckpt.read_bytes()
    export = ("export.py", str(run), "--to", "gguf", "--out", str(tmp_path / "m.gguf"))

    ckpt.write_bytes(good[: len(good) // 2])
    user_error(script("eval.py", str(run), cwd=tmp_path),
               f"{ckpt} is not a complete PyTorch checkpoint (truncated or corrupt)")
    from qat.cli import UserError
    from qat.lm.run import read_checkpoint
    ckpt.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(UserError, match="not a complete PyTorch checkpoint"):
        read_checkpoint(ckpt)

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, ckpt)
    user_error(script(*export, cwd=tmp_path), "holds Python objects other than tensors", "refusing to load it")
    assert not marker.exists()

    other = tiny_model(tok, hidden_size=64, intermediate_size=128)  # model/ says 32 wide
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    user_error(script(*export, cwd=tmp_path), f"{ckpt} does not fit the model and quantization in {run}",
               "size mismatch", "were they edited after training?")
    assert not (tmp_path / "m.gguf").exists()


def test_corrupt_gguf_model(tmp_path, tok):
    """model.kind=gguf pointing at a GGUF cut short (through train.py), or at a file that is not GGUF."""
    from qat.export.gguf import export_gguf
    good = export_gguf(tiny_model(tok), tok, tmp_path / "good.gguf", progress=False).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 3])
    out = script("train.py", str(recipe(tmp_path)), "model.kind=gguf", f"model.path={tmp_path / 'cut.gguf'}",
                 cwd=tmp_path)
    user_error(out, "cannot load model.path=", "cut.gguf", "the file is truncated or corrupt")

    from qat.cli import UserError
    from qat.lm.model import load_model
    from qat.recipe import ModelConfig
    for keep in (0.001, 0.5, 0.999):  # cut in the header, in the tensor data, in the last tensor
        (tmp_path / "cut.gguf").write_bytes(good[: int(len(good) * keep)])
        with pytest.raises(UserError, match="cannot load model.path=.*(truncated or corrupt|file complete)"):
            load_model(ModelConfig(kind="gguf", path=str(tmp_path / "cut.gguf")))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="junk.gguf.*not a GGUF file"):
        load_model(ModelConfig(kind="gguf", path=str(tmp_path / "junk.gguf")))


def test_unwritable_output_locations(tmp_path, tok):
    """Root writes anywhere, so the unwritable place is a path through a regular file."""
    (tmp_path / "file").write_text("a file, not a directory\n")
    user_error(script("train.py", str(recipe(tmp_path)), f"output_dir={tmp_path / 'file' / 'runs'}", cwd=tmp_path),
               f"cannot create the run directory {tmp_path / 'file' / 'runs' / 'run'}: Not a directory",
               "pick another output_dir=")
    run = fake_run(tmp_path, tiny_model(tok), tok, PTQ_Q8)
    user_error(script("export.py", str(run), "--to", "gguf", "--out", str(tmp_path / "file" / "m.gguf"), cwd=tmp_path),
               f"output directory {tmp_path / 'file'} is not a directory; create it, or write elsewhere")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_directory(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        user_error(script("train.py", str(recipe(tmp_path)), f"output_dir={tmp_path / 'ro'}", cwd=tmp_path),
                   f"cannot create the run directory {tmp_path / 'ro' / 'run'}: Permission denied")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_a_full_disk_anywhere_is_a_user_error_and_other_os_errors_stay_bugs(capsys):
    """Any write the scripts make (config.yaml, logs, exports) that finds the disk full ends in one message."""
    from qat.cli import run_main

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/config.yaml")

    with pytest.raises(SystemExit) as exit_:
        run_main(full, [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: no space left on the device while writing /runs/x/config.yaml: free "
                                       "some space, or write elsewhere (output_dir=, --out)\n")

    def bug(argv):
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        run_main(bug, [])


def test_full_disk_during_export_keeps_the_previous_file(tmp_path, tok):
    run = fake_run(tmp_path, tiny_model(tok), tok, PTQ_Q8)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous export")
    disk_full = """
import errno, os, gguf
def _full(self, *a, **k):
    self.fout[0].write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
gguf.GGUFWriter.write_tensors_to_file = _full
"""
    user_error(script("export.py", str(run), "--to", "gguf", "--out", str(out), "--force", cwd=tmp_path,
                      patch=disk_full), f"no space left on the device while writing {out}; nothing was written")
    assert out.read_bytes() == b"previous export" and leftovers(out.parent) == []


def test_full_disk_during_training_keeps_the_last_checkpoint(tmp_path):
    """The disk fills while the second checkpoint (step 8 of 10) is written: exit 2, the step-4 checkpoint
    is intact, no temporary is left, and --resume finishes the run (saving step 10, not a multiple of 4)."""
    path = recipe(tmp_path, train={"max_steps": 10, "checkpoint_every_n_steps": 4})
    disk_full = """
import builtins, errno, os
import qat.lm.run as run
_writes = []
def _open(file, mode="r", *a, **k):
    f = builtins.open(file, mode, *a, **k)
    if "w" in mode and ".last.ckpt." in str(file):
        _writes.append(file)
        if len(_writes) == 2:
            f.write(b"partial")
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return f
run.open = _open
"""
    ckpt = tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt"
    user_error(script("train.py", str(path), cwd=tmp_path, patch=disk_full),
               f"no space left on the device while writing {ckpt}")
    assert load(ckpt)["global_step"] == 4 and leftovers(ckpt.parent) == []
    resumed = script("train.py", str(path), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 4 of 10)" in resumed.stdout and load(ckpt)["global_step"] == 10


# ---------------------------------------------------------------------------------------------------
# 4. security
# ---------------------------------------------------------------------------------------------------

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def test_package_reads_and_writes_only_safe_formats():
    """Over qat/ and scripts/: torch.load only with weights_only=True, YAML only through the safe loader,
    no shell=True / os.system, trust_remote_code never switched on in code (only a recipe sets it), and
    the exporters never pickle (torch.save, pickle, safe_serialization=False)."""
    files = sorted((REPO / "qat").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    problems = []
    for path in files:
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(), str(rel))
        for owner, name, kw, node in _calls(tree):
            where = f"{rel}:{node.lineno}"
            if (owner, name) == ("torch", "load") and not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            if isinstance(kw.get("shell"), ast.Constant) and kw["shell"].value is True:
                problems.append(f"{where}: shell=True")
            if (owner, name) in (("os", "system"), ("os", "popen")) or name in ("eval", "exec") and not owner:
                problems.append(f"{where}: {owner + '.' if owner else ''}{name}")
            if isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is True:
                problems.append(f"{where}: trust_remote_code=True in code")
            if "export" in rel.parts and ((owner, name) == ("torch", "save") or owner == "pickle"
                                          or isinstance(kw.get("safe_serialization"), ast.Constant)
                                          and kw["safe_serialization"].value is False):
                problems.append(f"{where}: pickled export ({owner}.{name})")
        if "export" in rel.parts:
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                        problems.append(f"{rel}:{node.lineno}: imports a pickler")
    assert problems == []
    from qat.recipe import ModelConfig
    assert ModelConfig().trust_remote_code is False


def test_exports_are_only_gguf_and_safetensors(tmp_path, tok):
    """Every exported file is GGUF, safetensors, or text (JSON, tokenizer files): nothing pickled."""
    import qat
    from qat.export.run import export_to
    model = tiny_model(tok, hidden_size=64, intermediate_size=128)
    qat.prepare(model, "int8_w")
    written = [export_to(model, tok, "compressed-tensors", tmp_path / "ct", progress=False),
               export_to(model, tok, "torchao", tmp_path / "ao")]
    gguf_model = tiny_model(tok)
    qat.prepare(gguf_model, "q8_0")
    written.append(export_to(gguf_model, tok, "gguf", tmp_path / "m.gguf", progress=False))
    files = [p for w in written for p in ([w] if w.is_file() else sorted(w.rglob("*"))) if p.is_file()]
    kinds = {}
    for p in files:
        head = p.read_bytes()[:16]
        if head.startswith(b"GGUF"):
            kinds[p.name] = "gguf"
        elif p.suffix == ".safetensors":
            n = int.from_bytes(head[:8], "little")
            assert head[8:9] == b"{" and 0 < n < p.stat().st_size, p
            kinds[p.name] = "safetensors"
        else:
            assert not head.startswith((b"PK\x03\x04", b"\x80")), f"{p} looks pickled"
            p.read_text(encoding="utf-8")  # text, not binary
            kinds[p.name] = "text"
        assert p.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt"), p
    assert sorted(set(kinds.values())) == ["gguf", "safetensors", "text"], kinds


# ---------------------------------------------------------------------------------------------------
# 5. long runs
# ---------------------------------------------------------------------------------------------------

def test_thousand_qat_steps_flat_memory_and_frozen_observers_stay_frozen():
    """1,000 steps of a plain PyTorch loop (AdamW with weight decay) on two prepared tiny Llamas, one
    with learned (LSQ) q4_1 scales and zero-points, one with mse-observed q4_1 weights and moving-average
    int8 activations; observers frozen at step 200. Resident memory after warm-up stays within 10%, and
    every quantizer's state at step 1,000 is bitwise its state at step 200 while the weights moved on."""
    psutil = pytest.importorskip("psutil")
    import qat
    from conftest import tiny_llama
    models = []
    for observer in ("learned", "mse"):
        model = tiny_llama(vocab=128, hidden=32, inter=64, layers=1, heads=2, kv_heads=1).train()
        qat.prepare(model, "q4_1", observer=observer, activations="int8_asym_tensor", act_observer="moving_average")
        models.append((model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)))
    data = torch.randint(0, 128, (64, 17), generator=torch.Generator().manual_seed(0))
    process = psutil.Process()

    def state(quantizers: bool):
        return [{k: v.detach().clone() for k, v in m.state_dict().items() if ("_fake_quant." in k) == quantizers}
                for m, _ in models]

    rss, frozen, weights = {}, None, None
    for step in range(1000):
        if step == 200:
            for model, _ in models:
                qat.freeze_observers(model, True)
            frozen, weights = state(True), state(False)
        batch = data[torch.arange(step * 4, step * 4 + 4) % 64]
        for model, opt in models:
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step in (199, 999):
            gc.collect()
            rss[step] = process.memory_info().rss
    assert torch.isfinite(loss)
    for before, after, moved_before, moved_after in zip(frozen, state(True), weights, state(False)):
        assert set(after) == set(before) and any(k.endswith(".scale") for k in after)
        assert any(k.endswith("act_fake_quant.min_val") for k in after)
        for k in after:
            assert torch.equal(after[k], before[k]), k
        assert not torch.equal(moved_after["model.layers.0.mlp.up_proj.weight"],
                               moved_before["model.layers.0.mlp.up_proj.weight"])
    assert abs(rss[999] - rss[199]) <= 0.10 * rss[199], rss
