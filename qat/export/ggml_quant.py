"""K-quant blocks for export from llama.cpp's own C encoder (``ggml_quantize_chunk``), checked against ours.

Why: a k-quant layer's codes are always llama.cpp's reference rule applied to the trained weight (k-quants
have no stored or learned parameters, see ``observers.py``), and ``qat/formats/kquants.py`` reproduces that
rule bit for bit in vectorized torch. The two-level scale search is sequential per 16/32-element sub-block,
so in eager torch it is ~14 passes over the tensor for each of ~20 candidate scales; llama.cpp runs it in
registers. Export time is issue 7's goal (<= 1.0x llama.cpp's quantizer); ours alone measured 1.32-1.44x at
Q4_K_M/Q3_K_M on SmolLM2 (bench/export_time.py). Where llama-cpp-python is installed, its ``libggml-base``
encodes these tensors instead, on the same fp32 weights.

What is written must stay what was trained, whatever llama.cpp version is installed: every tensor is checked
on a sample of rows (up to ``CHECK_ROWS``, spread over the tensor) against our encoder's bytes. A mismatch
(a llama.cpp whose rules changed) drops the fast path for the rest of the process with a warning and the
tensor is encoded by ours. ``QAT_GGML_QUANTIZE=0`` turns the fast path off. No imatrix is passed: our
quantizers train without one, and so is the reference rule llama.cpp applies.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..formats.kquants import KQuantFormat
from ..formats.base import check_finite

__all__ = ["ggml_encoder", "encode_kquant"]

CHECK_ROWS = 8

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_disabled_reason: Optional[str] = None


def _find_lib() -> Optional[Path]:
    spec = importlib.util.find_spec("llama_cpp")  # located, not imported (importing loads libllama too)
    if spec is None or spec.origin is None:
        return None
    lib_dir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    return None


def ggml_encoder() -> Optional[ctypes.CDLL]:
    """``libggml-base`` with ``ggml_quantize_chunk`` typed, or None (not installed, disabled, or failed)."""
    global _lib, _tried
    if os.environ.get("QAT_GGML_QUANTIZE", "1") == "0" or _disabled_reason is not None:
        return None
    with _lock:
        if not _tried:
            _tried = True
            path = _find_lib()
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                    fn = lib.ggml_quantize_chunk
                    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                    #     int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix)
                    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_void_p]
                    fn.restype = ctypes.c_size_t
                    _lib = lib
                except (OSError, AttributeError):
                    _lib = None
    return _lib


def _ggml_bytes(lib: ctypes.CDLL, fmt: KQuantFormat, x: np.ndarray) -> np.ndarray:
    rows, n = x.shape
    out = np.empty((rows, n // fmt.block * fmt.type_size), dtype=np.uint8)
    # ctypes drops the GIL for the call: convert's threads encode layers in parallel
    size = lib.ggml_quantize_chunk(int(fmt.ggml_type), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if size != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {size} bytes, expected {out.size}")
    return out


def encode_kquant(fmt, weight: torch.Tensor) -> Optional[np.ndarray]:
    """File bytes ``(*shape[:-1], n_blocks * type_size)`` of ``weight`` in k-quant ``fmt`` by llama.cpp's
    encoder, equal to ``fmt.to_bytes(fmt.quantize(weight))``; None where the fast path does not apply (not a
    k-quant, llama-cpp-python missing or disabled), so the caller encodes with ours."""
    global _disabled_reason
    if not isinstance(fmt, KQuantFormat):
        return None
    lib = ggml_encoder()
    if lib is None:
        return None
    w = weight.detach().to("cpu", torch.float32)
    check_finite(w)  # the same errors as our encoder, before any C code sees the numbers
    fmt.check_shape(tuple(w.shape))
    x = np.ascontiguousarray(w.reshape(-1, w.shape[-1]).numpy())
    data = _ggml_bytes(lib, fmt, x)
    rows = np.unique(np.linspace(0, x.shape[0] - 1, min(CHECK_ROWS, x.shape[0])).round().astype(np.int64))
    ours = fmt.to_bytes(fmt.quantize(torch.from_numpy(x[rows])))
    if not np.array_equal(ours.reshape(len(rows), -1), data[rows]):
        _disabled_reason = f"llama.cpp's {fmt.name} encoder disagrees with qat's"
        warnings.warn(f"{_disabled_reason} (a llama.cpp with other rules?): exporting with qat's encoder, "
                      "the numerics training used", RuntimeWarning, stacklevel=2)
        return None
    return data.reshape(*w.shape[:-1], -1)
