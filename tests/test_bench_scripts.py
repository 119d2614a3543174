"""The quality benchmarks' plumbing (bench/quality.py, bench/qlora_quality.py): variant syntax, result rows
merged across processes, and llama.cpp's PTQ giving the per-tensor types of qat's export. The runs
themselves need SmolLM2 and minutes; these pieces do not."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RowLog, read_rows  # noqa: E402
from bench.quality import KEEP_FLOAT, add_gap_recovered, merge, parse_variants, table  # noqa: E402


def test_parse_variants_options_and_defaults():
    vs = parse_variants("float,qat:dynamic,qat:learned@lr=5e-5,qat:mse@lr=4e-5,start=100,ptq", lr=2e-5, start=7)
    assert [(v.label, v.kind, v.observer, v.lr, v.start) for v in vs] == [
        ("float", "float", None, 2e-5, 7),
        ("qat:dynamic", "qat", "dynamic", 2e-5, 7),
        ("qat:learned@lr=5e-5", "qat", "learned", 5e-5, 7),
        ("qat:mse@lr=4e-5,start=100", "qat", "mse", 4e-5, 100),
        ("ptq", "ptq", None, 2e-5, 7),
    ]
    assert [v.kind for v in parse_variants("qlora,qat:dynamic", 1e-4, 0, plain=("qlora",))] == ["qlora", "qat"]


@pytest.mark.parametrize("bad", ["qat:nope", "qat:mse@x=1", "qat:mse@lr=abc", "floatt", "float@lr=1", "start=3",
                                 "qat:dynamic,qat:dynamic"])
def test_parse_variants_rejects(bad):
    with pytest.raises(SystemExit):
        parse_variants(bad, 1e-5, 0)


def _rows():
    return [dict(model="float", scheme=None, kind="float", ppl_torch=10.0, ppl_llamacpp=10.0),
            dict(model="ptq-llamacpp", scheme="q4_0", kind="ptq", ppl_torch=14.0, ppl_llamacpp=14.0),
            dict(model="ptq-ours", scheme="q4_0", kind="ptq", ppl_torch=14.2, ppl_llamacpp=14.4),
            dict(model="qat:dynamic", scheme="q4_0", kind="qat", ppl_torch=11.0, ppl_llamacpp=12.0),
            dict(model="qat:dynamic", scheme="q4_k_m", kind="qat", ppl_torch=11.0, ppl_llamacpp=11.0),
            dict(model="ptq-ours", scheme="q4_k_m", kind="ptq", ppl_torch=12.0, ppl_llamacpp=12.0),
            dict(model="qat:learned", scheme="q4_k_m", error="QuantError('...')")]


def test_gap_recovered_against_llamacpp_ptq_per_scheme():
    rows = _rows()
    add_gap_recovered(rows)
    by = {(r["model"], r["scheme"]): r for r in rows}
    assert by["qat:dynamic", "q4_0"]["gap_recovered_torch"] == pytest.approx(0.75)
    assert by["qat:dynamic", "q4_0"]["gap_recovered_llamacpp"] == pytest.approx(0.5)
    assert by["ptq-ours", "q4_0"]["gap_recovered_llamacpp"] == pytest.approx(-0.1)
    assert by["qat:dynamic", "q4_k_m"]["gap_recovered_llamacpp"] == pytest.approx(0.5)  # ptq-ours: no llama.cpp row
    assert math.isnan(by["float", None]["gap_recovered_torch"])
    text = table(rows)
    assert "75.0%" in text and "error: QuantError" in text


def test_rows_merge_across_processes_and_killed_runs(tmp_path, capsys):
    rows = _rows()
    a = RowLog(tmp_path / "a.json")  # a finished run: .json written at the end
    for r in rows[:3]:
        a.add(dict(r))
    (tmp_path / "a.json").write_text(json.dumps(dict(meta={"run": "a"}, rows=a.rows)))
    b = RowLog(tmp_path / "b.json")  # killed: only b.jsonl
    for r in rows[3:]:
        b.add(dict(r))
    b.add(dict(rows[3], ppl_llamacpp=11.0))  # a rerun's row replaces the earlier one
    got, metas = read_rows([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "missing.json"])
    assert len(got) == 7 and metas == [{"run": "a"}]
    merge([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "all.json")
    out = json.loads((tmp_path / "all.json").read_text())
    by = {(r["model"], r["scheme"]): r for r in out["rows"]}
    assert by["qat:dynamic", "q4_0"]["gap_recovered_llamacpp"] == pytest.approx(0.75)
    assert "wrote" in capsys.readouterr().out


def test_qlora_comparisons(tmp_path):
    from bench.qlora_quality import add_comparisons, order, table
    rows = [dict(model="b:qat:dynamic", scheme="q4_0", kind="qat", ppl_torch=11.0, ppl_llamacpp=12.0),
            dict(model="a2:nf4-merge>llama.cpp", scheme="q4_0", kind="ptq", ppl_torch=20.0, ppl_llamacpp=21.0),
            dict(model="a:fp-merge>llama.cpp", scheme="q4_0", kind="ptq", ppl_torch=14.0, ppl_llamacpp=14.0),
            dict(model="ref:fp+lora", scheme=None, kind="ref", ppl_torch=9.0, ppl_llamacpp=9.0),
            dict(model="ref:nf4+lora", scheme=None, kind="ref", ppl_torch=10.0, ppl_llamacpp=10.0)]
    add_comparisons(rows)
    assert rows[0]["vs_a_llamacpp"] == pytest.approx(12 / 14 - 1)
    assert rows[2]["vs_a_torch"] == pytest.approx(0.0)
    assert [r["model"][:3] for r in order(rows)] == ["ref", "ref", "a:f", "a2:", "b:q"]
    assert "-14.3%" in table(rows)


@pytest.mark.llama
@pytest.mark.parametrize("scheme", ["q4_0", "q4_k_m"])
def test_llama_quantize_matches_the_qat_export(tmp_path, scheme):
    """llama.cpp's PTQ of the F16 file holds the tensor types of qat's export (embedding F16); for Q4_0 its
    codes are qat's encoder's on the F16-rounded weights, byte for byte."""
    pytest.importorskip("llama_cpp")
    import torch

    import qat
    from bench.common import gguf_tensor_types, identical_tensors, llama_ftype, llama_quantize
    from qat.export.gguf import export_gguf
    from qat.mixes import FILE_TYPES
    from tiny_lm import bpe_tokenizer, tiny_llama

    assert llama_ftype(scheme) == FILE_TYPES[scheme]
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), hidden=256, heads=4, kv_heads=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.half().float())
    f16 = export_gguf(model, tok, tmp_path / "f16.gguf", float_type="f16", progress=False)
    theirs = llama_quantize(f16, tmp_path / "theirs.gguf", scheme, threads=1)
    qat.prepare(model, scheme, rules=KEEP_FLOAT)
    ours = export_gguf(model, tok, tmp_path / "ours.gguf", float_type="f16", progress=False)
    assert gguf_tensor_types(theirs) == gguf_tensor_types(ours)
    assert gguf_tensor_types(ours)["token_embd.weight"] == "F16"
    same, n = identical_tensors(ours, theirs)
    if scheme == "q4_0":
        assert same == n


def test_window_nll_is_perplexity_from_logits():
    import numpy as np

    from bench.quality import window_nll
    from qat.llamacpp import perplexity_from_logits
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 300)).astype(np.float32) * 4
    win = rng.integers(0, 300, 50).tolist()
    assert math.exp(window_nll(logits, win) / 49) == pytest.approx(perplexity_from_logits(logits, win, 50), rel=1e-12)


@pytest.mark.parametrize("scheme,observer", [("q4_0", "dynamic"), ("q4_0", "learned"), ("q4_k_m", "dynamic")])
def test_materialize_keeps_the_forward(scheme, observer):
    """Baking the effective weights in (for fast evaluation) gives the fake-quant forward's logits."""
    import torch

    import qat
    from bench.quality import materialize
    from tiny_lm import tiny_llama

    model = tiny_llama(384, hidden=256, heads=4, kv_heads=2)
    qat.prepare(model, scheme, rules=KEEP_FLOAT, observer=observer)
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        after = materialize(model, "cpu")(ids).logits
    assert not any(m.enabled for m in model.modules() if isinstance(m, qat.observers.WeightQuantizer))
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_memory_breakdown_counts_what_fake_quant_keeps(monkeypatch):
    """bench/memory.py on the tiny config, CPU: same parameters, gradients and AdamW state for every variant;
    bf16 saves no weight-shaped tensor for the backward, per-layer fake quant saves at least every quantized
    Linear's bf16 ``w_hat`` and bool clip mask (3 bytes per weight), the recompute path none, and the step
    cache its ``w_hat`` tensors (2 bytes per weight) and no mask."""
    from bench.memory import measure, table
    from bench.speed import SWITCHES, build
    from qat.modules import FakeQuantLinear

    for key, _ in SWITCHES.values():  # measure() sets its variant's switches; monkeypatch restores them
        monkeypatch.setenv(key, "")  # recorded, so the teardown restores it (a delenv of an unset key is not)
        monkeypatch.delenv(key)
    rows = {v: measure("tiny", v, 3, 50, "cpu") for v in ("bf16", "qat:q4_0", "qat:q4_0+recompute",
                                                          "qat:q4_0+step-cache")}
    n = sum(m.weight.numel() for m in build("tiny", "qat:q4_0", "cpu").modules() if type(m) is FakeQuantLinear)
    assert n > 0
    base = rows["bf16"]
    assert base["params"] == base["grads"] > 0 and base["optimizer"] == 2 * base["params"]
    for r in rows.values():
        assert (r["params"], r["grads"], r["optimizer"]) == (base["params"], base["grads"], base["optimizer"])
    assert base["saved_weight_shaped"] == 0
    assert rows["qat:q4_0"]["saved_weight_shaped"] >= n * (2 + 1)
    assert rows["qat:q4_0"]["saved"] - base["saved"] >= n * (2 + 1)
    assert rows["qat:q4_0+recompute"]["saved_weight_shaped"] == 0
    # the step cache holds every quantized Linear's bf16 w_hat for the whole step (the matmul saves that very
    # tensor), and no clip mask
    cached = rows["qat:q4_0+step-cache"]
    assert cached["cache"] == 2 * n and cached["saved_weight_shaped"] == 2 * n
    assert base["cache"] == rows["qat:q4_0"]["cache"] == 0
    assert rows["qat:q4_0"]["buffers"] > base["buffers"]  # the quantizers' scales
    text = table(list(rows.values()))
    assert "qat:q4_0+recompute" in text and "peak x bf16" in text


