"""QAT under Lightning DDP (2 CPU processes, gloo): swapped before wrapping, learned scales and observer
state identical on every rank, checkpoint save and resume."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(out: Path, epochs: int, ckpt=None):
    args = [sys.executable, str(WORKER), str(out), str(epochs)] + ([str(ckpt)] if ckpt else [])
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                  "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.timeout(900)
def test_ddp_state_identical_on_ranks_and_resume(tmp_path):
    r0, r1 = run(tmp_path / "a", 2)
    assert any(k.endswith("weight_fake_quant.scale") for k in r0)
    assert any(k.endswith("weight_fake_quant.zero") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert bool(r0["model.model.layers.0.mlp.up_proj.weight_fake_quant.frozen"])
    # resume from the end-of-epoch-0 checkpoint (step 4) to step 8: the same end state as the uninterrupted run
    ckpts = sorted((tmp_path / "a" / "ckpt").glob("*step=4*.ckpt"))
    assert ckpts, list((tmp_path / "a" / "ckpt").iterdir())
    s0, s1 = run(tmp_path / "b", 2, ckpts[0])
    for k in r0:
        assert torch.equal(s0[k], r0[k]), k
        assert torch.equal(s1[k], r0[k]), k
