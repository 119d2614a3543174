"""Could a matmul that reads the packed cache's Q4_0 codes itself replace "unpack, then cuBLAS"?

The packed step cache unpacks each large layer's w_hat (bf16) from its 4-bit codes before the forward's matmul
and again before the backward's ``grad_x = grad_y @ w_hat`` (~1.5 ms a step on a ~1B Llama, H200: see
``bench/unpack_overlap.py``). A GEMM that dequantizes its weight tiles in registers would skip writing and
re-reading w_hat, but it only pays if it keeps cuBLAS's bf16 speed at M = 4 x 2048 tokens, where these matmuls
are compute-bound. This measures, per 1B layer shape and both matmuls that read w_hat, side by side:

  cublas:         torch.mm on a bf16 w_hat already there (the floor)
  unpack+cublas:  ``triton_fq.unpack`` then torch.mm (the step cache today)
  triton-bf16:    a Triton GEMM (autotuned) on the bf16 w_hat: how close Triton gets to cuBLAS at all
  triton-q4:      the same GEMM reading the codes and fp16 scales, dequantized in registers with the unpack
                  kernel's arithmetic
  torch-int4mm:   forward only: torch's own int4 matmul (``torch._weight_int4pack_mm``, tinygemm, as torchao's
                  int4 weight-only inference uses), group 32, bf16 scales and zeros: not our numbers, its speed

and sums them over the model (16 blocks of q, o, gate, up, down). Times are the kernels' device time
(``bench.common.device_ms``: the profiler, mean of ``--reps`` calls; host launch gaps left out), median of
``--rounds`` rounds. The fused output is checked against ``mm(x, unpack(codes))`` first (same w_hat; only the
accumulation order may differ).

    python bench/dequant_gemm.py [--reps 30] [--rounds 3] [--out results.json]"""
import argparse
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch

from qat.formats import get_format
from qat.kernels import triton_fq as tfq
from common import device_ms, median, write_json

H, I, T, BLOCKS = 2048, 8192, 4 * 2048, 16
SHAPES = {"q/o": (H, H, 2), "gate/up": (I, H, 2), "down": (H, I, 1)}  # (out, in, layers per block)