def test_optimizer_grads_plumbing(monkeypatch):
    """bench/optimizer_grads.py on the tiny config, CPU, eager: the step cache's variant moved the layers'
    gradients to the weights (the flush ran) and the bf16 one has as many; every gradient is laid out as the
    optimizer expects; both timings are there. (Its figures need a GPU.)"""
    from bench.optimizer_grads import measure
    from bench.speed import SWITCHES

    for key, _ in SWITCHES.values():  # measure() sets its variant's switches; monkeypatch restores them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    rows = [measure("tiny", v, 2, 32, 2, device="cpu", compiled=False)
            for v in ("bf16", "qat:q4_0+step-cache", "bf16+pad=0.001")]
    assert rows[0]["grads"] == rows[1]["grads"] == rows[2]["grads"] > 0
    assert [r["variant"] for r in rows] == ["bf16", "qat:q4_0+step-cache", "bf16+pad=0.001"]
    for r in rows:
        assert r["dtypes"] == ["torch.bfloat16"]  # build() makes pure bf16 weights, as the issue asks
        assert r["non_contiguous"] == r["misaligned_16"] == r["storage_offset"] == r["shared_storage"] == 0
        assert r["step_ms"] > 0 and r["step_ms_cloned_grads"] > 0 and r["step_ms_fresh_all"] > 0
        assert isinstance(r["zero_second_moments"], int)


