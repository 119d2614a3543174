"""Training-step time and peak memory: bf16 vs qat fake quant vs torchao QAT, side by side in one process.

    python bench/speed.py --model smollm2 --batch 8 --seq 2048 --out bench/results/speed_smollm2.json
    python bench/speed.py --model llama1b --batch 4 --seq 2048
    python bench/speed.py --rounds 5 ...   # step times re-measured with the variants interleaved

Interleaving evens out machine drift for eager steps. Compiled models alternating every few steps cost QAT
more than bf16, though: on an H200, SmolLM2 `q4_0` measured 1.031x sequential and 1.115x interleaved in one
run (BENCHMARKS.md, session 7). So read compiled rows from the sequential pass (``ms_sequential`` in the
JSON once ``--rounds`` is given).

Random init (speed needs no trained weights), pure bf16 weights and fused AdamW, as in the torchao
reference table of issue 7. Each variant runs ``--warmup`` steps, then ``--steps`` timed with CUDA events
(median reported). Prints a table and writes JSON. In the table each row's ``x bf16`` is against the nearest
bf16 row before it (``--variants bf16,X,bf16,X`` gives side-by-side pairs), and ``host ms`` is how long Python
took to queue the step (near ``ms/step``: the GPU waited for the host; ``host_ms_per_step`` in the JSON).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import release, time_pipelined, time_steps, write_json  # noqa: E402

MODELS = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}


def build(model_name: str, variant: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, **MODELS[model_name])
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    if variant.startswith("qat:"):
        import qat
        qat.prepare(model, variant.split(":", 1)[1])
    elif variant == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
        quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True),
                                   step="prepare"))
    return model


def profiled_step(model_name: str, variant: str, batch: int, seq: int, device: str, compiled: bool = False):
    """``(model, step)`` for the profiling scripts: ``variant`` built as here, fused AdamW (on CUDA), one
    fixed random batch; ``step()`` runs forward, backward, the optimizer step and zero_grad."""
    model = build(model_name, variant, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    f = torch.compile(model) if compiled else model
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    cache = callback_setup(model, opt)

    def step():
        batch_start(cache)
        f(input_ids=ids, labels=ids).loss.backward()
        optimizer_step(opt, cache)

    return model, step


def batch_start(cache) -> None:
    """With a step cache, what ``QATCallback.on_train_batch_start`` does: ``refresh_if_stale``, which finds
    nothing to do after ``optimizer_step``'s refresh (its host time is what the callback costs there)."""
    if cache is not None:
        cache.refresh_if_stale()


def optimizer_step(opt, cache) -> None:
    """The optimizer step and zero_grad; with a step cache, its ``flush`` before and ``refresh_if_stale``
    after (the callback's ``on_train_batch_end``: the refresh's host work overlaps the optimizer's kernels, and
    its launches go to a side stream that the next ``batch_start`` waits for; ``+no-overlap``: the current one)."""
    if cache is not None:
        cache.flush()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cache is not None:
        cache.refresh_if_stale(overlap=True)


def callback_setup(model, opt):
    """What ``QATCallback`` sets up around ``opt`` at fit start, for a ``qat:`` row. Always: the floor on Adam's
    second moments of the fake-quantized weights (``qat/adam_floor.py``; ``+no-floor``: not). With
    ``QAT_STEP_CACHE=1`` (the ``+step-cache`` suffix): a filled ``qat.step_cache.StepCache`` for ``model``,
    watching ``opt``, returned; the step then calls ``flush`` before the optimizer step and
    ``refresh_if_stale`` after it and before the forward, as the callback does with its default on one GPU.
    Otherwise None: a ``qat:`` row without the suffix is fake quant in every forward (the callback with
    ``step_cache=False``, or under DDP/FSDP)."""
    from qat.adam_floor import attach_floor
    from qat.modules import is_fake_quant

    # as the callback, with or without the cache (``+no-floor``: without): qat/adam_floor.py
    attach_floor(opt, [m.weight for m in model.modules() if is_fake_quant(m)])
    if os.environ.get("QAT_STEP_CACHE") != "1":
        return None
    from qat.step_cache import StepCache

    cache = StepCache(model)
    cache.watch(opt)  # as the callback: fused AdamW's steps leave the weights' versions as they were
    cache.refresh()
    return cache


