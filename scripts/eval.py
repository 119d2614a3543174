#!/usr/bin/env python
"""Perplexity of a finished run (PyTorch) or of exported GGUF files (llama.cpp), on the same held-out windows.

    python scripts/eval.py runs/quickstart                      # PyTorch: float twin, PTQ and QAT -> eval.json
    python scripts/eval.py runs/quickstart --data configs/data/shakespeare.yaml data.val_max_blocks=64
    python scripts/eval.py runs/quickstart --float float.F16.gguf --ptq ptq.Q4_0.gguf --qat qat.Q4_0.gguf
    python scripts/eval.py runs/quickstart --gguf a.Q4_0.gguf b.Q4_K_M.gguf [--torch]
    python scripts/eval.py --gguf model.gguf --text held_out.txt [--n-ctx 512]

With a run, GGUF files are scored by llama.cpp on the run's held-out blocks: its tokenizer, split,
data.seq_len and data.val_max_blocks, each block from an empty cache, every position but the first
scored, exactly as the PyTorch evaluation does, so the numbers compare directly. --float/--ptq/--qat
print the PyTorch table's format, measured by llama.cpp (-> <run>/eval_gguf.json). --gguf prints a row
per file with the share of the PTQ gap it recovers, (ppl_PTQ - ppl_file) / (ppl_PTQ - ppl_float), the
float and PTQ perplexities taken from --float/--ptq files if given, else from PyTorch: the run's
eval.json when it was measured on the same blocks, or computed now with --torch.
--text scores a GGUF on a text file with the GGUF's own tokenizer (no BOS), in windows of --n-ctx.

Overrides (key.sub=value) apply to the run's saved config.yaml, e.g. data.seq_len=512 eval.batch_size=4.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.cli import UserError, run_main  # noqa: E402

ROLES = ("float", "ptq", "qat")
GAP = "(ppl_PTQ - ppl_file) / (ppl_PTQ - ppl_float)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="a run directory written by scripts/train.py, e.g. runs/quickstart")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override the run's config (data., eval.)")
    parser.add_argument("--data", help="a data preset name or YAML file to evaluate on instead of the run's data")
    parser.add_argument("--out", help="where to write the JSON (default: <run>/eval.json, or <run>/eval_gguf.json "
                                      "for GGUF files; with --text only when given)")
    files = parser.add_argument_group("GGUF files, scored by llama.cpp")
    files.add_argument("--gguf", nargs="+", default=[], metavar="FILE", help="files to score, a row each")
    for role in ROLES:
        files.add_argument(f"--{role}", metavar="FILE", help=f"the {role.upper() if role != 'float' else role} "
                                                             "model's file: a row of the FP/PTQ/QAT table")
    files.add_argument("--torch", action="store_true", help="compute the run's PyTorch float/PTQ perplexities now "
                                                            "(instead of reading eval.json) for the gap column")
    files.add_argument("--text", help="score --gguf files on this text file instead of a run's held-out data")
    files.add_argument("--n-ctx", type=int, default=None, help="window length for --text (default 512)")
    files.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: up to 2)")
    args = parser.parse_args(argv)

    roles = {r: getattr(args, r) for r in ROLES if getattr(args, r)}
    if args.text:
        return _text_mode(args, roles)
    if args.run is None:
        raise UserError("give a run directory (runs/<name>), or --gguf FILE --text FILE to score a GGUF on a text")
    if args.n_ctx is not None:
        raise UserError("--n-ctx is for --text; with a run the windows are its data.seq_len blocks "
                        "(override with data.seq_len=N)")
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml); runs are under runs/<name>/")
    from qat.recipe import load_recipe
    overrides = ([f"data={args.data}"] if args.data else []) + list(args.overrides)
    config = load_recipe(run / "config.yaml", overrides)
    if args.torch and not args.gguf:
        raise UserError("--torch fills the gap column of --gguf files; scripts/eval.py RUN alone evaluates in PyTorch")
    if not roles and not args.gguf:
        from qat.lm.run import evaluate_run
        report = evaluate_run(run, config)
        out = _write(Path(args.out) if args.out else run / "eval.json", report.to_dict())
        print(report)
        print(f"wrote {out}")
        return 0
    return _gguf_mode(args, run, config, roles)


# -- GGUF files on a run's held-out blocks ------------------------------------------------------------------

def _gguf_mode(args: argparse.Namespace, run: Path, config, roles: dict[str, str]) -> int:
    from qat.evaluate import EvalReport, gap_recovered
    from qat.lm.run import heldout_blocks

    paths = {**{r: _check_gguf(p) for r, p in roles.items()}, **{p: _check_gguf(p) for p in args.gguf}}
    _llama_cpp()
    tokenizer, blocks, data = heldout_blocks(run, config)
    print(f"qat: held out: {data['tokens']} tokens ({data['blocks']} blocks x {data['seq_len']}) of "
          f"{', '.join(data['documents'][:8])}", flush=True)
    vocab = tokenizer.get_vocab()
    rows, scored = {}, {}
    for key, path in paths.items():
        if path.resolve() not in scored:  # a file given twice (a role and --gguf) is scored once
            scored[path.resolve()] = _score(path, blocks, data["seq_len"], args.threads, vocab, run)
            print(f"qat:   {path.name}: ppl {scored[path.resolve()]['ppl']:.3f} (llama.cpp)", flush=True)
        rows[key] = scored[path.resolve()]
    scheme = config.quant.scheme if config.quant else None
    out: dict[str, Any] = {"measured_by": "llama.cpp", "data": data}
    if roles:
        report = EvalReport(scheme, {r: rows[r] for r in ROLES if r in roles}, data, measured_by="llama.cpp")
        out["report"] = report.to_dict()
        print(report)
    if args.gguf:
        ref, source = _reference(roles, rows, run, config, data, args.torch)
        table = [{**rows[p], "gap_recovered": gap_recovered(ref["float"], ref["ptq"], rows[p]["ppl"]) if ref else None}
                 for p in args.gguf]
        out.update(files=table, reference={**ref, "source": source} if ref else None, gap_recovered_formula=GAP)
        print(_file_table(table, ref, source))
    written = _write(Path(args.out) if args.out else run / "eval_gguf.json", out)
    print(f"wrote {written}")
    return 0


def _reference(roles: dict[str, str], rows: dict, run: Path, config, data: dict,
               compute: bool) -> tuple[Optional[dict[str, float]], str]:
    """Float and PTQ perplexities for the gap column, and where they come from."""
    if "float" in roles and "ptq" in roles:
        return {"float": rows["float"]["ppl"], "ptq": rows["ptq"]["ppl"]}, "llama.cpp (--float/--ptq files)"
    if compute:
        from qat.lm.run import evaluate_run
        report = evaluate_run(run, config)
        got = {k: report.rows[k]["ppl"] for k in ("float", "ptq") if k in report.rows}
        return (got, "PyTorch (computed now)") if len(got) == 2 else (None, "the run has no float and PTQ models")
    saved = run / "eval.json"
    if not saved.is_file():
        return None, f"no {saved}: run scripts/eval.py {run} first, or pass --torch or --float/--ptq files"
    measured = json.loads(saved.read_text())
    same = {k: measured.get("data", {}).get(k) for k in ("seq_len", "blocks", "tokens")} == \
        {k: data[k] for k in ("seq_len", "blocks", "tokens")}
    got = {k: measured.get("results", {}).get(k, {}).get("ppl") for k in ("float", "ptq")}
    if not same:
        return None, f"{saved} was measured on other blocks; pass --torch to compute float and PTQ on these"
    if None in got.values():
        return None, f"{saved} has no float and PTQ perplexities"
    return got, f"PyTorch ({saved})"


def _file_table(table: list[dict], ref: Optional[dict], source: str) -> str:
    width = max(len(Path(r["file"]).name) for r in table)
    lines = ["measured by llama.cpp on the run's held-out blocks",
             f"{'file':<{width}}  {'type':<8}  {'MiB':>8}  {'ppl':>9}  {'nll/token':>9}  {'gap recovered':>13}"]
    for r in table:
        g = "" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.1f}%"
        lines.append(f"{Path(r['file']).name:<{width}}  {r['type']:<8}  {r['mib']:>8.1f}  {r['ppl']:>9.3f}  "
                     f"{r['nll']:>9.4f}  {g:>13}")
    if ref:
        lines.append(f"gap recovered: {GAP}, float {ref['float']:.3f} and PTQ {ref['ptq']:.3f} from {source}")
    else:
        lines.append(f"gap recovered: not computed: {source}")
    return "\n".join(lines)


# -- a GGUF on a text file ------------------------------------------------------------------------------------

def _text_mode(args: argparse.Namespace, roles: dict[str, str]) -> int:
    if args.run or roles or args.torch or args.data or args.overrides:
        raise UserError("--text scores --gguf files on a text file: drop the run directory, --float/--ptq/--qat, "
                        "--torch and --data (they need a run)")
    if not args.gguf:
        raise UserError("--text needs --gguf FILE: the model to score")
    n_ctx = 512 if args.n_ctx is None else args.n_ctx
    if n_ctx < 2:
        raise UserError(f"--n-ctx={n_ctx}: a window needs at least 2 tokens")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise UserError(f"--text {text_path}: no such file")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    paths = [_check_gguf(p) for p in args.gguf]
    _llama_cpp()
    from qat.llamacpp import file_size_mib, gguf_logits, llama_file_type, perplexity_from_logits

    table = []
    for path in paths:
        with _loaded(path, n_ctx, args.threads) as llm:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            if len(ids) < 2:
                raise UserError(f"--text {text_path} holds {len(ids)} token(s); perplexity needs at least 2")
            ppl = perplexity_from_logits(gguf_logits(llm, ids, n_ctx), ids, n_ctx)
            kind = llama_file_type(llm)
        scored = sum(len(ids[i:i + n_ctx]) - 1 for i in range(0, len(ids), n_ctx))  # a 1-token tail scores nothing
        table.append({"file": str(path), "type": kind, "mib": file_size_mib(path), "ppl": ppl, "nll": math.log(ppl),
                      "tokens": scored})
    width = max(len(Path(r["file"]).name) for r in table)
    print(f"measured by llama.cpp on {text_path} (each file's own tokenizer, windows of {n_ctx})")
    print(f"{'file':<{width}}  {'type':<8}  {'MiB':>8}  {'ppl':>9}  {'tokens':>8}")
    for r in table:
        print(f"{Path(r['file']).name:<{width}}  {r['type']:<8}  {r['mib']:>8.1f}  {r['ppl']:>9.3f}  {r['tokens']:>8}")
    if args.out:
        out = _write(Path(args.out), {"measured_by": "llama.cpp", "text": str(text_path), "n_ctx": n_ctx,
                                      "files": table})
        print(f"wrote {out}")
    return 0


# -- shared pieces --------------------------------------------------------------------------------------------

def _llama_cpp() -> None:
    try:
        from qat.llamacpp import _require_llama_cpp
        _require_llama_cpp()
    except ImportError as e:
        raise UserError(f"scoring GGUF files {e}") from e


def _check_gguf(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise UserError(f"{path}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    return path


def _check_vocab(path: Path, tokens: list[str], vocab: dict[str, int], run: Path) -> None:
    """The run's token ids must mean the same tokens in the file, or its perplexity on them means nothing."""
    wrong = sorted((i, t) for t, i in vocab.items() if i >= len(tokens) or tokens[i] != t)
    if wrong:
        i, t = wrong[0]
        theirs = repr(tokens[i]) if i < len(tokens) else "nothing"
        raise UserError(f"{path} does not use the run's tokenizer ({run / 'model'}): its vocabulary has "
                        f"{len(tokens)} tokens, the run's {len(vocab)}, and {len(wrong)} ids differ (id {i}: "
                        f"{t!r} in the run, {theirs} in the file); score files exported from this run")


