"""Shared by the benchmarks: time training steps the same way everywhere; llama.cpp PTQ and result rows
for the quality benchmarks."""
from __future__ import annotations

import ctypes
import json
import statistics
import threading
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch


class PeakRSS:
    """Peak resident memory of this process while the block runs (CPU runs; needs psutil)."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, float("nan"), threading.Event()

    def __enter__(self):
        try:
            import psutil
        except ImportError:
            return self
        proc = psutil.Process()
        self.peak = proc.memory_info().rss

        def poll():
            while not self._stop.wait(self.every_s):
                self.peak = max(self.peak, proc.memory_info().rss)
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()


def release(device: str) -> None:
    """Between two variants in one process: collect the last one's objects, return its cached CUDA memory
    (so the next variant's peak is its own) and drop dynamo's compiled graphs. Delete the references first."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: str,
               host: Optional[list] = None) -> tuple[list[float], float]:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones: CUDA events on a GPU, the host clock on
    the CPU. Returns (milliseconds per step, peak bytes: CUDA allocated on a GPU, resident set on the CPU).
    ``host``: a list that gets each timed step's host time in ms (on a GPU: until the step's last launch was
    queued; a host time close to the step time means the GPU waited for Python). Each step ends on the
    host when the current stream is done (on a GPU)."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() if device == "cpu" else nullcontext() as rss:
        for _ in range(steps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                a.record()
                step()
                b.record()
                t1 = time.perf_counter()
                # the current stream's end, as a training loop's loss read (``loss.item()``, Lightning's progress
                # bar) waits for: not a side stream's work queued after it (the step cache's overlapped refresh),
                # which the next step's kernels wait for on the device and so count in its time
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                times.append((t1 - t0) * 1e3)
            if host is not None:
                host.append((t1 - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    return times, peak


def time_pipelined(step: Callable[[], object], steps: int, device: str,
                   finish: Callable[[], object] | None = None) -> float:
    """Milliseconds per step of ``steps`` steps queued back to back, one sync at the end: a loop that never
    reads the loss, so the host runs ahead and the GPU never waits for a step's start (``time_steps`` ends
    every step on the host, as a loop that reads the loss each step does). Run after ``time_steps``' warmup.
    ``finish`` runs before the end event: e.g. the step cache's ``wait``, so the last step's side-stream
    refresh is counted like the others (each step's forward waits for the one before)."""
    if device == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            step()
        if finish is not None:
            finish()
        b.record()
        torch.cuda.synchronize()  # everything, the side streams' work included
        return a.elapsed_time(b) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) * 1e3 / steps


def device_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Device ms per call of ``fn``: the CUDA kernels' time from the profiler, summed and divided by ``reps``,
    after 3 untimed calls. (Wall or event timing of one call measures the host where a call's kernels are
    short: a triton_op call costs more host time than such kernels take on the GPU.)"""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return us / 1e3 / reps


def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path``, through a temporary file renamed into place (a run stopped halfway
    leaves the last complete file, not half of one)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def rows_report(items, measure: Callable[[object], dict], header: str, line: Callable[[dict], str],
                out=None) -> list[dict]:
    """``measure(item)`` for each item, each row printed as JSON as it comes; then a table (``header``, and
    ``line(row)`` per row), and the rows written to ``out`` (``write_json``) when given. Returns the rows."""
    rows = []
    for item in items:
        rows.append(measure(item))
        print(json.dumps(rows[-1]), flush=True)
    print(header)
    for r in rows:
        print(line(r))
    if out:
        write_json(out, rows)
    return rows


def zero_second_moments(opt: torch.optim.Optimizer) -> int:
    """Exact zeros in ``opt``'s Adam second moments (``exp_avg_sq``): CUDA's Adam kernels are slower on them
    (``qat/adam_floor.py``)."""
    return sum(int(st["exp_avg_sq"].eq(0).sum()) for st in opt.state.values() if "exp_avg_sq" in st)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- quality benchmarks (bench/quality.py, bench/qlora_quality.py): llama.cpp's quantizer, GGUF tensor types,
# rows written as they come and merged across processes ----------------------------------------------------

GGML_TYPE_F16 = 1


def llama_ftype(scheme: str) -> int:
    """llama.cpp's ``LLAMA_FTYPE_MOSTLY_<SCHEME>`` (q4_0 -> 2, q4_k_m -> 15 ...), checked against ``qat.mixes``."""
    import llama_cpp

    from qat.mixes import FILE_TYPES
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{scheme.upper()}", None)
    if value is None:
        raise ValueError(f"llama.cpp has no file type for {scheme!r}")
    if scheme.lower() in FILE_TYPES and FILE_TYPES[scheme.lower()] != value:
        raise RuntimeError(f"{scheme}: llama_cpp says {value}, qat.mixes.FILE_TYPES says {FILE_TYPES[scheme.lower()]}")
    return int(value)


def llama_quantize(src: Path, dst: Path, scheme: str, threads: int) -> Path:
    """PTQ as users run it: ``llama_model_quantize`` of an F16 GGUF to file type ``scheme``, keeping the token
    embedding (and an output head, if the file has one) in F16, as the QAT exports here do."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_ftype(scheme)
    params.token_embedding_type = GGML_TYPE_F16
    params.output_tensor_type = GGML_TYPE_F16
    from qat.llamacpp import quiet_llama_cpp
    with quiet_llama_cpp():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {scheme}) returned {rc}")
    return dst


def gguf_tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> its type name (``Q4_0``, ``F16`` ...)."""
    import gguf
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def type_counts(types: dict[str, str]) -> dict[str, int]:
    return dict(sorted(Counter(types.values()).items()))


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors whose bytes are equal in both files, tensors in ``a``)."""
    import gguf
    import numpy as np
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    ta = gguf.GGUFReader(str(a)).tensors
    same = sum(1 for t in ta if t.name in tb and t.tensor_type == tb[t.name].tensor_type
               and np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[t.name].data).view(np.uint8)))
    return same, len(ta)


def warn_type_mismatch(a_name: str, a: dict[str, str], b_name: str, b: dict[str, str]) -> list[str]:
    """Print a warning listing the tensors whose GGUF type differs between two files; return those lines."""
    lines = [f"{n}: {a.get(n, '-')} vs {b.get(n, '-')}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
    if lines:
        print(f"WARNING: {len(lines)} tensor types differ between {a_name} and {b_name}:\n  " + "\n  ".join(lines[:40])
              + (f"\n  ... {len(lines) - 40} more" if len(lines) > 40 else ""), flush=True)
    return lines


class RowLog:
    """A benchmark's rows: printed, and appended to ``<out>.jsonl`` one line each as they come, so a killed
    run still leaves its numbers. Thread-safe (rows may be finished by an evaluation thread)."""

    def __init__(self, out: Path):
        self.path = Path(out).with_suffix(".jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._lock = threading.Lock()

    def add(self, row: dict) -> None:
        with self._lock:
            self.rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def read_rows(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """Rows and metas from result files: a ``.json`` written at the end of a run (``{"meta", "rows"}``), or
    the ``.jsonl`` beside it (used where the ``.json`` is missing: a killed run). Later rows of the same
    (model, scheme) replace earlier ones."""
    rows: dict[tuple, dict] = {}
    metas = []
    for p in map(Path, paths):
        if p.suffix == ".json" and p.exists():
            doc = json.loads(p.read_text())
            metas.append(doc.get("meta", {}))
            got = doc.get("rows", [])
        else:
            jl = p.with_suffix(".jsonl")
            if not jl.exists():
                print(f"WARNING: neither {p} nor {jl} exists; skipped", flush=True)
                continue
            got = [json.loads(line) for line in jl.read_text().splitlines() if line.strip()]
            print(f"{p}: using the {len(got)} rows of {jl}", flush=True)
        for r in got:
            rows[(r.get("model"), r.get("scheme"))] = r
    return list(rows.values()), metas


def check_type_counts(rows: list[dict]) -> None:
    """Warn where rows of one scheme hold different GGUF tensor types (they should be identical)."""
    by_scheme: dict[str, dict[str, str]] = {}
    for r in rows:
        if r.get("scheme") and r.get("tensor_types"):
            by_scheme.setdefault(r["scheme"], {})[r["model"]] = json.dumps(r["tensor_types"], sort_keys=True)
    for scheme, seen in by_scheme.items():
        if len(set(seen.values())) > 1:
            print(f"WARNING: {scheme}: rows hold different tensor types:\n  "
                  + "\n  ".join(f"{m}: {t}" for m, t in seen.items()), flush=True)
