"""llama.cpp as the judge of exported GGUF files, through ``llama-cpp-python``.

* ``dequantize_gguf``: every tensor of a GGUF file as llama.cpp itself reconstructs it (``llama-quantize``
  to F32 with ``allow_requantize``, read back with ``gguf.GGUFReader``); the reference that the
  exported weights are compared against, bit for bit.
* ``gguf_logits`` / ``gguf_perplexity``: llama.cpp's next-token logits and perplexity on token ids.
* ``torch_logits`` / ``torch_perplexity``: the same windows through a PyTorch causal LM, so both sides
  are scored identically.

Logits agree with PyTorch's only to llama.cpp's own activation rounding: its CPU matmuls convert the
activations to the weight's partner type (Q8_0 blocks for Q4_0..Q8_0, Q8_1 for Q4_1/Q5_1 (same codes),
Q8_K for k-quants, F16/BF16 for F16/BF16 weights). ``llamacpp_activations(model)`` puts the same
rounding into a PyTorch model's Linear inputs, which separates "the file is wrong" from "llama.cpp
rounds activations". The KV cache is kept in F32 here so attention adds no rounding of its own.

Perplexity here: the text's token ids are cut into consecutive windows of ``n_ctx``; each window is
evaluated from an empty cache and every position but the first is scored. Both runtimes see the
same windows, so the numbers compare directly (they are not llama-perplexity's half-window scores).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["dequantize_gguf", "gguf_logits", "gguf_perplexity", "torch_logits", "torch_perplexity",
           "perplexity_from_logits", "load_llama", "llamacpp_activations"]


def _require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs llama-cpp-python: pip install 'qat[dev]' (or llama-cpp-python)") from e
    return llama_cpp


@contextlib.contextmanager
def _quiet_llama_cpp():
    """llama-quantize logs every tensor at INFO level; keep only errors while it runs."""
    import logging
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dequantize_gguf(path: str | os.PathLike, nthread: int = 1) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 array in PyTorch order (``[rows, cols]``), as llama.cpp dequantizes it."""
    import gguf
    llama_cpp = _require_llama_cpp()
    with tempfile.TemporaryDirectory(prefix="qat-f32-") as d:
        out = os.path.join(d, "f32.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = nthread
        with _quiet_llama_cpp():
            rc = llama_cpp.llama_model_quantize(str(path).encode(), out.encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed on {path} (return code {rc})")
        reader = gguf.GGUFReader(out)
        tensors = {}
        for t in reader.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise RuntimeError(f"{t.name} came back as {t.tensor_type.name}, not F32")
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            tensors[t.name] = np.array(t.data, dtype=np.float32).reshape(shape)
        del reader
    return tensors


@contextlib.contextmanager
def load_llama(path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None) -> Iterator:
    """A ``llama_cpp.Llama`` computing logits for every position; closed on exit."""
    llama_cpp = _require_llama_cpp()
    n_threads = n_threads or min(2, os.cpu_count() or 1)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=n_threads, n_threads_batch=n_threads, type_k=0, type_v=0,  # F32 KV cache
                          verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def _windows(ids: Sequence[int], n_ctx: int) -> list[list[int]]:
    ids = list(ids)
    return [ids[i:i + n_ctx] for i in range(0, len(ids), n_ctx) if len(ids[i:i + n_ctx]) > 1]


def gguf_logits(path_or_llm, ids: Sequence[int], n_ctx: int = 512) -> np.ndarray:
    """llama.cpp's logits ``(len(ids), n_vocab)`` for ``ids``, window by window (each from an empty cache)."""
    if isinstance(path_or_llm, (str, os.PathLike)):
        with load_llama(path_or_llm, n_ctx) as llm:
            return gguf_logits(llm, ids, n_ctx)
    llm = path_or_llm
    out = []
    for win in _windows(ids, min(n_ctx, llm.n_ctx())):
        llm.reset()  # eval() then drops the cache from position 0
        llm.eval(win)
        out.append(np.array(llm.scores[: len(win)], dtype=np.float32))
    return np.concatenate(out)


def perplexity_from_logits(logits: np.ndarray, ids: Sequence[int], n_ctx: int) -> float:
    """Perplexity of ``ids`` given per-position logits laid out by window as ``gguf_logits`` does."""
    nll, count, pos = 0.0, 0, 0
    for win in _windows(ids, n_ctx):
        lg = logits[pos:pos + len(win)].astype(np.float64)
        pos += len(win)
        lg = lg - lg.max(-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        tgt = np.asarray(win[1:])
        nll -= logp[np.arange(len(win) - 1), tgt].sum()
        count += len(win) - 1
    return math.exp(nll / count)


def gguf_perplexity(path: str | os.PathLike, ids: Sequence[int], n_ctx: int = 512) -> float:
    return perplexity_from_logits(gguf_logits(path, ids, n_ctx), ids, n_ctx)


def torch_logits(model, ids: Sequence[int], n_ctx: int = 512):
    """The PyTorch model's fp32 logits on the same windows as ``gguf_logits``."""
    import torch
    out = []
    with torch.no_grad():
        for win in _windows(ids, n_ctx):
            out.append(model(torch.tensor([win])).logits[0].float().numpy())
    return np.concatenate(out)


def torch_perplexity(model, ids: Sequence[int], n_ctx: int = 512) -> float:
    return perplexity_from_logits(torch_logits(model, ids, n_ctx), ids, n_ctx)


def file_size_mib(path: str | os.PathLike) -> float:
    return Path(path).stat().st_size / 2**20


def _q8_0(x):
    """llama.cpp's quantize_row_q8_0 then dequantize, on the last dim (blocks of 32)."""
    from .formats.ggml import Q8_0
    return Q8_0.fake(x)


def _q8_k(x):
    """llama.cpp's quantize_row_q8_K (blocks of 256): iscale = -127/max, nearest_int, d = 1/iscale."""
    import torch
    from .formats.kquants import nearest_int
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
    idx = b.abs().argmax(-1, keepdim=True)
    mx = b.gather(-1, idx)
    iscale = torch.where(mx == 0, torch.zeros_like(mx), -127.0 / torch.where(mx == 0, torch.ones_like(mx), mx))
    q = nearest_int(iscale * b).clamp(max=127).float()
    d = torch.where(mx == 0, torch.zeros_like(mx), 1.0 / torch.where(iscale == 0, torch.ones_like(iscale), iscale))
    return (q * d).reshape(x.shape)


@contextlib.contextmanager
def llamacpp_activations(model, float_type: str = "f32"):
    """Round every Linear input of ``model`` the way llama.cpp's CPU matmul rounds it for that layer's
    weight type in the file (``float_type``: how float layers were written). Removed on exit."""
    import torch
    from torch import nn

    def partner(m):
        fq = getattr(m, "weight_fake_quant", None)
        if fq is not None and getattr(fq, "enabled", True):
            t = getattr(fq.fmt, "ggml_type", None)
            if t in (2, 3, 6, 7, 8):
                return _q8_0
            if t in (10, 11, 12, 13, 14):
                return _q8_k
            return None
        if float_type == "f16":
            return lambda x: x.to(torch.float16).float()
        if float_type == "bf16":
            return lambda x: x.to(torch.bfloat16).float()
        return None

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fn = partner(m)
            if fn is not None:
                handles.append(m.register_forward_pre_hook(lambda mod, args, fn=fn: (fn(args[0]).to(args[0].dtype),)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
