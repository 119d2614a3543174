"""Where a QAT training step's time goes: dynamo's graph/recompile counters (compiled), host enqueue time
against step time, and the profiler's top host and device entries for a few steady steps; run it for
bf16 too and compare.

    python bench/profile_compile.py --variant qat:q4_0 [--per-layer] [--eager]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.speed import profiled_step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="qat:q4_0")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--per-layer", action="store_true", help="QAT_BATCHED_FQ=0: the per-layer triton_op")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--eager", action="store_true", help="profile the eager step (no torch.compile)")
    p.add_argument("--gaps", type=int, default=15, help="print this many of the largest GPU idle gaps")
    p.add_argument("--stack", action="store_true", help="record Python calls too (slows the host: read the "
                   "pre-kernel ops' order, not their times)")
    args = p.parse_args()
    if args.per_layer:
        os.environ["QAT_BATCHED_FQ"] = "0"
    _, step = profiled_step(args.model, args.variant, args.batch, args.seq, "cuda", compiled=not args.eager)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    from torch._dynamo.utils import counters
    print("dynamo stats:", dict(counters["stats"]), "graph breaks:", sum(counters["graph_break"].values()))
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    m0 = torch.cuda.memory_stats()
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.current_stream().synchronize()  # as bench/speed.py: the current stream (a side stream's refresh runs on)
        t.append((t1 - t0, time.perf_counter() - t0))
    m1 = torch.cuda.memory_stats()
    print("allocator over 5 steps:", {k: m1.get(k, 0) - m0.get(k, 0) for k in keys})
    print("host enqueue ms / step ms:", [(round(a * 1e3, 1), round(b * 1e3, 1)) for a, b in t])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                with_stack=args.stack) as prof:
        for _ in range(3):
            with torch.profiler.record_function("qat_step"):
                step()
            # as bench/speed.py times it: the current stream's end, so every step starts on an idle current
            # stream (the step cache's overlapped refresh may still run on its side stream)
            torch.cuda.current_stream().synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    print(ka.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    dev = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA and e.key != "qat_step"]
    print("device entries per step:", sum(e.count for e in dev) / 3)
    # busy device time per step (sum of kernel times; overlap-free on one stream): step ms minus this is
    # the time the GPU waited for the host
    print("device busy ms per step: %.2f" % (sum(e.self_device_time_total for e in dev) / 3 / 1e3))
    # where the GPU waits: the largest gaps between consecutive kernels, with the kernels around them
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    kernels = sorted((e for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    gaps = [(b["ts"] - (a["ts"] + a["dur"]), a["name"], b["name"]) for a, b in zip(kernels, kernels[1:])]
    print("GPU idle between kernels, ms per step: %.2f; largest gaps (us, before -> after):" % (
        sum(g for g, _, _ in gaps if g > 0) / 3 / 1e3))
    for g, a, b in sorted(gaps, reverse=True)[:args.gaps]:
        print(f"  {g:9.1f}  {a[:60]} -> {b[:60]}")
    preamble(trace, kernels, args.rows)


def preamble(trace: list, kernels: list, rows: int) -> None:
    """The host time of each step before its first GPU kernel: the GPU idles through all of it (every step
    starts after a sync), so it counts in full in the step time. Prints its length and the host ops in it."""
    steps = sorted((e for e in trace if e.get("name") == "qat_step" and e.get("ph") == "X"
                    and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])  # the host's marks, not the GPU's
    ops = [e for e in trace if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation")
           and e.get("name") != "qat_step"]
    for i, s in enumerate(steps):
        first = next((k for k in kernels if k["ts"] >= s["ts"]), None)
        if first is None:
            continue
        t0, t1 = s["ts"], first["ts"]
        print(f"step {i}: {(t1 - t0) / 1e3:.2f} ms from the step's start to its first kernel ({first['name'][:50]})")
        if i == len(steps) - 1:
            # each op's time inside the window (an op that starts there, the compiled region say, runs on)
            inside = sorted(((min(e["ts"] + e.get("dur", 0), t1) - e["ts"], e) for e in ops if t0 <= e["ts"] < t1),
                            key=lambda x: -x[0])
            print("  host ops in it (ms inside the window, start ms, name):")
            for d, e in inside[:rows]:
                print(f"  {d / 1e3:8.3f}  +{(e['ts'] - t0) / 1e3:7.3f}  {e['name'][:100]}")
            # many small calls (one per input or layer) hide below the largest ones: their sums by name
            tot: dict = {}
            for d, e in inside:
                n, c = tot.get(e["name"], (0.0, 0))
                tot[e["name"]] = (n + d, c + 1)
            print("  summed by name (ms inside the window, calls, name):")
            for name, (d, c) in sorted(tot.items(), key=lambda x: -x[1][0])[:rows]:
                print(f"  {d / 1e3:8.3f}  {c:6d}  {name[:100]}")


if __name__ == "__main__":
    main()