# variant suffixes: the environment switch each one sets for its variant
SWITCHES = {
    "+eager-torch": ("QAT_DISABLE_TRITON", "1"),  # our eager PyTorch path on GPU, without the fused kernel
    "+per-layer": ("QAT_BATCHED_FQ", "0"),  # one kernel launch per layer (what DDP/FSDP and compile use)
    "+torch-search": ("QAT_GGML_QUANTIZE", "0"),  # k-quants: our torch search on the GPU, not llama.cpp's C encoder
    "+recompute": ("QAT_RECOMPUTE", "1"),  # w_hat and the clip mask recomputed in the backward, not kept
    "+no-recompute": ("QAT_RECOMPUTE", "0"),  # the matmul keeps w_hat and the STE its mask until the backward
    "+step-cache": ("QAT_STEP_CACHE", "1"),  # w_hat once per optimizer step (qat/step_cache.py), as QATCallback(step_cache=True)
    "+no-pack": ("QAT_STEP_CACHE_PACK", "0"),  # with +step-cache: large layers recompute w_hat, not unpack 4-bit codes
    "+no-overlap": ("QAT_STEP_CACHE_OVERLAP", "0"),  # with +step-cache: the refresh on the current stream, not a side one
    "+compile-group": ("QAT_COMPILE_GROUP", "1"),  # compiled: every layer's fake quant in one op (kernels/batch.py)
    "+no-floor": ("QAT_ADAM_FLOOR", "0"),  # Adam's zero second moments left as they are (qat/adam_floor.py)
}


def apply_switches(variant: str) -> str:
    """Sets the environment switches of ``variant``'s suffixes (and clears the others); returns the variant
    without them (what ``build`` takes)."""
    for k in SWITCHES.values():
        os.environ.pop(k[0], None)
    variant_build, found = variant, True
    while found:  # suffixes combine, in any order
        found = [s for s in SWITCHES if variant_build.endswith(s)]
        for suffix in found[:1]:
            os.environ[SWITCHES[suffix][0]] = SWITCHES[suffix][1]
            variant_build = variant_build.removesuffix(suffix)
    return variant_build


