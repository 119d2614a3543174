"""The host (Python) time the fake quant adds to an eager step, on a CPU: a 30-layer Llama of width 64
(210 quantized layers, as SmolLM2), bf16 and qat variants interleaved in one process. The group's kernel
result is computed once and reused, and the masking backward is skipped: their numbers are not the point,
the per-layer bookkeeping around them is. Needs Triton's interpreter for the group path:

    PYTHONPATH=<triton site> TRITON_INTERPRET=1 python bench/host_overhead.py bf16,q4_0,q4_k_m [ROUNDS=6] [PROF=q4_0]
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qat  # noqa: E402
from qat.kernels import batch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
batch.KQ_ON_CPU = True
cache = {}
orig = batch.BatchedFakeQuant._compute
def fake_compute(self, qs, weights):
    k = (qs[0].fmt.name, len(qs))
    if k not in cache:
        cache[k] = orig(self, qs, weights)
    outs, extra = cache[k]
    return [o.detach() for o in outs], extra
batch.BatchedFakeQuant._compute = fake_compute
batch._mask_grads = lambda grads, mask, tab: None
steps = {}
for v in sys.argv[1].split(","):
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if v != "bf16":
        qat.prepare(m, v)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    ids = torch.randint(0, 256, (1, 8))
    def step(m=m, opt=opt, ids=ids):
        m(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3): step()
    steps[v] = (step, [])
for r in range(int(os.environ.get("ROUNDS", 6))):
    for v, (step, ts) in steps.items():
        for _ in range(10):
            t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
base = statistics.median(steps["bf16"][1])
for v, (step, ts) in steps.items():
    print(f"{v:8} {statistics.median(ts)*1e3:7.2f} ms  +{(statistics.median(ts)-base)*1e3:6.2f}")
if os.environ.get("PROF"):
    import cProfile, pstats
    step = steps[os.environ["PROF"]][0]
    pr = cProfile.Profile(); pr.enable()
    for _ in range(20): step()
    pr.disable(); pstats.Stats(pr).strip_dirs().sort_stats("tottime").print_stats(40)
