"""QLoRA quality after export: held-out perplexity, measured by llama.cpp on the exported GGUF files, of
QLoRA as users run it today vs QLoRA-QAT (issue 6). SmolLM2-135M on Shakespeare, with bench/quality.py's
data, split, tokenization, evaluation windows and seeded batch order.

    python bench/qlora_quality.py --schemes q4_0,q4_k_m --steps 500 --batch 16 --seq 512 --lr 2e-4 --threads 16 \
        --variants qlora,qat:dynamic --out bench/results/qlora_quality.json

Split over processes (1 GPU, 16 cores; with two GPUs give one of them ``--device cuda:1``), then merge:

    W=bench/results/ql; mkdir -p $W; C="--steps 500 --batch 16 --seq 512 --lr 2e-4 --threads 5 --workdir /tmp/qlora-gguf"
    python bench/qlora_quality.py $C --schemes q4_0,q4_k_m --variants qlora --out $W/qlora.json > $W/qlora.log 2>&1 &
    python bench/qlora_quality.py $C --schemes q4_0 --variants qat:dynamic --out $W/qat_q4_0.json > $W/qat_q4_0.log 2>&1 &
    python bench/qlora_quality.py $C --schemes q4_k_m --variants qat:dynamic --out $W/qat_q4_k_m.json > $W/qat_q4_k_m.log 2>&1 &
    wait; python bench/qlora_quality.py --merge $W/qlora.json $W/qat_q4_0.json $W/qat_q4_k_m.json --out $W/all.json

Every arm: a bitsandbytes NF4 (double quant) base built from the same float weights (``qat.qlora.load_qlora``;
bf16 compute on GPU, fp32 on CPU, bf16 autocast on GPU), peft LoRA r=16 alpha=32 on every Linear but
lm_head (adapters initialised from one seed), AdamW on the adapters, the same batches in the same order.

Variant ``qlora`` (no fake quant) gives, per scheme:
  ``a:fp-merge>llama.cpp``   what users do: adapters merged onto the ORIGINAL float weights (W + s*B@A), F16
                             GGUF, then llama.cpp's quantizer (``llama_model_quantize``) to the scheme;
  ``a2:nf4-merge>llama.cpp`` the adapters merged onto dequant_nf4(W) (``merge_qlora`` without a scheme), F16,
                             then llama.cpp's quantizer: how much of (a)'s loss is the merge onto float weights;
and once, without export quantization (F16 files): ``ref:nf4+lora`` (dequant_nf4(W) + s*B@A: the model as
trained) and ``ref:fp+lora`` ((a) before quantization).
Variant ``qat:<observer>[@lr=..,start=..]`` gives ``b:qat:<observer>...``: QLoRA-QAT (``prepare_qlora(model,
scheme)`` before training), merged with ``merge_qlora`` and written by ``export_gguf`` (the codes training used).
Options as in bench/quality.py (``mse``/``learned`` for the 32-block types only, not for k-quant mixes).

Token embedding (tied to lm_head) F16 in every file; llama.cpp's PTQ keeps it F16 too. The torch perplexity of
a llama.cpp-quantized file is its weights loaded back with transformers. ``vs a``: relative perplexity
change against (a).
Rows are printed and appended to ``<out>.jsonl`` as they come; ``<out>`` (JSON) is written at the end.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import llama_quantize, read_rows  # noqa: E402
from bench.quality import (KEEP_FLOAT, Bench, Variant, announce, common_parser, device_name,  # noqa: E402
                           empty_cache, error_row, load_base, load_data, open_bench, run_arms, smollm2_gguf,
                           start_run, train, write_results)

REF = "ref:nf4+lora"


def qlora_model(base, args, device: str):
    """NF4 (double quant) base from ``base``'s float weights plus LoRA adapters, seeded: every arm starts
    from the same adapters."""
    from qat.qlora import QLoRAConfig, load_qlora
    model = copy.deepcopy(base).to(device)
    torch.manual_seed(args.seed)
    return load_qlora(model, QLoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout))


@torch.no_grad()
def merge_onto_float(peft_model, base) -> torch.nn.Module:
    """What users do: a copy of the float model with every adapter merged onto its ORIGINAL float weight,
    ``W + (scaling * B) @ A`` in fp32 (the formula of ``qat.qlora.merged_weight``, with W in place of
    dequant_nf4(W))."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    merged = copy.deepcopy(base)  # fp32 (no .float(): transformers refuses it on a model loaded from GGUF)
    n = 0
    for name, m in peft_model.get_base_model().named_modules():
        if not isinstance(m, LoraLinear4bit):
            continue
        target = merged.get_submodule(name)
        w = target.weight.detach().float().to(m.lora_A[m.active_adapters[0]].weight.device)
        with torch.autocast(w.device.type, enabled=False):
            for ad in m.active_adapters:
                if ad in m.lora_A:
                    a, b = m.lora_A[ad].weight, m.lora_B[ad].weight
                    w = w + (b.float() * m.scaling[ad]) @ a.float()
        target.weight = torch.nn.Parameter(w.cpu(), requires_grad=False)
        n += 1
    if n == 0:
        raise RuntimeError("no LoRA-on-NF4 layer found to merge")
    return merged


