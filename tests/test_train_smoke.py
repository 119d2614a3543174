"""scripts/train.py end to end on a tiny random Llama: 2 steps of QAT plus the float twin produce the
run directory the rest of the project relies on; scripts/eval.py reproduces its numbers; a mistake
found only at run time still ends in one message and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny_run import REPO, tiny_recipe

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_two_step_run_writes_config_checkpoints_and_eval(tmp_path):
    recipe = tiny_recipe(tmp_path, export={"gguf": ["q4_0"]})
    out = script("train.py", str(recipe), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["quant"]["scheme"] == "q4_0" and config["train"]["max_steps"] == 2
    for ckpt in (run / "checkpoints" / "last.ckpt", run / "float" / "checkpoints" / "last.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] == 2
    qat_keys = [k for k in torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                if "weight_fake_quant" in k]
    assert qat_keys, "the QAT checkpoint holds the quantizers' state"
    report = json.loads((run / "eval.json").read_text())
    assert set(report["results"]) == {"float", "ptq", "qat"} and report["scheme"] == "q4_0"
    assert "gap_recovered" in report and report["data"]["documents"] == ["doc5"]
    assert all(r["tokens"] == 8 * 31 for r in report["results"].values())
    assert (run / "exports" / "model.Q4_0.gguf").is_file()
    assert "PTQ q4_0 (round to nearest)" in out.stdout and "outputs in" in out.stdout

    again = script("eval.py", str(run), "--out", str(tmp_path / "again.json"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "again.json").read_text())
    for kind in ("float", "ptq", "qat"):
        assert rerun["results"][kind]["ppl"] == pytest.approx(report["results"][kind]["ppl"], rel=1e-6)


def test_ptq_recipe_has_float_and_ptq_rows_only(tmp_path):
    recipe = tiny_recipe(tmp_path, name="ptq", quant={"scheme": "q8_0", "mode": "ptq"}, wandb={"enabled": False})
    out = script("train.py", str(recipe), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "ptq" / "eval.json").read_text())
    assert set(report["results"]) == {"float", "ptq"} and report["gap_recovered"] is None
    assert not (tmp_path / "runs" / "ptq" / "float").exists()


def test_ptq_with_moving_average_activations_is_calibrated_not_nan(tmp_path):
    """PTQ rows with moving-average activation ranges are calibrated on training batches (were NaN)."""
    recipe = tiny_recipe(tmp_path, name="ptqma", quant={"scheme": "int8da_int4w", "mode": "ptq",
                                                        "act_observer": "moving_average"}, wandb={"enabled": False})
    out = script("train.py", str(recipe), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "ptqma" / "eval.json").read_text())
    ppl = report["results"]["ptq"]["ppl"]
    assert ppl == ppl and ppl < float("inf") and ppl >= report["results"]["float"]["ppl"] * 0.9


def test_run_time_user_errors_exit_2_without_traceback(tmp_path):
    recipe = tiny_recipe(tmp_path, data={"val_documents": ["doc55"]}, wandb={"enabled": False})
    out = script("train.py", str(recipe), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: data.val_documents: 'doc55' matches no document (did you mean 'doc5'?)" in out.stderr
    out = script("train.py", str(recipe), "data.val_documents=[doc5]", "data.seq_len=512", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.seq_len: 512 is beyond the model's context (model.tiny.max_position_embeddings=256)" in out.stderr
    out = script("eval.py", str(tmp_path / "runs" / "nothing"), cwd=tmp_path)
    assert out.returncode == 2 and "is not a run directory" in out.stderr


@pytest.mark.slow
def test_smollm2_on_shakespeare_short_run(tmp_path):
    """The quickstart recipe, cut down to 2 steps on short blocks: the real model and corpus end to end."""
    out = script("train.py", str(REPO / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path / 'runs'}",
                 "train.max_steps=2", "train.warmup_steps=0", "data.seq_len=64", "data.val_max_blocks=4",
                 "train.batch_size=2", "eval.batch_size=4", "export.gguf=[]", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "quickstart" / "eval.json").read_text())
    ppl = {k: v["ppl"] for k, v in report["results"].items()}
    assert set(ppl) == {"float", "ptq", "qat"}
    assert 5 < ppl["float"] < 500 and ppl["ptq"] > ppl["float"]  # a real LM on real text, hurt by rounding
    assert report["data"]["documents"] == ["hamlet", "macbeth", "othello", "tempest"]