if tfq.HAS_TRITON:
    import triton
    import triton.language as tl

    CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP": 8}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                        (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4)]]

    @triton.jit
    def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        per = GROUP * n_n
        first = (pid // per) * GROUP
        size = min(n_m - first, GROUP)
        return first + (pid % per) % size, (pid % per) // size

    @triton.jit
    def _w_tile(W, C, S, r, c0, ld, Q4: tl.constexpr, R: tl.constexpr, CC: tl.constexpr):
        """The [R, CC] tile of the [rows, ld] weight at rows r, columns c0... (CC: a multiple of 32), bf16: read
        as bf16, or dequantized from Q4_0 codes (16 bytes a block of 32 along a row) and fp16 scales."""
        if Q4:
            half = c0 // 2 + tl.arange(0, CC // 2)
            b = tl.load(C + r[:, None].to(tl.int64) * (ld // 2) + half[None, :])
            codes = tl.reshape(tl.join(b & 15, b >> 4), (R, CC)).to(tl.float32) - 8.0
            blk = c0 // 32 + tl.arange(0, CC // 32)
            s = tl.load(S + r[:, None].to(tl.int64) * (ld // 32) + blk[None, :]).to(tl.float32)
            w = tl.reshape(tl.reshape(codes, (R, CC // 32, 32)) * s[:, :, None], (R, CC))
            return w.to(W.dtype.element_ty)
        else:
            c = c0 + tl.arange(0, CC)
            return tl.load(W + r[:, None].to(tl.int64) * ld + c[None, :])

    @triton.autotune(configs=CONFIGS, key=["M", "OUT", "RED", "Q4", "FWD"])
    @triton.jit
    def _gemm_kernel(A, W, C, S, Y, M, OUT, RED: tl.constexpr, LD, Q4: tl.constexpr, FWD: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        # Y[M, OUT] = A[M, RED] @ W^T (FWD: W is [OUT, RED]) or A @ W (W is [RED, OUT]); W's rows are LD wide.
        # The loop's extent is a constexpr: Triton's CPU interpreter cannot range() over a runtime int with numpy 2.
        pm, pn = _tile_ids(M, OUT, BM, BN, GROUP)
        rm = pm * BM + tl.arange(0, BM)
        ro = pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, RED, BK):
            rr = r0 + tl.arange(0, BK)
            a = tl.load(A + rm[:, None].to(tl.int64) * RED + rr[None, :])
            if FWD:
                acc = tl.dot(a, tl.trans(_w_tile(W, C, S, ro, r0, LD, Q4, BN, BK)), acc)
            else:
                acc = tl.dot(a, _w_tile(W, C, S, rr, pn * BN, LD, Q4, BK, BN), acc)
        tl.store(Y + rm[:, None].to(tl.int64) * OUT + ro[None, :], acc.to(Y.dtype.element_ty))


def fused(kind: str, a, w, codes, s, q4: bool):
    """``a @ w.T`` (fwd) or ``a @ w`` (bwd), w [N, K] as bf16 or as codes/scales."""
    N, K = w.shape
    M = a.shape[0]
    if M % 256 or N % 256 or K % 256:  # the kernel has no bounds masks: every tile config must divide the shapes
        raise ValueError(f"dequant_gemm: shapes must be multiples of 256, got M={M}, N={N}, K={K}")
    fwd = kind == "fwd"
    out = torch.empty(M, N if fwd else K, dtype=a.dtype, device=a.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(out.shape[1], meta["BN"]),)  # noqa: E731
    _gemm_kernel[grid](a, w, codes, s, out, M, out.shape[1], K if fwd else N, K, Q4=q4, FWD=fwd)
    return out


def tinygemm(w, x):
    """``x @ w.T`` by ``torch._weight_int4pack_mm`` on w quantized to int4 (group 32, asymmetric, bf16 scales
    and zeros: its own rule, not Q4_0's), as a callable; None (with the reason printed) where this torch lacks
    it or refuses the shape."""
    try:
        n, k = w.shape
        g = w.float().view(n, k // 32, 32)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.uint8).view(n, k)
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
        zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
        sz = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        fn = lambda: torch._weight_int4pack_mm(x, packed, 32, sz)  # noqa: E731
        ref = x.float() @ w.float().t()
        err = (fn().float() - ref).abs().max() / ref.abs().max()
        print(f"torch-int4mm {n}x{k}: max rel err against the bf16 matmul {err.item():.3g} (its own rounding)")
        return fn
    except Exception as e:  # an older/newer torch, or a shape it refuses: the column is left out
        print(f"torch-int4mm: not measured ({type(e).__name__}: {str(e)[:200]})")
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not (torch.cuda.is_available() and tfq.HAS_TRITON):
        sys.exit("dequant_gemm: needs CUDA and Triton")
    dev = torch.device("cuda")
    fmt = get_format("q4_0")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, total = [], {}
    for name, (n, k, per) in SHAPES.items():
        codes = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=dev, generator=gen)
        s = (torch.rand(n * k // 32, device=dev, generator=gen) * 0.01 + 1e-3).to(torch.float16)
        w = tfq.unpack(codes, s, None, 0, n * k // 32, fmt, torch.empty(n, k, dtype=torch.bfloat16, device=dev))
        x = torch.randn(T, k, device=dev, dtype=torch.bfloat16, generator=gen)
        g = torch.randn(T, n, device=dev, dtype=torch.bfloat16, generator=gen)
        scratch = torch.empty_like(w)
        for kind, a in (("fwd", x), ("bwd", g)):
            ref = (a @ w.t()) if kind == "fwd" else (a @ w)
            for q4 in (False, True):
                got = fused(kind, a, w, codes, s, q4)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if err > 2e-2:
                    sys.exit(f"dequant_gemm: {name} {kind} q4={q4} differs from cuBLAS on the same w_hat "
                             f"(max rel err {err:.3g})")
            mm = (lambda a=a: torch.mm(a, w.t())) if kind == "fwd" else (lambda a=a: torch.mm(a, w))

            def unpack_mm(a=a, mm=mm):
                tfq.unpack(codes, s, None, 0, n * k // 32, fmt, scratch)
                return mm()

            variants = {"cublas": mm, "unpack+cublas": unpack_mm,
                        "triton-bf16": lambda a=a, kind=kind: fused(kind, a, w, codes, s, False),
                        "triton-q4": lambda a=a, kind=kind: fused(kind, a, w, codes, s, True)}
            if kind == "fwd":
                int4 = tinygemm(w, a)
                if int4 is not None:
                    variants["torch-int4mm"] = int4
            got = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v, fn in variants.items():
                    got[v].append(device_ms(fn, args.reps) * 1000.0)  # us
            row = {"shape": name, "out": n, "in": k, "matmul": kind, "layers": per * BLOCKS}
            row.update({v: median(t) for v, t in got.items()})
            rows.append(row)
            for v in variants:
                total[v] = total.get(v, 0.0) + row[v] * per * BLOCKS
    cols = ["cublas", "unpack+cublas", "triton-bf16", "triton-q4"]
    print(f"{'shape':>8} {'matmul':>6} " + " ".join(f"{c:>14}" for c in cols + ["torch-int4mm"])
          + "   (us, one layer)")
    for r in rows:
        print(f"{r['shape']:>8} {r['matmul']:>6} " + " ".join(f"{r[c]:>14.1f}" for c in cols)
              + (f" {r['torch-int4mm']:>14.1f}" if "torch-int4mm" in r else ""))
    print(f"{'model':>15} " + " ".join(f"{total[c] / 1000:>14.3f}" for c in cols) + "   (ms, a step's 160 matmuls)")
    base = total["cublas"]
    print(f"{'over cublas':>15} " + " ".join(f"{(total[c] - base) / 1000:>+14.3f}" for c in cols) + "   (ms)")
    if args.out:
        write_json(args.out, {"rows": rows, "total_ms": {c: total[c] / 1000 for c in cols},
                              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "tokens": T})


if __name__ == "__main__":
    main()