def test_optimizer_grads_pad_suffix():
    from bench.optimizer_grads import split_pad

    assert split_pad("bf16") == ("bf16", 0.0)
    assert split_pad("qat:q4_0+step-cache+pad=0.75") == ("qat:q4_0+step-cache", 0.75)
    with pytest.raises(SystemExit, match=r"bad \+pad= suffix in 'bf16\+pad=x'"):
        split_pad("bf16+pad=x")


def test_speed_pipelined_plumbing(monkeypatch):
    """bench/speed.py's ``--pipelined`` on the tiny config, CPU, eager: each row gets ``ms_pipelined`` (steps
    queued back to back, one sync; the median of ``--pipelined-rounds`` rounds) beside the per-step timing,
    for bf16 and the step cache's variant; without the flag, no such field. (Its figures need a GPU.)"""
    import argparse

    from bench.speed import SWITCHES, run_variant

    for key, _ in SWITCHES.values():  # run_variant() sets its variant's switches; monkeypatch restores them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    args = argparse.Namespace(model="tiny", batch=2, seq=32, warmup=1, steps=2, pipelined=True, pipelined_rounds=3)
    rows = [run_variant(args, v, compiled=False) for v in ("bf16", "qat:q4_0+step-cache")]
    for r in rows:
        assert r["ms_pipelined"] > 0 and r["ms_per_step"] > 0 and r["device"] == "cpu"
        assert len(r["ms_pipelined_rounds"]) == 3 and r["ms_pipelined"] == sorted(r["ms_pipelined_rounds"])[1]
    args.pipelined = False
    assert "ms_pipelined" not in run_variant(args, "bf16", compiled=False)