def run_variant(args, variant: str, compiled: bool, keep: dict | None = None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.model, apply_switches(variant), device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    step_fn = model
    if compiled:
        step_fn = torch.compile(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    env = {k: os.environ.get(k) for k, _ in SWITCHES.values()}
    cache = callback_setup(model, opt)

    def step():
        for k, v in env.items():  # interleaved variants each keep their own switches
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        batch_start(cache)
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer_step(opt, cache)
        return loss

    if keep is not None:  # interleaved timing: the caller runs the steps
        for _ in range(args.warmup):
            step()
        keep[variant] = (step, model, opt)
        return {}
    host: list[float] = []
    times, peak = time_steps(step, args.warmup, args.steps, device, host=host)
    peak = peak / 2**30 if device == "cuda" else float("nan")
    ms = statistics.median(times)
    res = dict(model=args.model, variant=variant, compiled=compiled, batch=args.batch, seq=args.seq,
               ms_per_step=ms, host_ms_per_step=statistics.median(host),
               tokens_per_s=args.batch * args.seq / (ms / 1e3), peak_gib=peak,
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    if getattr(args, "pipelined", False):
        # the median of a few rounds: one round's mean keeps any slow step it happens to contain (a ~10 ms one
        # came every few steps in session 16's profiles, in both variants)
        rounds = [time_pipelined(step, args.steps, device, finish=cache.wait if cache is not None else None)
                  for _ in range(max(1, getattr(args, "pipelined_rounds", 1)))]
        res["ms_pipelined"], res["ms_pipelined_rounds"] = statistics.median(rounds), rounds
    if cache is not None:
        cache.close()  # frees its buffers (the packed codes) before the next variant measures its peak
    del model, opt, step_fn, cache, step
    release(device)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="bf16,qat:int4_w_g32,qat:q4_0,torchao")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--rounds", type=int, default=0,
                   help="then time all variants again, interleaved, in this many rounds (memory stays from the sequential pass)")
    p.add_argument("--pipelined", action="store_true",
                   help="also time --steps steps queued back to back with one sync at the end (ms_pipelined: a "
                        "loop that never reads the loss; ms/step ends every step on the host, as one that does)")
    p.add_argument("--pipelined-rounds", type=int, default=3,
                   help="with --pipelined: this many such rounds, ms_pipelined their median")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for mode in args.modes.split(","):
        for v in args.variants.split(","):
            try:
                r = run_variant(args, v, mode == "compile")
            except Exception as e:  # keep the other rows
                r = dict(model=args.model, variant=v, compiled=mode == "compile", error=repr(e)[:300])
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                write_json(args.out, rows)
    if args.rounds:
        # All variants of a mode held at once and timed in alternation (round r: each variant runs
        # --steps steps): machine drift (clocks, other jobs) then hits every variant alike.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for mode in args.modes.split(","):
            keep: dict = {}
            for v in args.variants.split(","):
                run_variant(args, v, mode == "compile", keep)
            times = {v: [] for v in keep}
            for _ in range(args.rounds):
                for v, (step, _, _) in keep.items():
                    t, _ = time_steps(step, 0, args.steps, device)
                    times[v] += t
            for r in rows:
                if r["compiled"] == (mode == "compile") and r["variant"] in times:
                    r["ms_sequential"] = r.get("ms_per_step")
                    r["ms_per_step"] = statistics.median(times[r["variant"]])
                    r["tokens_per_s"] = args.batch * args.seq / (r["ms_per_step"] / 1e3)
                    r["timing"] = f"interleaved, {args.rounds} rounds x {args.steps} steps, median"
            del keep
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None
            if args.out:
                write_json(args.out, rows)
    # ratios against the nearest bf16 row before (the first one after it where none is before): with
    # --variants bf16,X,bf16,X each X gets the bf16 run next to it (side-by-side pairs); "host ms" is the
    # time Python took to queue the step: near "ms/step", the GPU waited for the host
    print(f"\n{'mode':8} {'variant':26} {'ms/step':>9} {'x bf16':>7} {'host ms':>8} {'tok/s':>10} {'peak GiB':>9} "
          f"{'x bf16':>7}")
    for mode in args.modes.split(","):
        ok = [r for r in rows if r["compiled"] == (mode == "compile") and "error" not in r]
        base = next((r for r in ok if r["variant"] == "bf16"), None)
        for r in rows:
            if r["compiled"] != (mode == "compile"):
                continue
            if "error" in r:
                print(f"{mode:8} {r['variant']:26} error: {r['error'][:80]}")
                continue
            if r["variant"] == "bf16":
                base = r
            rt = r["ms_per_step"] / base["ms_per_step"] if base else float("nan")
            rm = r["peak_gib"] / base["peak_gib"] if base else float("nan")
            hm = r.get("host_ms_per_step", float("nan"))
            pipe = ""
            if "ms_pipelined" in r and base and "ms_pipelined" in base:
                pipe = f"   pipelined {r['ms_pipelined']:.1f} ms, {r['ms_pipelined'] / base['ms_pipelined']:.3f}x"
            print(f"{mode:8} {r['variant']:26} {r['ms_per_step']:9.1f} {rt:7.3f} {hm:8.1f} {r['tokens_per_s']:10.0f} "
                  f"{r['peak_gib']:9.2f} {rm:7.3f}{pipe}")


if __name__ == "__main__":
    main()