def run_qlora(bench: Bench, base, blocks, schemes: list[str]) -> None:
    """The plain QLoRA arm: train once; two F16 references; llama.cpp PTQ of both merges per scheme."""
    from qat.qlora import merge_qlora
    a = bench.args
    model = qlora_model(base, a, bench.device)
    seconds = round(train(model, blocks, a, bench.device, "qlora", a.lr), 1)
    common = dict(train_s=seconds, steps=a.steps, tokens=a.steps * a.batch * a.seq, lr=a.lr)
    fp = merge_onto_float(model, base)
    nf4 = merge_qlora(model).cpu()  # (on the training device: the bits the forward used)
    del model
    empty_cache(bench.device)
    sources = {}
    for label, merged, what in ((REF, nf4, "dequant_nf4(W) + s*B@A, F16"),
                                ("ref:fp+lora", fp, "W + s*B@A, F16")):
        try:
            f16 = bench.export(merged, f"{label}.F16")
            sources[label] = f16
            bench.row(dict(model=label, scheme=None, kind="ref", what=what, **common), f16, merged)
        except Exception as e:
            error_row(bench.log, label, None, e)
    for scheme in schemes:
        for label, src, what in (("a:fp-merge>llama.cpp", "ref:fp+lora", "W + s*B@A -> F16 -> llama_model_quantize"),
                                 ("a2:nf4-merge>llama.cpp", REF, "dequant_nf4(W) + s*B@A -> F16 -> llama_model_quantize")):
            try:
                t0 = time.time()
                path = llama_quantize(sources[src], bench.path(f"{label}_{scheme}"), scheme, a.threads)
                print(f"llama.cpp quantized {path.name} ({time.time() - t0:.0f}s)", flush=True)
                bench.row(dict(model=label, scheme=scheme, kind="ptq", what=what, **common), path, torch_from_file=True)
            except Exception as e:
                error_row(bench.log, label, scheme, e)


def run_qat(bench: Bench, base, blocks, v: Variant, scheme: str) -> None:
    from qat.qlora import merge_qlora, prepare_qlora
    a = bench.args
    model = qlora_model(base, a, bench.device)
    prepare_qlora(model, scheme, rules=KEEP_FLOAT, observer=v.observer)
    label = f"b:{v.label}"
    seconds = train(model, blocks, a, bench.device, f"{label} {scheme}", v.lr, v.start)
    merged = merge_qlora(model)  # on the training device; FakeQuantLinear where the scheme applies
    path = bench.export(merged, f"{label}_{scheme}")
    bench.row(dict(model=label, scheme=scheme, kind="qat", what="QLoRA-QAT, merge_qlora, export_gguf",
                   observer=v.observer, lr=v.lr, start=v.start, train_s=round(seconds, 1), steps=a.steps,
                   tokens=a.steps * a.batch * a.seq), path, merged)