def test_plot_speed_pairs_sync_and_pipelined(tmp_path):
    """bench/plot_speed.py's pairs: each kept row against the bf16 row just before it (same model, mode, batch,
    seq and card), and, where both rows carry ``ms_pipelined``, a second pair by it under the " [no sync]"
    name; rows off the issue's settings, other variants and rows before any bf16 row are left out."""
    from bench.plot_speed import PIPELINED, pairs

    def row(variant, ms, pipe=None, batch=4, dev="NVIDIA H200"):
        r = dict(model="llama1b", variant=variant, compiled=True, batch=batch, seq=2048, ms_per_step=ms, device=dev)
        if pipe is not None:
            r["ms_pipelined"] = pipe
        return r

    q = "qat:q4_0+step-cache"
    rows = [row(q, 99.0), row("bf16", 100.0, 110.0), row(q, 102.0, 111.1), row("torchao", 130.0),
            row("bf16", 200.0), row(q, 203.0, 230.0), row(q, 150.0, batch=8),
            row("bf16", 100.0, dev="NVIDIA H100 80GB HBM3"), row(q, 101.0, dev="NVIDIA H100 80GB HBM3")]
    f = tmp_path / "speed_1b_compile_s16_x_h200.json"
    f.write_text(json.dumps(rows))
    got = pairs([f], {q})
    assert [(p["variant"], p["card"], p["session"], round(p["ratio"], 6)) for p in got] == [
        (q, "H200", 16, 1.02), (q + PIPELINED, "H200", 16, 1.01), (q, "H200", 16, 1.015), (q, "H100", 16, 1.01)]


def test_step_start_phases_and_guard_check(monkeypatch):
    """bench/step_start.py on the tiny config, CPU: every phase timed for bf16 and the step cache's variant;
    compiled (aot_eager), dynamo's guard check is found and timed on the step's own arguments (the cache
    entry passes them); eager, there is none. (Its figures need a GPU.)"""
    from bench.speed import SWITCHES
    from bench.step_start import PHASES, measure

    for key, _ in SWITCHES.values():  # measure() sets its variant's switches; monkeypatch restores them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for v in ("bf16", "qat:q4_0+step-cache"):
        r = measure("tiny", v, 2, 16, 1, 2, "cpu", backend="aot_eager")
        assert r["batch_start_us"] >= 0 and all(r[k + "_us"] > 0 for k in PHASES[1:]), r  # bf16: no cache to ask
        assert r["guard_check_us"] is not None and r["guard_check_us"] > 0, r
    assert measure("tiny", "bf16", 2, 16, 1, 2, "cpu", backend=None)["guard_check_us"] is None


