"""Can the packed cache's unpacks hide behind the matmuls? A ~1B Llama's linears as a chain of bf16 matmuls
(16 blocks of q, k, v, o, gate, up, down; 4 x 2048 tokens), forward then the backward's two matmuls per
layer, with the large layers' w_hat (q, o, gate, up, down: Q4_0 codes) got three ways:

  bf16:     w_hat already there (what the matmuls alone cost)
  serial:   unpacked right before its matmul, on the same stream (the step cache today: forward and backward)
  prefetch: unpacked on a side stream one layer ahead, while the previous layer's matmuls run; the main
            stream waits on an event before it reads it

Device time of the whole chain, CUDA events, median of ``--reps`` x ``--rounds``; the rows alternate, so drift
hits them all. First, every w_hat the prefetch gives is checked bitwise against the serial one.

    python bench/unpack_overlap.py [--reps 20] [--rounds 3] [--blocks 16] [--out results.json]"""
import argparse
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch

from qat.formats import get_format
from qat.kernels import triton_fq as tfq
from common import median, write_json

H, I, KV, T = 2048, 8192, 512, 4 * 2048
LAYERS = [("q", H, H, True), ("k", KV, H, False), ("v", KV, H, False), ("o", H, H, True),
          ("gate", I, H, True), ("up", I, H, True), ("down", H, I, True)]


def build(dev, blocks: int = 16):
    fmt = get_format("q4_0")
    shapes = [(o, i, packed) for _ in range(blocks) for _, o, i, packed in LAYERS]
    total = sum(o * i for o, i, p in shapes if p)
    gen = torch.Generator(device=dev).manual_seed(0)
    codes = torch.randint(0, 256, (total // 2,), dtype=torch.uint8, device=dev, generator=gen)
    ps = (torch.rand(total // fmt.block, device=dev, generator=gen) * 0.01).to(torch.float16)
    layers, off = [], 0
    for o, i, packed in shapes:
        w = torch.randn(o, i, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
        layers.append((w, off if packed else None))
        off += o * i // fmt.block if packed else 0
    xs = {n: torch.randn(T, n, device=dev, dtype=torch.bfloat16, generator=gen) for n in (H, I)}
    gs = {n: torch.randn(T, n, device=dev, dtype=torch.bfloat16, generator=gen) for n in (H, I, KV)}
    return fmt, codes, ps, layers, xs, gs


def chain(fmt, codes, ps, layers, xs, gs, how: str, side, seen: list | None = None):
    """One forward and backward over the chain (timed by the caller's events); ``seen``: a list that gets a copy
    of every packed layer's w_hat as the matmuls read it."""
    def unpack(i):
        w, b_off = layers[i]
        out = torch.empty_like(w)
        return tfq.unpack(codes, ps, None, b_off, w.numel() // fmt.block, fmt, out)

    def run(order):
        main = torch.cuda.current_stream()
        ahead = {}

        def get(i):
            w, b_off = layers[i]
            if b_off is None or how == "bf16":
                return w
            if how == "serial":
                return unpack(i)
            got = ahead.pop(i, None)
            if got is None:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    got = (unpack(i), side.record_event())
            t, ev = got
            main.wait_event(ev)
            t.record_stream(main)
            return t

        def got(i):
            w = get(i)
            if seen is not None and layers[i][1] is not None:
                seen.append(w.clone())
            return w

        def prefetch(k):
            if how != "prefetch":
                return
            for j in order[k + 1:]:
                if layers[j][1] is not None:
                    if j not in ahead:
                        with torch.cuda.stream(side):
                            ahead[j] = (unpack(j), side.record_event())
                    return

        return got, prefetch

    n = len(layers)
    fwd = list(range(n))
    get, prefetch = run(fwd)
    for k, i in enumerate(fwd):
        w = get(i)
        prefetch(k)
        o, inn = w.shape
        torch.mm(xs[inn], w.t())
    bwd = fwd[::-1]
    get, prefetch = run(bwd)
    for k, i in enumerate(bwd):
        w = get(i)
        prefetch(k)
        o, inn = w.shape
        torch.mm(gs[o], w)           # grad of the input: needs w_hat
        torch.mm(gs[o].t(), xs[inn])  # grad of the weight: does not


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blocks", type=int, default=16, help="transformer blocks of 7 linears (the ~1B Llama: 16)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    state = build(dev, args.blocks)
    side = torch.cuda.Stream(dev)
    serial, ahead = [], []
    chain(*state, "serial", side, serial)
    chain(*state, "prefetch", side, ahead)
    if len(serial) != len(ahead) or not all(torch.equal(a, b) for a, b in zip(serial, ahead)):
        sys.exit("unpack_overlap: the prefetched w_hat differs from the serial one")
    del serial, ahead
    hows = ["bf16", "serial", "prefetch"]
    times = {h: [] for h in hows}
    for _ in range(args.rounds):
        for h in hows:
            for _ in range(3):
                chain(*state, h, side)
            torch.cuda.synchronize()
            for _ in range(args.reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                chain(*state, h, side)
                b.record()
                b.synchronize()
                times[h].append(a.elapsed_time(b))
    rows = [{"how": h, "ms": median(times[h])} for h in hows]
    base = rows[0]["ms"]
    print(f"{'how':10s} {'ms':>8s} {'- bf16':>8s}")
    for r in rows:
        r["over_bf16_ms"] = r["ms"] - base
        print(f"{r['how']:10s} {r['ms']:8.3f} {r['over_bf16_ms']:8.3f}")
    if args.out:
        write_json(args.out, {"device": torch.cuda.get_device_name(), "tokens": T, "blocks": args.blocks,
                              "rows": rows})


if __name__ == "__main__":
    main()