# -- results --------------------------------------------------------------------------------------------------

def add_comparisons(rows: list[dict]) -> None:
    """Per scheme: the relative perplexity change against (a), for llama.cpp's and torch's perplexity."""
    for r in rows:
        a = next((x for x in rows if x.get("model") == "a:fp-merge>llama.cpp" and x.get("scheme") == r.get("scheme")
                  and "error" not in x), {})
        for k in ("llamacpp", "torch"):
            x, pa = r.get(f"ppl_{k}", float("nan")), a.get(f"ppl_{k}", float("nan"))
            r[f"vs_a_{k}"] = x / pa - 1 if pa and not math.isnan(pa) else float("nan")


def order(rows: list[dict]) -> list[dict]:
    rank = lambda m: next((i for i, p in enumerate((REF, "ref:", "a:", "a2:", "b:")) if m.startswith(p)), 9)  # noqa: E731
    return sorted(rows, key=lambda r: (r.get("scheme") or "", rank(r.get("model") or ""), r.get("model") or ""))


def table(rows: list[dict]) -> str:
    pct = lambda x: "" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"  # noqa: E731
    lines = [f"{'scheme':8} {'arm':26} {'ppl llama.cpp':>14} {'vs a':>8} {'ppl torch':>10} {'vs a':>8} "
             f"{'MiB':>6} {'train s':>8}"]
    for r in order(rows):
        head = f"{r.get('scheme') or '-':8} {r.get('model', '?'):26}"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:100]}")
            continue
        lines.append(f"{head} {r.get('ppl_llamacpp', float('nan')):14.3f} {pct(r.get('vs_a_llamacpp')):>8} "
                     f"{r.get('ppl_torch', float('nan')):10.3f} {pct(r.get('vs_a_torch')):>8} "
                     f"{r.get('gguf_mib', float('nan')):6.1f} {r.get('train_s') or '':>8}")
    return "\n".join(lines)


def finish(rows: list[dict], meta: dict, out: Path) -> None:
    add_comparisons(rows)
    write_results(rows, meta, out, order, table)


def main() -> None:
    p = common_parser(__doc__, "qlora,qat:dynamic", 2e-4, "bench/results/qlora_quality.json")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.0)
    args = p.parse_args()
    if args.merge:
        rows, metas = read_rows(args.merge)
        return finish(rows, dict(merged_from=[str(x) for x in args.merge], metas=metas), args.out)
    run = start_run(args, plain=("qlora",))
    announce(run, "qlora_quality", args.threads)
    schemes, variants, device = run.schemes, run.variants, run.device

    import bitsandbytes
    import peft
    base, tok = load_base(args.gguf or smollm2_gguf())
    blocks, val_ids = load_data(tok, args)
    bench = open_bench(args, tok, val_ids, device, "qat-qlora-quality-")
    first = (("qlora", lambda: run_qlora(bench, base, blocks, schemes))
             if any(v.kind == "qlora" for v in variants) else None)
    run_arms(bench, run, first, lambda v, scheme: run_qat(bench, base, blocks, v, scheme), lambda v: f"b:{v.label}")

    meta = dict(schemes=schemes, variants=[v.label for v in variants], steps=args.steps, batch=args.batch,
                seq=args.seq, lr=args.lr, r=args.r, alpha=args.alpha, dropout=args.dropout, seed=args.seed,
                start_step=args.start_step, eval_tokens=len(val_ids), threads=args.threads, command=" ".join(sys.argv),
                wall_s=round(time.time() - run.t_start, 1), torch=torch.__version__,
                bitsandbytes=bitsandbytes.__version__, peft=peft.__version__,
                device=device_name(device))
    finish(bench.log.rows, meta, args.out)


if __name__ == "__main__":
    main()