def test_write_json_replaces_whole_files(tmp_path):
    from bench.common import write_json

    out = tmp_path / "rows.json"
    write_json(out, [dict(a=1)])
    write_json(out, [dict(a=2), dict(b=3)])
    assert json.loads(out.read_text()) == [dict(a=2), dict(b=3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]  # no temporary file left


def test_adam_zeros_plumbing():
    """bench/adam_zeros.py on the CPU: the zeroed gradients leave exact zeros in ``exp_avg_sq``, the floor
    raises every one of them, and both timings are there. (Its figures need a GPU.)"""
    from bench.adam_zeros import measure

    row = measure(0.02, "foreach", [(64, 128)] * 2, 2, "cpu")
    assert 0.01 * row["elements"] < row["zero_second_moments"] < 0.03 * row["elements"]
    assert row["zero_second_moments_floored"] == 0
    assert row["step_ms"] > 0 and row["step_ms_floored"] > 0


def test_rows_report_prints_and_writes(tmp_path, capsys):
    from bench.common import rows_report

    out = tmp_path / "rows.json"
    rows = rows_report([1, 2], lambda x: {"x": x, "sq": x * x}, "x sq", lambda r: f"{r['x']} {r['sq']}", out)
    assert rows == [{"x": 1, "sq": 1}, {"x": 2, "sq": 4}]
    assert capsys.readouterr().out.splitlines() == ['{"x": 1, "sq": 1}', '{"x": 2, "sq": 4}', "x sq", "1 1", "2 4"]
    assert json.loads(out.read_text()) == rows and not out.with_suffix(".tmp").exists()
    rows_report([3], lambda x: {"x": x}, "x", str, None)  # no file asked: none written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unpack_overlap_prefetch_is_bitwise_serial(tmp_path):
    """``bench/unpack_overlap.py`` checks the side stream's w_hat against the serial one before timing; one block."""
    out = tmp_path / "o.json"
    r = subprocess.run([sys.executable, "bench/unpack_overlap.py", "--blocks", "1", "--reps", "2", "--rounds", "1",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["how"] for row in rows] == ["bf16", "serial", "prefetch"] and rows[0]["over_bf16_ms"] == 0


def _dequant_gemm_checks(device: str) -> None:
    """``bench/dequant_gemm.py``'s GEMM, both matmuls: the Q4_0 path (codes and scales dequantized in the
    kernel) gives bitwise what the same kernel gives on ``triton_fq.unpack``'s w_hat (one config, so the same
    tiles and order), and both are a matmul (against float32 torch). fp16 under the CPU interpreter, whose bf16
    dot is broken; bf16 on CUDA."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dequant_gemm as dg

    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    configs, dg._gemm_kernel.configs = dg._gemm_kernel.configs, dg._gemm_kernel.configs[:1]  # 128 x 128 x 64 tiles
    try:
        _dequant_gemm_cases(dg, device, dtype)
    finally:
        dg._gemm_kernel.configs = configs
    print("dequant gemm checks passed")


def _dequant_gemm_cases(dg, device: str, dtype: torch.dtype) -> None:
    from qat.formats import get_format
    from qat.kernels import triton_fq as tfq

    gen = torch.Generator(device=device).manual_seed(0)
    n, k, m = 256, 512, 256
    codes = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=device, generator=gen)
    s = (torch.rand(n * k // 32, device=device, generator=gen) * 0.01 + 1e-3).to(torch.float16)
    w = tfq.unpack(codes, s, None, 0, n * k // 32, get_format("q4_0"), torch.empty(n, k, dtype=dtype, device=device))
    for kind, a in (("fwd", torch.randn(m, k, dtype=dtype, device=device, generator=gen)),
                    ("bwd", torch.randn(m, n, dtype=dtype, device=device, generator=gen))):
        ref = a.float() @ (w.float().t() if kind == "fwd" else w.float())
        plain, q4 = dg.fused(kind, a, w, codes, s, False), dg.fused(kind, a, w, codes, s, True)
        assert torch.equal(plain, q4), kind
        err = ((q4.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, (kind, err)
        assert torch.count_nonzero(q4) > 0.99 * q4.numel()  # every tile written


def test_dequant_gemm_interpreted():
    from conftest import run_interpreted

    run_interpreted("from test_bench_scripts import _dequant_gemm_checks; _dequant_gemm_checks('cpu')",
                    "dequant gemm checks passed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dequant_gemm_cuda():
    _dequant_gemm_checks("cuda")
