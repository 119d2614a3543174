"""W&B through Lightning's WandbLogger, offline: the run's own .wandb file, read back record by record,
holds the loss, lr, tokens/s, the eval perplexities, the per-layer error table and its plot."""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from qat.lm.run import train_run
from qat.recipe import load_recipe
from tiny_run import tiny_recipe

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, HEADER = 32768, 7  # the .wandb file: LevelDB log format, blocks of 32 KiB, 7-byte record headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """Every protobuf ``Record`` of a .wandb file, in order."""
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if pos + HEADER + length > len(data):  # the writer is mid-record
            return
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The records once the run's ``exit`` record is on disk (W&B's writer process flushes on its own time)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def logged(path: Path) -> tuple[list[dict], dict]:
    """(history rows, final summary) as {key: decoded JSON value}."""
    history, summary = [], {}
    for r in finished_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    return history, summary


def media(history: list[dict], key: str) -> dict:
    """A logged wandb.Table / wandb.Image: its fields arrive flattened as ``key/field``."""
    row = next(h for h in history if any(k.startswith(key + "/") for k in h))
    return {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(key + "/")}


def test_offline_run_holds_metrics_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")  # the recipe's offline wins over the environment
    recipe = load_recipe(tiny_recipe(tmp_path, train={"max_steps": 3, "log_every_n_steps": 1}))
    assert recipe.wandb.mode == "offline"
    run_dir = train_run(recipe)
    assert os.environ["WANDB_MODE"] == "offline"
    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "the QAT run logs offline into the run directory"
    history, summary = logged(runs[0])
    keys = set().union(*history)
    assert "qat/layer_errors/_type" in keys and "qat/layer_errors_plot/_type" in keys
    assert {"train/loss", "train/lr", "train/tokens_per_s", "qat/rel_mse_mean"} <= keys
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    assert any(k.startswith("qat/rel_mse/") and "mlp.down_proj" in k for k in keys)
    eval_json = json.loads((run_dir / "eval.json").read_text())
    for kind in ("float", "ptq", "qat"):
        assert summary[f"eval/ppl_{kind}"] == pytest.approx(eval_json["results"][kind]["ppl"])
    table = media(history, "qat/layer_errors")
    assert table["_type"] == "table-file" and table["nrows"] == 14 and table["ncols"] == 5
    rows = json.loads((runs[0].parent / "files" / table["path"]).read_text())
    assert rows["columns"] == ["layer", "format", "numel", "rel_mse_ptq", "rel_mse_qat"]
    assert all(r[1] == "q4_0" and r[3] > 0 and r[4] > 0 for r in rows["data"])
    plot = media(history, "qat/layer_errors_plot")
    png = runs[0].parent / "files" / plot["path"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    twins = sorted((run_dir / "float" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(twins) == 1 and "train/loss" in set().union(*logged(twins[0])[0])