@contextmanager
def _loaded(path: Path, n_ctx: int, threads: Optional[int]) -> Iterator:
    """``load_llama``, with llama.cpp's refusal to load a file turned into one message."""
    from qat.llamacpp import load_llama
    with ExitStack() as stack:
        try:
            llm = stack.enter_context(load_llama(path, n_ctx, threads))
        except ValueError as e:  # llama_cpp.Llama: "Failed to load model from file"
            raise UserError(f"llama.cpp cannot load {path} ({e}); is it a complete GGUF of a supported model?") from e
        yield llm


def _score(path: Path, blocks: list[list[int]], seq_len: int, threads: Optional[int], vocab: dict[str, int],
           run: Path) -> dict[str, Any]:
    """llama.cpp's ``{"ppl", "nll", "tokens"}`` on ``blocks``, each from an empty cache (logits kept per block,
    never for the whole split), and the file's type and size."""
    from qat.llamacpp import file_size_mib, gguf_logits, llama_file_type, llama_vocab, perplexity_from_logits
    total, count = 0.0, 0
    with _loaded(path, seq_len, threads) as llm:
        _check_vocab(path, llama_vocab(llm), vocab, run)
        for block in blocks:
            n = len(block) - 1
            total += n * math.log(perplexity_from_logits(gguf_logits(llm, block, seq_len), block, seq_len))
            count += n
        kind = llama_file_type(llm)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "file": str(path), "type": kind,
            "mib": file_size_mib(path)}


def _write(path: Path, payload: dict) -> Path:
    from qat.export.io import atomic_file
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return path


if __name__ == "__main__":
    run_main(main)
