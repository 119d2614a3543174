import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_qat_llama(scheme, device="cpu", dtype=torch.float32, rules=None, observer="dynamic", tie=False, hidden=64,
                   inter=128):
    """``tiny_llama`` (2 layers, seed 0) prepared with ``scheme``, on ``device`` in ``dtype``, in train mode."""
    import qat

    m = tiny_llama(vocab=256, hidden=hidden, inter=inter, layers=2, tie=tie)
    qat.prepare(m, scheme, rules=rules, observer=observer)
    return m.to(device=device, dtype=dtype).train()


def reference_fake_quant(w, fmt):
    """The eager reference rule on ``w``: ``(scale, zero, raw codes, clamped codes, w_hat in w's dtype)``."""
    from qat.formats.base import to_blocks

    blocks = to_blocks(w, fmt.block)
    scale, zero = fmt.choose_params(blocks)
    raw = fmt.raw_codes(blocks, scale, zero)
    codes = fmt.clamp_codes(raw)
    return scale, zero, raw, codes, fmt.decode(codes, scale, zero).reshape(w.shape).to(w.dtype)


def assert_same_run(a: dict, b: dict, what, state=True) -> None:
    """Two training runs' records (``losses``, per-step ``grads``, eval ``logits``, final ``state``) are equal
    bitwise; ``state=False`` leaves the state out."""
    assert all(torch.equal(x, y) for x, y in zip(a["losses"], b["losses"])), (what, "losses", a["losses"], b["losses"])
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        assert ga.keys() == gb.keys(), (what, step, set(ga) ^ set(gb))
        bad = [n for n in ga if not torch.equal(ga[n], gb[n])]
        assert not bad, (what, "grads differ at step", step, bad[:5])
    assert torch.equal(a["logits"], b["logits"]), (what, "eval logits")
    if state:
        assert a["state"].keys() == b["state"].keys()
        bad = [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
        assert not bad, (what, "state", bad[:5])


@pytest.fixture(autouse=True)
def _our_kquant_encoder(monkeypatch):
    """K-quants are encoded by qat's own implementation in every test (that is what the numerics tests
    judge against llama.cpp); tests of llama.cpp's encoder path (test_llama_encoder.py) switch it on."""
    monkeypatch.setenv("QAT_GGML_QUANTIZE", "0")


@pytest.fixture
def one_thread():
    """Tiny tensors and matmuls: one thread is faster, and much faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def llama():
    return tiny_llama()


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import llama_cpp  # noqa: F401
        has_llama = True
    except Exception:
        has_llama = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "llama" in item.keywords and not has_llama:
            item.add_marker(pytest.mark.skip(reason="needs llama-cpp-python"))


def run_interpreted(call: str, done: str, timeout: int = 900) -> None:
    """Run ``call`` (Python statements, with tests/ importable) in a subprocess under Triton's CPU
    interpreter (``TRITON_INTERPRET`` is read when triton is imported, hence the subprocess); it must exit
    0 and print ``done``. Skipped where triton is not installed (CI's CPU-only torch)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    code = f"import sys; sys.path.insert(0, {str(root / 'tests')!r}); {call}"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert done in r.stdout
