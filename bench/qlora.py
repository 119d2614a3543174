"""QLoRA step time and peak memory: plain peft + bitsandbytes vs QLoRA-QAT (``qat.qlora``), side by side.

    python bench/qlora.py --batch 8 --seq 2048 --out bench/results/qlora_smollm2.json            # eager
    python bench/qlora.py --batch 8 --seq 2048 --compile --out bench/results/qlora_smollm2_compile.json
    python bench/qlora.py --model tiny --batch 2 --seq 64 --warmup 1 --steps 2                      # CPU smoke run

Both arms get the same model and settings: random-init SmolLM2-135M config, bitsandbytes NF4 with double
quant, bf16 compute on GPU (fp32 on CPU) under bf16 autocast, ``qat.qlora.prepare_kbit``, LoRA r=16 (alpha 32)
on every linear layer but the head, AdamW on the adapters. The ``qat`` arm adds fake quant of the merged
weight, ``fake_quant(dequant_nf4(W) + s * B @ A)``, under ``--scheme``. Each arm runs ``--warmup`` steps,
then ``--steps`` timed (CUDA events; median reported); peak memory is ``torch.cuda.max_memory_allocated``
over the timed steps (on CPU: peak process RSS, sampled). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import release, time_steps  # noqa: E402
from bench.speed import MODELS as SPEED_MODELS  # noqa: E402

MODELS = {
    "smollm2": SPEED_MODELS["smollm2"],  # the same config as the full-QAT speed benchmark
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def build(args, arm: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qat.qlora import QLoRAConfig, load_qlora, prepare_qlora

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(max_position_embeddings=max(4096, args.seq), use_cache=False, **MODELS[args.model])
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model = load_qlora(model, QLoRAConfig(r=args.r, alpha=2 * args.r, dropout=0.0,
                                          gradient_checkpointing=args.gradient_checkpointing))
    if arm.startswith("qat:"):
        prepare_qlora(model, arm.split(":", 1)[1])
    return model.train()


def run_arm(args, arm: str, compiled: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args, arm, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=device == "cuda")
    step_fn = torch.compile(model) if compiled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" and args.autocast else nullcontext()
    g = torch.Generator(device).manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device, generator=g)
    losses = []

    def step():
        with autocast:
            loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read after timing: no extra sync per step

    times, peak = time_steps(step, args.warmup, args.steps, device)
    res = dict(arm=arm, compiled=compiled, model=args.model, batch=args.batch, seq=args.seq, r=args.r,
               gradient_checkpointing=args.gradient_checkpointing, ms_per_step=statistics.median(times),
               ms_per_step_all=times, peak_gib=peak / 2**30, peak_kind="cuda_allocated" if device == "cuda" else "rss",
               trainable_params=sum(p.numel() for p in params), losses=[float(x) for x in losses],
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    del model, opt, step_fn, params
    release(device)
    return res


def table(rows: list[dict]) -> str:
    lines = [f"{'mode':8} {'arm':16} {'ms/step':>9} {'x peft':>7} {'peak GiB':>9} {'x peft':>7}  loss first -> last"]
    for compiled in sorted({r["compiled"] for r in rows}):
        mode = "compile" if compiled else "eager"
        base = next((r for r in rows if r["arm"] == "peft" and r["compiled"] == compiled and "error" not in r), None)
        for r in (r for r in rows if r["compiled"] == compiled):
            if "error" in r:
                lines.append(f"{mode:8} {r['arm']:16} error: {r['error'][:100]}")
                continue
            rt = r["ms_per_step"] / base["ms_per_step"] if base else float("nan")
            rm = r["peak_gib"] / base["peak_gib"] if base else float("nan")
            lines.append(f"{mode:8} {r['arm']:16} {r['ms_per_step']:9.1f} {rt:7.3f} {r['peak_gib']:9.2f} {rm:7.3f}  "
                         f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--scheme", default="q4_0", help="QAT arm's export scheme (q4_0, int4_w_g128, q4_k_m ...)")
    p.add_argument("--arms", default=None, help="comma-separated; default: peft,qat:<scheme>")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")
    p.add_argument("--modes", default=None, help="eager,compile to run both in one process")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="GPU: no bf16 autocast")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="qlora_bench.json")
    args = p.parse_args()
    arms = (args.arms or f"peft,qat:{args.scheme}").split(",")
    modes = (args.modes or ("compile" if args.compile else "eager")).split(",")

    import bitsandbytes
    import peft
    meta = dict(torch=torch.__version__, bitsandbytes=bitsandbytes.__version__, peft=peft.__version__,
                command=" ".join(sys.argv), config=MODELS[args.model])
    rows = []
    for mode in modes:
        for arm in arms:
            try:
                r = run_arm(args, arm, mode == "compile")
            except Exception as e:  # keep the other rows
                r = dict(arm=arm, compiled=mode == "compile", error=repr(e)[:300])
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("ms_per_step_all", "losses")}), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(dict(meta, results=rows), indent=1))
    print()
    print(table(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
