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
rounding into a PyTorch model's Linear inputs (as this machine's kernels compute it, and with Q8_1's
fp16 block sums for Q4_1/Q5_1), which separates "the file is wrong" from "llama.cpp rounds activations".
The KV cache is kept in F32 here so attention adds no rounding of its own. Argmax agreement still stops
short of 100%: Q8 rounding turns any ulp of difference (op order, exp/rsqrt approximations) into a whole
step that cascades through the layers, so even llama.cpp's batched and token-by-token runs of one file
disagree on 2-4% of SmolLM2's positions (bench/export_smollm2.py, "llama.cpp vs itself").

Perplexity here: the text's token ids are cut into consecutive windows of ``n_ctx``; each window is
evaluated from an empty cache and every position but the first is scored. Both runtimes see the
same windows, so the numbers compare directly (they are not llama-perplexity's half-window scores).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["dequantize_gguf", "gguf_logits", "gguf_perplexity", "torch_logits", "torch_perplexity",
           "perplexity_from_logits", "load_llama", "llama_vocab", "llama_file_type", "llamacpp_activations"]


def _require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs llama-cpp-python: pip install llama-cpp-python (or make install-dev; "
                          "it builds from source, ~20 min)") from e
    return llama_cpp


@contextlib.contextmanager
def quiet_llama_cpp():
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
        with quiet_llama_cpp():
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
def load_llama(path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None,
               n_ubatch: int | None = None) -> Iterator:
    """A ``llama_cpp.Llama`` computing logits for every position; closed on exit. ``n_ubatch``: tokens per
    graph (default ``n_ctx``: a window in one pass; 1 decodes token by token, through other kernels)."""
    llama_cpp = _require_llama_cpp()
    n_threads = n_threads or min(2, os.cpu_count() or 1)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch or n_ctx,
                          logits_all=True, n_threads=n_threads, n_threads_batch=n_threads,
                          type_k=0, type_v=0, verbose=False)  # F32 KV cache
    try:
        yield llm
    finally:
        llm.close()


def llama_vocab(llm) -> list[str]:
    """The token strings of a loaded model, by id, as llama.cpp holds them (the GGUF's tokenizer.ggml.tokens)."""
    llama_cpp = _require_llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", errors="replace") for i in range(llm.n_vocab())]


def llama_file_type(llm) -> str:
    """The file's ``general.file_type`` as llama.cpp names it (``Q4_0``, ``Q4_K_M``, ``F32`` ...), or ``?``."""
    import gguf
    try:
        name = gguf.LlamaFileType(int(llm.metadata["general.file_type"])).name
    except (KeyError, ValueError):
        return "?"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


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


# llama.cpp's CPU kernels quantize activations with per-architecture code, not the reference rule the
# weights use: x86 (AVX) takes id = 127/amax, ARM id = 1/d; both round half to even. One ulp in id moves
# a code across a .5 boundary, a whole Q8 step, so the emulation follows the kernel that runs here.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _q8_blocks(x):
    """quantize_row_q8_0 / q8_1 as this machine's llama.cpp computes them: ``(codes, d fp32, d fp16)`` in
    blocks of 32 on the last dim."""
    import torch
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    nz = amax != 0
    inv = 127.0 / torch.where(nz, amax, 1.0) if _X86 else 1.0 / torch.where(nz, d, 1.0)
    q = torch.round(b * torch.where(nz, inv, 0.0))  # _mm256_round_ps / vcvtnq: half to even
    return q, d, d.half().float()


def _q8_0(x):
    """The Q8_0 activation blocks llama.cpp multiplies Q4_0/Q5_0/Q8_0 weights by."""
    q, _, d16 = _q8_blocks(x)
    return (q * d16).reshape(x.shape)


def _q8_1(x):
    """Q8_1 (for Q4_1/Q5_1 weights): the Q8_0 values, and per block ``s16 - d16*sum(q)``: llama.cpp meets
    the weight minimum with ``s = fp16(d_fp32 * sum(q))``, not with the sum of the rounded values."""
    q, d, d16 = _q8_blocks(x)
    sq = q.sum(-1)
    return (q * d16).reshape(x.shape), (d.squeeze(-1) * sq).half().float() - d16.squeeze(-1) * sq


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
    weight type in the file (``float_type``: how float layers were written), and for Q4_1/Q5_1 add what
    Q8_1's fp16 block sums change. Removed on exit."""
    import torch
    from torch import nn

    def round_to(dtype):
        return lambda x: x.to(dtype).float()

    def hooks(m) -> list:
        fq = getattr(m, "weight_fake_quant", None)
        if fq is None or not getattr(fq, "enabled", True):
            fn = {"f16": round_to(torch.float16), "bf16": round_to(torch.bfloat16)}.get(float_type)
            return [] if fn is None else [m.register_forward_pre_hook(lambda mod, a: (fn(a[0]).to(a[0].dtype),))]
        t = getattr(fq.fmt, "ggml_type", None)
        if t in (2, 6, 8):  # Q4_0, Q5_0, Q8_0
            return [m.register_forward_pre_hook(lambda mod, a: (_q8_0(a[0]).to(a[0].dtype),))]
        if t in (10, 11, 12, 13, 14):  # Q2_K..Q6_K
            return [m.register_forward_pre_hook(lambda mod, a: (_q8_k(a[0]).to(a[0].dtype),))]
        if t in (3, 7):  # Q4_1, Q5_1: out += sum over blocks of min * (s16 - d16*sum(q))
            mins = m.quantize().zero.float()  # (out, n_blocks)
            delta = {}

            def pre(mod, a):
                x, delta["s"] = _q8_1(a[0])
                return (x.to(a[0].dtype),)
            return [m.register_forward_pre_hook(pre),
                    m.register_forward_hook(lambda mod, a, out: out + (delta.pop("s") @ mins.T).to(out.dtype))]
        return []

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles += hooks(m)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
