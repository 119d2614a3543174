"""Shared by the benchmarks: time training steps the same way everywhere."""
from __future__ import annotations

import statistics
import threading
import time
from contextlib import nullcontext
from typing import Callable

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


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: str) -> tuple[list[float], float]:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones: CUDA events on a GPU, the host clock on
    the CPU. Returns (milliseconds per step, peak bytes: CUDA allocated on a GPU, resident set on the CPU)."""
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
                a.record()
                step()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    return times, peak


def median(xs: list[float]) -> float:
    return statistics.median(xs)
