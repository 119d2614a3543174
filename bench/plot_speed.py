"""Every side-by-side step-time ratio in ``bench/results`` as one picture: each QAT or torchao row of a
``bench/speed.py`` JSON file against the bf16 row run just before it (same file, model, mode, batch, sequence
length and card), at the issue's settings (seq 2048; batch 8 for SmolLM2, 4 for the ~1B config), one point
per pair, colored by card, with the goal of its mode (compiled 1.02x, eager 1.2x). Prints the medians per
(model, mode, variant, card), all pairs and those from session ``RECENT`` on (filled points), and writes them
as JSON. Rows timed with ``bench/speed.py --pipelined`` give a second pair each, by their ``ms_pipelined``
(the variant's name + " [no sync]": a loop that never reads the loss).

    python bench/plot_speed.py [FILES ...] [--variants qat:q4_0+step-cache,...] [--out bench/results/speed_ratios.png]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"smollm2": 8, "llama1b": 4}  # the settings, seq 2048
GOAL = {True: 1.02, False: 1.2}  # compiled, eager
DEFAULT_VARIANTS = "qat:q4_0+step-cache,qat:q4_k_m+step-cache,torchao"  # the callback's default path, and torchao
RECENT = 15  # files of this session on (the step cache's overlapped refresh): filled points, and medians of their own
PIPELINED = " [no sync]"  # the same pair timed by ``bench/speed.py --pipelined``: steps queued back to back


def card(device: str) -> str:
    for name in ("H200", "H100"):
        if name in device:
            return name
    return device


def pairs(files: list[Path], variants: set[str]) -> list[dict]:
    """``{file, model, compiled, variant, card, ratio}`` for every kept row and the bf16 row before it."""
    out = []
    for f in files:
        try:
            rows = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rows, list):
            continue
        last_bf16: dict = {}
        for r in rows:
            if not isinstance(r, dict) or "variant" not in r or "ms_per_step" not in r:
                continue
            key = (r.get("model"), bool(r.get("compiled")), r.get("batch"), r.get("seq"), r.get("device"))
            if r["variant"] == "bf16":
                last_bf16[key] = r
                continue
            base = last_bf16.get(key)
            if (base is None or r["variant"] not in variants or r.get("seq") != 2048
                    or BATCH.get(r.get("model")) != r.get("batch")):
                continue
            m = re.search(r"_s(\d+)_", f.name)
            common = dict(file=f.name, session=int(m.group(1)) if m else None, model=r["model"],
                          compiled=bool(r.get("compiled")), card=card(r.get("device", "?")))
            out.append(dict(common, variant=r["variant"], ratio=r["ms_per_step"] / base["ms_per_step"]))
            if "ms_pipelined" in r and "ms_pipelined" in base:  # ``--pipelined``: the loop that never syncs
                out.append(dict(common, variant=r["variant"] + PIPELINED,
                                ratio=r["ms_pipelined"] / base["ms_pipelined"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/speed_ratios.png")
    args = p.parse_args()
    # by default every speed file but the A/B runs of older code ("..._old...": session 10's code run in session 11)
    files = args.files or sorted(f for f in (ROOT / "bench/results").glob("speed_*.json") if "_old" not in f.name)
    found = pairs(files, set(args.variants.split(",")))
    if not found:
        sys.exit("plot_speed: no side-by-side pairs at the issue's settings in these files")
    groups: dict = defaultdict(list)
    for row in found:
        groups[(row["model"], row["compiled"], row["variant"])].append(row)
    cats = sorted(groups, key=lambda k: (not k[1], k[0], k[2]))  # compiled first
    summary = []
    print(f"{'model':8s} {'mode':8s} {'variant':32s} {'card':5s} {'pairs':>5s} {'median':>7s} {'min':>6s} {'max':>6s}")
    for k in cats:
        for c in sorted({r["card"] for r in groups[k]}):
            for since in (None, RECENT):
                rs = [r["ratio"] for r in groups[k] if r["card"] == c and (since is None or (r["session"] or 0) >= since)]
                if not rs:
                    continue
                row = dict(model=k[0], compiled=k[1], variant=k[2], card=c, since_session=since, pairs=len(rs),
                           median=statistics.median(rs), min=min(rs), max=max(rs))
                summary.append(row)
                label = k[2] if since is None else f"  from session {since}"
                print(f"{k[0]:8s} {'compile' if k[1] else 'eager':8s} {label:32s} {c:5s} {len(rs):5d} "
                      f"{row['median']:7.3f} {row['min']:6.3f} {row['max']:6.3f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"H200": "tab:blue", "H100": "tab:orange"}
    panels = [(True, [k for k in cats if k[1]]), (False, [k for k in cats if not k[1]])]
    panels = [(comp, ks) for comp, ks in panels if ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 1.2 * len(cats)), 4.2), dpi=110, squeeze=False,
                             gridspec_kw=dict(width_ratios=[len(ks) for _, ks in panels]))
    for ax, (comp, ks) in zip(axes[0], panels):  # compiled and eager on their own scales
        for x, k in enumerate(ks):
            for i, r in enumerate(groups[k]):
                off = 0.18 if r["card"] == "H100" else -0.18
                col = colors.get(r["card"], "gray")
                recent = (r["session"] or 0) >= RECENT
                ax.plot(x + off + (i % 5 - 2) * 0.03, r["ratio"], "o", ms=4, alpha=0.8, color=col,
                        markerfacecolor=col if recent else "none")
        ax.axhline(GOAL[comp], color="k", ls="--", lw=1)
        ax.axhline(1.0, color="gray", lw=0.6)
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels([f"{m}\n{v.replace('qat:', '').replace('+step-cache', '+cache').replace(PIPELINED, '')}"
                            + ("\nno sync" if v.endswith(PIPELINED) else "") for m, _, v in ks],
                           fontsize=7)
        ax.set_xlim(-0.6, len(ks) - 0.4)
        ax.set_title(f"{'compiled' if comp else 'eager'} (goal {GOAL[comp]}x, dashed)", fontsize=9)
    for c, col in colors.items():
        axes[0][0].plot([], [], "o", color=col, label=c)
    axes[0][0].plot([], [], "o", color="gray", markerfacecolor="none", label=f"before session {RECENT}")
    axes[0][0].legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("step time / bf16's (side by side)")
    fig.suptitle("QAT step time against bf16: every side-by-side pair in bench/results", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(args.out)
    js = args.out.with_suffix(".json")
    js.write_text(json.dumps(dict(pairs=found, summary=summary), indent=1))
    print(f"wrote {args.out} and {js}")


if __name__ == "__main__":
    main()
