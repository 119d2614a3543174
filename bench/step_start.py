"""Where the host time of a training step goes, phase by phase, without a profiler (which inflates the Python
parts: BENCHMARKS.md, session 16): what a loop that reads the loss each step waits for before the GPU gets
its first kernel. For each variant, built as ``bench/speed.py`` builds it, in one process:

- ``batch_start``: the step cache's ``refresh_if_stale`` (what ``QATCallback.on_train_batch_start`` runs);
- ``to_forward``: from there to the compiled module's forward pre-hook (``nn.Module``'s call path);
- ``forward``: from the pre-hook until the forward returns (dynamo's cache lookup, AOTAutograd's wrappers,
  the graph's launches);
- ``backward``, ``optimizer``: ``loss.backward()`` and ``optimizer_step`` (flush, ``opt.step``, the
  overlapped refresh);
- ``guard_check``: dynamo's guard check alone, the compiled frame's ``guard_manager.check`` on the step's
  own arguments (best of 5 x 200 calls), when compiled.

Every step ends on the host when the current stream is done (as ``loss.item()``), so each starts on an idle
GPU. Medians over ``--steps`` steps, in microseconds.

    python bench/step_start.py --model llama1b --batch 4 --variants bf16,qat:q4_0+step-cache [--out FILE]
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import release, rows_report  # noqa: E402
from bench.speed import MODELS, apply_switches, batch_start, build, optimizer_step, callback_setup  # noqa: E402

PHASES = ("batch_start", "to_forward", "forward", "backward", "optimizer")


def guard_check_us(model, kwargs: dict) -> float | None:
    """Best time of dynamo's guard check for ``model``'s compiled forward on these arguments, or None when
    no cache entry passes them (not compiled, or a frame this does not know how to call)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    fn = type(model).forward
    for code_fn in (fn, getattr(fn, "__wrapped__", None)):
        if code_fn is None:
            continue
        code = code_fn.__code__
        try:  # the frame's arguments by the function's own signature: ``(self, input_ids=...)``, a decorator's
            # ``(*args, **kwargs)`` or ``(self, *args, **kwargs)`` (transformers' versions differ)
            bound = inspect.signature(code_fn, follow_wrapped=False).bind(model, **kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        local = dict(bound.arguments)
        for name, cell in zip(code.co_freevars, code_fn.__closure__ or ()):
            local[name] = cell.cell_contents  # a decorator's wrapper reads its wrapped function from a cell
        for entry in _debug_get_cache_entry_list(code):
            gm = entry.guard_manager
            if not gm.check(local):
                continue
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(200):
                    gm.check(local)
                best = min(best, (time.perf_counter() - t) / 200 * 1e6)
            return best
    return None


def measure(model_name: str, variant: str, batch: int, seq: int, warmup: int, steps: int, device: str,
            backend: str | None = "inductor") -> dict:
    """One variant's phases (see the module's doc). ``backend=None``: eager."""
    model = build(model_name, apply_switches(variant), device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    f = torch.compile(model, backend=backend) if backend else model
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    cache = callback_setup(model, opt)
    marks: dict = {}
    hook = f.register_forward_pre_hook(lambda *_: marks.__setitem__("entered", time.perf_counter()))
    sync = torch.cuda.current_stream().synchronize if device == "cuda" else (lambda: None)
    rows = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        batch_start(cache)
        t1 = time.perf_counter()
        loss = f(input_ids=ids, labels=ids).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer_step(opt, cache)
        t4 = time.perf_counter()
        loss.item()  # the loop's read of the loss: the current stream's end
        if i >= warmup:
            e = marks["entered"]
            rows.append(dict(batch_start=t1 - t0, to_forward=e - t1, forward=t2 - e, backward=t3 - t2,
                             optimizer=t4 - t3))
    hook.remove()
    out = dict(model=model_name, variant=variant, batch=batch, seq=seq, backend=backend, steps=steps,
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    for k in PHASES:
        out[k + "_us"] = statistics.median(r[k] for r in rows) * 1e6
    out["guard_check_us"] = guard_check_us(model, dict(input_ids=ids, labels=ids)) if backend else None
    if cache is not None:
        cache.close()
    del model, opt, f, cache, loss
    release(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama1b")
    p.add_argument("--variants", default="bf16,qat:q4_0+step-cache")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backend", default="inductor", help="torch.compile's backend; 'none': eager")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = None if args.backend == "none" else args.backend

    def line(r: dict) -> str:
        g = r["guard_check_us"]
        return (f"{r['variant']:28s}" + "".join(f"{r[k + '_us']:12.0f}" for k in PHASES)
                + (f"{g:9.0f}" if g is not None else f"{'-':>9s}"))

    rows_report(args.variants.split(","),
                lambda v: measure(args.model, v, args.batch, args.seq, args.warmup, args.steps, device, backend),
                f"{'variant':28s}" + "".join(f"{k:>12s}" for k in PHASES) + f"{'guards':>9s}   (us, medians)",
                line, args.out)


if __name__ == "__main__":
    main()
