"""Write a fake-quantized causal LM as a GGUF file that llama.cpp runs bit-for-bit as trained.

Quantized weights are the integer codes and scales of ``qat.convert`` packed by the format's own
``to_bytes`` (llama.cpp's block layout); nothing is re-quantized from float. The file is written with
the official ``gguf`` package, under llama.cpp's tensor names (``gguf.get_tensor_name_map``) and keys.

Two facts of llama.cpp's Llama layout shape the writer:

* q/k projections are stored with their rows permuted (``_rope_permute``): HF rotates the two halves
  of each head, GGML rotates adjacent pairs. Blocks run along a row, so permuting the rows of the
  packed bytes permutes codes and scales together, exactly.
* A tied output head is not written: llama.cpp falls back to ``token_embd``. It is written anyway
  when the head and the embedding would hold different numbers (only one of them quantized).

Everything that can be refused (architecture, scheme, activation quantization, tokenizer, output
path) is checked before the first byte is written.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..formats import QTensor, get_format
from ..formats.ggml import GGMLFormat
from ..formats.kquants import KQuantFormat
from ..modules import FakeQuantEmbedding, FakeQuantLinear
from ..prepare import convert, fake_quant_modules
from .io import ExportError, atomic_file, check_output

__all__ = ["export_gguf", "GGUF_ARCHS", "FLOAT_TYPES", "gguf_file_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Arch:
    gguf_arch: str       # llama.cpp's architecture name
    permute_qk: bool     # Llama-style rope: q/k rows permuted for GGML's rope


# HF architectures (config.architectures / class name) we know how to lay out.
GGUF_ARCHS = {
    "LlamaForCausalLM": _Arch("llama", True),
    "MistralForCausalLM": _Arch("llama", True),  # llama.cpp converts Mistral as arch "llama"
    "Qwen2ForCausalLM": _Arch("qwen2", False),   # NEOX rope: no permutation
}

FLOAT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_TORCH_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# llama.cpp's tokenizer.ggml.pre names, recognised the way convert_hf_to_gguf.py does: by hashing
# the token ids of a probe text that exercises every pre-tokenizer difference.
_PRE_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3 tokenizer
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # Mistral Nemo
}


def gguf_file_name(stem: str, type_name: str) -> str:
    """``model`` + ``q4_k_m`` -> ``model.Q4_K_M.gguf``: file names say what they hold."""
    return f"{stem}.{type_name.upper()}.gguf"


# ---------------------------------------------------------------------------------------------------
# model side
# ---------------------------------------------------------------------------------------------------
def _arch_of(model: nn.Module) -> tuple[str, _Arch]:
    config = getattr(model, "config", None)
    names = list(getattr(config, "architectures", None) or []) + [type(model).__name__]
    for name in names:
        if name in GGUF_ARCHS:
            return name, GGUF_ARCHS[name]
    raise ExportError(
        f"GGUF export does not support {names[0] if names else type(model).__name__}; "
        f"supported: {', '.join(GGUF_ARCHS)} (Hugging Face causal LMs)"
    )


def _rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k row order -> GGML's interleaved order, on any per-row data (floats,
    packed quant blocks, biases): within each head, row ``h*2+i`` <- ``i*half+h``."""
    shape = rows.shape
    return (rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def rope_unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of the q/k permutation (for reading a GGUF back into HF order)."""
    shape = rows.shape
    return (rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def _hparams(config) -> dict:
    n_head = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "linear"):
        raise ExportError(f"rope scaling {rope_type!r} is not supported by the GGUF exporter yet "
                          "(supported: none, linear)")
    return dict(
        n_head=n_head,
        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_head,
        theta=float(theta),
        rope_linear=float(scaling["factor"]) if rope_type == "linear" else None,
    )


@dataclass
class _Tensor:
    name: str           # GGUF name
    data: np.ndarray    # uint8, (*shape[:-1], row bytes)
    ggml_type: int
    numel: int


def _float_bytes(t: torch.Tensor, type_name: str) -> tuple[np.ndarray, int]:
    from gguf import GGMLQuantizationType
    arr = t.detach().to("cpu", _TORCH_FLOAT[type_name]).contiguous()
    return arr.view(torch.uint8).numpy(), int(GGMLQuantizationType[type_name])


def _quant_bytes(q: QTensor, where: str) -> tuple[np.ndarray, int]:
    fmt = get_format(q.format)
    if not hasattr(fmt, "ggml_type") or not hasattr(fmt, "to_bytes"):
        raise ExportError(f"{where}: format {q.format} has no GGUF equivalent")
    return fmt.to_bytes(q), int(fmt.ggml_type)


def _encoder_bytes(name: str, m: nn.Module) -> Optional[tuple[np.ndarray, int]]:
    """A layer's file bytes straight from its format's encoder, where that is what ``m.quantize()`` gives:
    k-quants (the reference rule on the weight, no stored parameters) and the legacy types under the
    ``dynamic`` observer, unfrozen (their parameters are the reference rule's too). None for the rest
    (stored, learned or frozen parameters; QLoRA layers, whose quantized weight is the merged one)."""
    q = m.weight_fake_quant
    if type(m) not in (FakeQuantLinear, FakeQuantEmbedding):
        return None
    if isinstance(q.fmt, KQuantFormat) or (isinstance(q.fmt, GGMLFormat) and q.observer == "dynamic" and not q._frozen):
        return q.fmt.quantize_bytes(m.weight.detach()), int(q.fmt.ggml_type)
    return None


def _check_gguf_compatible(model: nn.Module) -> None:
    problems = []
    for name, m in fake_quant_modules(model):
        fmt = m.weight_fake_quant.fmt
        if not hasattr(fmt, "ggml_type"):
            problems.append(f"{name}: {fmt.name}")
        elif getattr(m, "act_fake_quant", None) is not None:
            problems.append(f"{name}: activation quantization ({m.act_fake_quant.fmt.name}), which llama.cpp does not do")
    if problems:
        raise ExportError(
            "these layers have no GGUF equivalent:\n  " + "\n  ".join(problems)
            + "\nGGUF takes q8_0 q4_0 q4_1 q5_0 q5_1 and the k-quants; export integer schemes with "
            "--to compressed-tensors (or train with a GGUF scheme)."
        )


def _collect_tensors(model: nn.Module, arch: _Arch, hp: dict, float_type: str, progress: bool) -> list[_Tensor]:
    import gguf
    from tqdm.auto import tqdm

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)
    # every layer quantized and packed in one go, layers in parallel (see convert)
    packed = convert(model, threads=torch.get_num_threads(), pack=lambda name, q: _quant_bytes(q, name),
                     pack_layer=_encoder_bytes)

    # every (module-level) parameter, including a tied head's duplicate name
    params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if "_fake_quant." not in n]
    seen: dict[int, tuple[object, np.ndarray, int]] = {}
    out, problems = [], []
    for hf_name, p in tqdm(params, desc="Packing tensors", unit="tensor", disable=not progress):
        mod_name, _, kind = hf_name.rpartition(".")
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            problems.append(hf_name)
            continue
        q = packed.get(mod_name) if kind == "weight" else None
        # what this module's numbers are made from: the same quantized layer, or the same float conversion
        source = id(q) if q is not None else ("F32" if p.dim() == 1 else FLOAT_TYPES[float_type])
        if id(p) in seen and seen[id(p)][0] == source:
            continue  # tied weight, the same numbers: written once (llama.cpp falls back to token_embd)
        data, gtype = q if q is not None else _float_bytes(p, source)
        if id(p) in seen:  # tied weight: written once unless the two modules see different numbers
            _, first_data, first_type = seen[id(p)]
            if first_type == gtype and np.array_equal(first_data, data):
                continue
        else:
            seen[id(p)] = (source, data, gtype)
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _rope_permute(data, hp["n_head"])
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _rope_permute(data, hp["n_head_kv"])
        out.append(_Tensor(gguf_name, np.ascontiguousarray(data), gtype, p.numel()))
    if problems:
        raise ExportError(f"no GGUF name for {', '.join(problems)} in architecture {arch.gguf_arch}")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ExportError(f"two tensors map to the same GGUF name in {names}")
    return out


def _file_type(tensors: list[_Tensor], file_type: Optional[str]) -> int:
    """``general.file_type``: the given name, else the type holding most weight elements (2-D)."""
    from gguf import GGMLQuantizationType, LlamaFileType
    if file_type is not None:
        key = "ALL_F32" if file_type.lower() == "f32" else f"MOSTLY_{file_type.upper()}"
        if key not in LlamaFileType.__members__:
            raise ExportError(f"unknown GGUF file type {file_type!r}")
        return int(LlamaFileType[key])
    counts: dict[int, int] = {}
    for t in tensors:
        if t.data.ndim >= 2:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + t.numel
    top = GGMLQuantizationType(max(counts, key=counts.get)).name
    alias = {"F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}
    return int(LlamaFileType[alias.get(top, f"MOSTLY_{top}")])


# ---------------------------------------------------------------------------------------------------
# tokenizer side
# ---------------------------------------------------------------------------------------------------
def _tokenizer_json(tok) -> Optional[dict]:
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def detect_pre_tokenizer(tok) -> Optional[str]:
    """llama.cpp's pre-tokenizer name for a BPE tokenizer, or None if not recognised."""
    chk = hashlib.sha256(str(tok.encode(_PRE_PROBE)).encode()).hexdigest()
    if chk in _PRE_BY_HASH:
        return _PRE_BY_HASH[chk]
    # Not a known checkpoint: a plain GPT-2 byte-level pre-tokenizer behaves as llama.cpp's "gpt-2".
    pre = (_tokenizer_json(tok) or {}).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def _merges_from_json(tj: dict) -> Optional[list[str]]:
    """The BPE merges of a parsed tokenizer.json as ``gguf.SpecialVocab`` makes them ("a b", a space
    inside a token written as U+0120), by the same rules but without a Python loop per character;
    None where gguf's own parsing should decide."""
    merges = (tj.get("model") or {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return None
    first = merges[0]
    if isinstance(first, str):
        return merges
    if not (isinstance(first, list) and len(first) == 2 and isinstance(first[0], str)):
        return None
    if " " in "".join(map("".join, merges)):
        log.warning("Spaces in merges detected, encoding as %r", chr(ord(" ") + 256))
        return [" ".join([part.replace(" ", "\u0120") for part in pair]) for pair in merges]
    return list(map(" ".join, merges))


class _Vocab:
    """What the tokenizer contributes to the file, computed (and validated) before writing."""

    def __init__(self, tok, config, n_vocab: int, tokenizer_pre: Optional[str]):
        import gguf
        self.kind = self.pre = self.add_space_prefix = None
        self.tokens: list = []
        self.scores: Optional[list[float]] = None
        self.types: list[int] = []
        with tempfile.TemporaryDirectory(prefix="qat-tok-") as d:
            tok.save_pretrained(d)
            if config is not None:
                config.to_json_file(os.path.join(d, "config.json"))
            spm = Path(d, "tokenizer.model")
            vocab_file = getattr(tok, "vocab_file", None)
            if not spm.is_file() and vocab_file and str(vocab_file).endswith(".model") and Path(vocab_file).is_file():
                shutil.copy(vocab_file, spm)
            tok_json = Path(d, "tokenizer.json")
            # the file save_pretrained just wrote is the backend's own JSON: parse it once, here
            tj = json.loads(tok_json.read_bytes()) if tok_json.is_file() else _tokenizer_json(tok)
            model_type = (tj or {}).get("model", {}).get("type")
            if spm.is_file():
                self.kind = "llama"
                self._sentencepiece(gguf.vocab.SentencePieceVocab(Path(d)), n_vocab)
            elif model_type == "BPE" and tj["model"].get("byte_fallback"):
                self.kind = "llama"  # a SentencePiece BPE model as HF's fast tokenizer holds it
                self._sentencepiece_from_json(tok, tj, n_vocab)
            elif model_type == "BPE":
                self.kind = "gpt2"
                self.pre = tokenizer_pre or detect_pre_tokenizer(tok)
                if self.pre is None:
                    raise ExportError(
                        "the BPE pre-tokenizer of this tokenizer is not one llama.cpp knows by hash; pass "
                        "tokenizer_pre='<llama.cpp pre name>' (e.g. 'gpt-2', 'llama-bpe', 'smollm')")
                self._bpe(tok, n_vocab)
            else:
                raise ExportError(f"tokenizer model {model_type or type(tok).__name__!r} is not supported for GGUF "
                                  "(supported: GPT-2-style BPE, SentencePiece)")
            merges = _merges_from_json(tj) if self.kind == "gpt2" and tok_json.is_file() else None
            if merges is not None:
                # gguf would parse the 3.5 MB tokenizer.json again and convert the merges character by
                # character; give it the file without the model's vocab and merges, and the merges as
                # it would have converted them.
                tok_json.write_text(json.dumps({k: v for k, v in tj.items() if k != "model"}), encoding="utf-8")
            self.special = gguf.SpecialVocab(Path(d), load_merges=self.kind == "gpt2" and merges is None,
                                             n_vocab=n_vocab)
            if merges is not None:
                self.special.merges = merges
            # whether BOS/EOS are added, as the tokenizer itself does it (the config keys are often absent)
            probe = tok.encode("a")
            for kind, tid, at in (("bos", tok.bos_token_id, 0), ("eos", tok.eos_token_id, -1)):
                if tid is not None and probe:
                    self.special.add_special_token[kind] = probe[at] == tid
            if self.special.chat_template is None and getattr(tok, "chat_template", None):
                self.special.chat_template = tok.chat_template

    def _bpe(self, tok, n_vocab: int) -> None:
        from gguf import TokenType
        vocab = tok.get_vocab()
        if max(vocab.values()) >= n_vocab:
            raise ExportError(f"tokenizer has token id {max(vocab.values())} but the model only {n_vocab} embeddings")
        tokens: list = [None] * n_vocab
        for t, i in vocab.items():  # id -> token; the last token of a shared id wins
            tokens[i] = t
        types = [TokenType.NORMAL] * n_vocab
        decoder = tok.added_tokens_decoder
        for t in tok.get_added_vocab():
            i = vocab.get(t)
            if i is not None and tokens[i] == t:
                special = decoder[i].special if i in decoder else False
                types[i] = TokenType.CONTROL if special else TokenType.USER_DEFINED
        for i, t in enumerate(tokens):
            if t is None:
                tokens[i] = f"[PAD{i}]"
                types[i] = TokenType.UNUSED
        self.tokens, self.types = tokens, types

    def _sentencepiece(self, vocab, n_vocab: int) -> None:
        from gguf import TokenType
        self.scores = []
        for text, score, ttype in vocab.all_tokens():
            self.tokens.append(text)
            self.scores.append(score)
            self.types.append(ttype)
        if len(self.tokens) > n_vocab:
            raise ExportError(f"tokenizer has {len(self.tokens)} tokens but the model only {n_vocab} embeddings")
        for i in range(len(self.tokens), n_vocab):
            self.tokens.append(f"[PAD{i}]".encode())
            self.scores.append(-1000.0)
            self.types.append(TokenType.UNUSED)

    def _sentencepiece_from_json(self, tok, tj: dict, n_vocab: int) -> None:
        """SentencePiece BPE from tokenizer.json: a token's score is minus the rank of the merge that
        makes it, so llama.cpp's highest-score-first merging reproduces HF's lowest-rank-first BPE."""
        from gguf import TokenType
        model = tj["model"]
        rank = {}
        for r, m in enumerate(model.get("merges", [])):
            a, b = m if isinstance(m, list) else m.split(" ", 1)
            rank.setdefault(a + b, r)
        special_ids = set(tok.all_special_ids)
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
        reverse = {i: t for t, i in tok.get_vocab().items()}
        unk = model.get("unk_token")
        ptype = (tj.get("pre_tokenizer") or {})
        self.add_space_prefix = ptype.get("prepend_scheme", "first") != "never" if ptype.get("type") == "Metaspace" else None
        self.scores = []
        for i in range(n_vocab):
            t = reverse.get(i)
            if t is None:
                self.tokens.append(f"[PAD{i}]"); self.scores.append(-1000.0); self.types.append(TokenType.UNUSED)
                continue
            if t == unk:
                ttype = TokenType.UNKNOWN
            elif i in special_ids or (i in added and added[i].get("special")):
                ttype = TokenType.CONTROL
            elif i in added:
                ttype = TokenType.USER_DEFINED
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                ttype = TokenType.BYTE
            else:
                ttype = TokenType.NORMAL
            self.tokens.append(t)
            self.scores.append(-float(rank[t]) if t in rank else 0.0)
            self.types.append(ttype)

    def add_to(self, w) -> None:
        w.add_tokenizer_model(self.kind)
        w.add_tokenizer_pre(self.pre or "default")
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(w, quiet=True)


# ---------------------------------------------------------------------------------------------------
# file side
# ---------------------------------------------------------------------------------------------------
def _pack_array(val, sub_type) -> Optional[bytes]:
    """A GGUF metadata array (element type, count, elements) in one go, bytes identical to
    ``GGUFWriter._pack_val``, which packs the 49k tokens and 49k merges of a vocabulary one
    ``struct.pack`` at a time. None where the array is not a plain list of strings, ints or floats."""
    from gguf import GGUFValueType as VT
    if not isinstance(val, (list, tuple)) or not val or sub_type not in (None, VT.STRING):
        return None
    n, kinds = len(val), set(map(type, val))
    if kinds <= {str, bytes}:
        enc = [v.encode("utf-8") if type(v) is str else v for v in val]
        lens = np.fromiter(map(len, enc), dtype="<u8", count=n)
        out = np.empty(8 * n + int(lens.sum()), dtype=np.uint8)
        starts = np.arange(n, dtype=np.int64) * 8
        starts[1:] += np.cumsum(lens[:-1], dtype=np.int64)
        at = starts[:, None] + np.arange(8)  # where each length goes; the strings fill the rest
        payload = np.ones(len(out), dtype=bool)
        payload[at] = False
        out[at] = lens.view(np.uint8).reshape(n, 8)
        out[payload] = np.frombuffer(b"".join(enc), dtype=np.uint8)
        return struct.pack("<IQ", VT.STRING, n) + out.tobytes()
    if sub_type is not None:
        return None
    if all(issubclass(k, int) and not issubclass(k, bool) for k in kinds):  # IntEnum token types too
        ints = np.fromiter(val, dtype=np.int64, count=n)
        if ints.min() < -(2**31) or ints.max() >= 2**31:
            return None  # struct.pack's error, from the general path
        return struct.pack("<IQ", VT.INT32, n) + ints.astype("<i4").tobytes()
    if all(issubclass(k, float) for k in kinds):
        f64 = np.fromiter(val, dtype=np.float64, count=n)
        with np.errstate(over="ignore"):
            f32 = f64.astype("<f4")
        if not np.isfinite(f32).all():
            return None  # inf, nan and fp32 overflow (an error in struct.pack) take the general path
        return struct.pack("<IQ", VT.FLOAT32, n) + f32.tobytes()
    return None


@functools.lru_cache(maxsize=None)
def _writer_class():
    import gguf

    class Writer(gguf.GGUFWriter):
        """gguf's writer, with metadata arrays packed in bulk (see ``_pack_array``)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE:
                body = _pack_array(val, sub_type)
                if body is not None:
                    return (struct.pack("<I", vtype) if add_vtype else b"") + body
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


@contextmanager
def _gc_paused():
    """The vocabulary makes a few hundred thousand small objects and no garbage cycles; a full
    collection triggered by them walks the whole model and costs a quarter of a second at random."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """Accept a LightningModule (or any wrapper) holding the HF model as ``.model``."""
    while getattr(model, "config", None) is None and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return model


@torch.no_grad()
def export_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, float_type: str = "f16",
                force: bool = False, file_type: Optional[str] = None, tokenizer_pre: Optional[str] = None,
                name: Optional[str] = None, progress: bool = True) -> Path:
    """Write ``model`` (prepared with a GGUF scheme, or plain float) and its tokenizer to ``path``.

    float_type:    how layers the plan left in float are stored: ``f32``, ``f16`` or ``bf16``
                   (1-D tensors, norms and biases, are always F32, as llama.cpp expects).
    file_type:     ``general.file_type`` by name (``q4_k_m`` ...); default: the dominant tensor type.
    tokenizer_pre: llama.cpp's pre-tokenizer name for a BPE tokenizer it cannot recognise by hash.
    Returns the path written. Raises ExportError, before writing anything, for an unsupported model,
    scheme, tokenizer or output path.
    """
    import gguf
    model = _unwrap(model)
    float_type = float_type.lower()
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    check_output(path, force)
    hf_arch, arch = _arch_of(model)
    config = model.config
    hp = _hparams(config)
    _check_gguf_compatible(model)
    with _gc_paused():
        n_vocab = model.get_input_embeddings().weight.shape[0]
        vocab = _Vocab(tokenizer, config, n_vocab, tokenizer_pre)
        tensors = _collect_tensors(model, arch, hp, float_type, progress)
        ftype = _file_type(tensors, file_type)

        with atomic_file(path, force) as tmp:
            w = _writer_class()(tmp, arch.gguf_arch)
            w.add_type(gguf.GGUFType.MODEL)
            w.add_name(name or Path(getattr(config, "_name_or_path", "") or hf_arch).name)
            w.add_string("general.quantized_by", "qat")
            w.add_vocab_size(n_vocab)
            w.add_context_length(config.max_position_embeddings)
            w.add_embedding_length(config.hidden_size)
            w.add_block_count(config.num_hidden_layers)
            w.add_feed_forward_length(config.intermediate_size)
            w.add_head_count(hp["n_head"])
            w.add_head_count_kv(hp["n_head_kv"])
            w.add_rope_dimension_count(hp["head_dim"])
            if hp["head_dim"] != config.hidden_size // hp["n_head"]:
                w.add_key_length(hp["head_dim"])
                w.add_value_length(hp["head_dim"])
            w.add_rope_freq_base(hp["theta"])
            if hp["rope_linear"] is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(hp["rope_linear"])
            w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
            w.add_file_type(ftype)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            vocab.add_to(w)
            for t in tensors:
                w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
            try:
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file(progress=progress)
            finally:
                w.close()
    return Path(path).expanduser().absolute()
