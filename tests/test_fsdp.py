"""QAT under Lightning FSDP on 2 GPUs (Lightning's FSDP needs CUDA; skipped with fewer than 2 GPUs):
layers swapped before wrapping, observer state identical on both ranks, the gathered state exports
(a fresh model loaded from it gives the effective weights export writes), and resume from a checkpoint
ends in the same state as the uninterrupted run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("fsdp_worker.py")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def run(out: Path, epochs: int, ckpt=None):
    args = [sys.executable, str(WORKER), str(out), str(epochs), "cuda"] + ([str(ckpt)] if ckpt else [])
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as e:  # show where it hung
        pytest.fail(f"FSDP worker timed out\n{(e.stderr or b'')[-4000:]!r}")
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(out / "rank0.pt", weights_only=True)


def test_fsdp_swap_state_export_and_resume(tmp_path):
    full = run(tmp_path / "a", 2)
    assert any(k.endswith("weight_fake_quant.scale") for k in full)
    assert bool(full["model.model.layers.0.mlp.up_proj.weight_fake_quant.frozen"])
    b0, b1 = (torch.load(tmp_path / "a" / f"buffers{r}.pt", weights_only=True) for r in (0, 1))
    assert b0.keys() == b1.keys() and all(torch.equal(b0[k], b1[k]) for k in b0)
    eff = torch.load(tmp_path / "a" / "effective.pt", weights_only=True)
    # export from the sharded run: the codes written for every layer give back its effective weight
    exported = torch.load(tmp_path / "a" / "exported.pt", weights_only=True)
    assert len(exported) == 14
    for name, w in exported.items():
        assert torch.equal(w, eff[f"{name}.weight"].float()), name
    ckpts = sorted((tmp_path / "a" / "ckpt").glob("*step=4*.ckpt"))
    assert ckpts, list((tmp_path / "a" / "ckpt").iterdir())
    resumed = run(tmp_path / "b", 2, ckpts[0])
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
