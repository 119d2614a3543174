"""llama.cpp's own k-quant encoder (``ggml_quantize_chunk`` in llama-cpp-python's ``libggml-base``).

Why: a k-quant's codes are always llama.cpp's reference rule applied to the weight (no stored or learned
parameters), and ``kquants.py`` reproduces that rule bit for bit in vectorized torch. But the rule's
two-level scale search is sequential per 16/32-element sub-block: in eager torch that is ~14 passes over
the tensor for each of ~20 candidate scales, thousands of small ops per call. Measured: GGUF export of
SmolLM2 at Q4_K_M/Q3_K_M took 1.32-1.44x llama.cpp's time with ours alone (issue 7's goal is <= 1.0x),
and a Q4_K_M QAT step on an H200 took 8.7x a bf16 step. llama.cpp runs the same search in registers.
So where llama-cpp-python is installed, ``KQuantFormat`` encodes with it, and checks it (see there).
``QAT_GGML_QUANTIZE=0`` turns it off. No imatrix is passed: that is the reference rule.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["library", "enabled", "quantize_rows", "dequantize_rows", "agrees", "check_rows", "checked_blocks", "CHECK_ROWS"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
ROWS_PER_TASK = 64  # fewest rows per call when one tensor is split over threads


def _find() -> Optional[Path]:
    spec = importlib.util.find_spec("llama_cpp")  # located, not imported (importing loads libllama too)
    if spec is None or spec.origin is None:
        return None
    lib_dir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    return None


def library() -> Optional[ctypes.CDLL]:
    """``libggml-base`` with ``ggml_quantize_chunk`` typed, or None where llama-cpp-python is missing."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            path = _find()
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                    #     int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix)
                    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                        ctypes.c_void_p]
                    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
                    _lib = lib
                except (OSError, AttributeError):
                    _lib = None
    return _lib


def enabled() -> bool:
    return os.environ.get("QAT_GGML_QUANTIZE", "1") != "0" and library() is not None


def quantize_rows(ggml_type: int, type_size: int, x: np.ndarray, threads: int = 1, block: int = 256) -> np.ndarray:
    """Blocks of fp32 ``x`` (rows, n_per_row), as llama.cpp writes them: uint8 ``(rows, n/block*type_size)``.

    ``threads`` > 1 splits the rows over a pool (ctypes drops the GIL for each call)."""
    lib = library()
    assert lib is not None
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.empty((rows, n // block * type_size), dtype=np.uint8)

    def run(r0: int, r1: int) -> int:  # start is an element index; dst stays the base pointer
        return lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, r0 * n, r1 - r0, n, None)

    size = _over_rows(run, rows, threads)
    if size != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {size} bytes, expected {out.size}")
    return out


CHECK_ROWS = 64  # rows of a format's first tensor compared with qat's encoder


def check_rows(rows: int) -> np.ndarray:
    """``CHECK_ROWS`` row indices spread over ``rows`` (first and last included)."""
    return np.unique(np.linspace(0, rows - 1, min(CHECK_ROWS, rows)).round().astype(np.int64))


def agrees(data: np.ndarray, x, ours) -> bool:
    """Do the ``check_rows`` of ``data`` (llama.cpp's blocks of the rows ``x``) equal ``ours(x[those rows])``,
    qat's bytes for them? (A check on every call would cost more than the C encoding itself.)"""
    import torch

    check = check_rows(x.shape[0])
    mine = ours(x[torch.from_numpy(check)])
    return np.array_equal(mine.reshape(len(check), -1), data[check])


def checked_blocks(fmt, w, ours, state: dict):
    """``(x, data)``: ``w`` as fp32 CPU rows and llama.cpp's blocks of them (``fmt``'s ``ggml_type``,
    ``type_size`` and ``block``), or None once llama.cpp's encoder is off for ``state``'s formats.

    The first call per format (``state["calls"]`` counts them) compares ``CHECK_ROWS`` rows with ``ours``,
    qat's bytes for given rows (the test suite checks the edge cases against the installed llama.cpp). A
    difference (a llama.cpp whose rules changed) sets ``state["off"]``, with a warning, and gives None:
    what trains and exports must stay the reference rule's bits."""
    import torch

    if state["off"]:
        return None
    x = w.detach().reshape(-1, w.shape[-1]).to("cpu", torch.float32)
    data = quantize_rows(int(fmt.ggml_type), fmt.type_size, x.numpy(), torch.get_num_threads(), block=fmt.block)
    calls = state["calls"].get(fmt.name, 0)
    state["calls"][fmt.name] = calls + 1
    if calls == 0 and not agrees(data, x, ours):
        import warnings

        state["off"] = True
        warnings.warn(f"llama.cpp's {fmt.name} encoder disagrees with qat's on this tensor (a llama.cpp with "
                      "other rules?): qat's encoder is used from now on", RuntimeWarning, stacklevel=4)
        return None
    return x, data


def _over_rows(run, rows: int, threads: int) -> int:
    """``run(r0, r1)`` over all rows, split over a pool of ``threads`` (ctypes drops the GIL); sum of results."""
    if threads > 1 and rows > ROWS_PER_TASK:
        step = max(ROWS_PER_TASK, -(-rows // (4 * threads)))
        spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
        with ThreadPoolExecutor(min(threads, len(spans))) as pool:
            return sum(pool.map(lambda s: run(*s), spans))
    return run(0, rows)


_DEQUANT = {"q2_k": "q2_K", "q3_k": "q3_K", "q4_k": "q4_K", "q5_k": "q5_K", "q6_k": "q6_K"}


def dequantize_rows(name: str, data: np.ndarray, n_per_row: int, threads: int = 1) -> np.ndarray:
    """llama.cpp's ``dequantize_row_<type>`` of blocks ``data`` (rows, bytes per row): fp32 (rows, n_per_row).

    Why: a fake-quant step needs only ``w_hat``; building a QTensor from the bytes (unpacking nibbles and
    6-bit scales in torch) took longer than llama.cpp's encoding itself (SmolLM2's q4_k tensors on this
    2-core CPU: 0.45 s unpack + 0.19 s dequantize against 1.3 s to encode)."""
    lib = library()
    assert lib is not None
    fn = getattr(lib, "dequantize_row_" + _DEQUANT[name])
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows, nbytes = data.shape
    out = np.empty((rows, n_per_row), dtype=np.float32)

    def run(r0: int, r1: int) -> int:  # void dequantize_row_X(const block_X * x, float * y, int64_t k)
        fn(data.ctypes.data + r0 * nbytes, out.ctypes.data + r0 * n_per_row * 4, (r1 - r0) * n_per_row)
        return r1 - r0

    _over_rows(run, rows, threads)
    return out
