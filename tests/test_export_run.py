"""The export step of a run (``qat.export.run``) and scripts/export.py's handling of bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qat
from qat.export import ExportError
from qat.export.run import default_name, export_run, export_to, parse_target
from tiny_lm import bpe_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def test_parse_target():
    assert parse_target("gguf") == ("gguf", None)
    assert parse_target("GGUF:Q4_0") == ("gguf", "q4_0")
    assert parse_target("compressed-tensors") == ("compressed-tensors", None)
    with pytest.raises(ExportError, match="unknown export target"):
        parse_target("onnx")
    with pytest.raises(ExportError, match="takes no type"):
        parse_target("torchao:int4")


def test_gguf_type_must_be_the_trained_one(tok, tmp_path):
    m = tiny_llama(len(tok))
    qat.prepare(m, "q4_0")
    with pytest.raises(ExportError, match="would re-quantize"):
        export_to(m, tok, "gguf:q8_0", tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []
    path = export_to(m, tok, "gguf:bf16", tmp_path / "m.gguf", progress=False)  # float layers as bf16
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "BF16"


def test_export_run_writes_named_files(tok, tmp_path):
    m = tiny_llama(len(tok), hidden=128)
    qat.prepare(m, "q8_0")
    written = export_run(m, tok, {"gguf": ["q8_0", "f32"], "float_type": "f16"}, tmp_path / "exports",
                         progress=False)
    assert [p.name for p in written] == ["model.Q8_0.gguf", "model.Q8_0-F32.gguf"]
    assert default_name(m, "compressed-tensors") == "q8-0-compressed-tensors"
    with pytest.raises(ExportError, match="unknown keys"):
        export_run(m, tok, {"gguf": ["q8_0"], "onnx": True}, tmp_path / "exports")


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/run", "--to", "gguf"], "does not exist"),
    (["{tmp}", "--to", "onnx"], "unknown export target"),
    (["{tmp}", "--to", "gguf"], "no checkpoint at"),
])
def test_script_bad_input_is_one_message_and_exit_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.llama
def test_script_exports_a_trained_run_bitwise(tmp_path):
    """scripts/train.py (2 QAT steps) then scripts/export.py: llama.cpp's dequantization of the file equals
    the effective weights of the run as load_run restores it, and --force is needed to overwrite."""
    import os

    import numpy as np

    from qat.export.gguf import rope_unpermute
    from qat.lm.run import load_run
    from qat.llamacpp import dequantize_gguf
    from tiny_run import tiny_recipe
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    recipe = tiny_recipe(tmp_path, wandb={"enabled": False})
    train = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    out = tmp_path / "model.gguf"
    cmd = [sys.executable, str(ROOT / "scripts" / "export.py"), str(run), "--to", "gguf:q4_0", "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr

    module, _, _ = load_run(run)
    model = module.model
    sd = qat.effective_state_dict(model)
    quantized = {n for n, _ in qat.fake_quant_modules(model)}
    deq = dequantize_gguf(out)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    cfg = model.config
    for hf, w in sd.items():
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if hf == "lm_head.weight" and g not in deq:
            continue  # tied: llama.cpp reads the head from token_embd
        got = deq[g]
        if g.endswith("attn_q.weight"):
            got = rope_unpermute(got, cfg.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            got = rope_unpermute(got, cfg.num_key_value_heads)
        float_2d = w.dim() == 2 and hf.rpartition(".")[0] not in quantized
        want = w.to(torch.float16).float() if float_2d else w.float()  # float layers are written as f16
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(got)), want), hf
