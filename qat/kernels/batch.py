"""Horizontal fusion of the weight fake quant: every layer of a model in one kernel launch per step.

Why: an eager training step of a small model is CPU-bound, and per layer the fake quant costs a Python
autograd node, a Triton launch and a backward node (measured on an H200, SmolLM2-135M, 210 layers:
~55 us forward + ~110 us backward of host time per layer, against ~5 us of GPU time). Here the first
fake-quant layer that runs in a forward computes the weights of *all* layers of the group at once:

* forward: one ``_fq_multi_kernel`` launch per (format, dtype) writes every ``w_hat`` and clip mask
  into two flat buffers; each layer then takes its slice (a view) instead of launching anything;
* backward: one autograd node for the whole group multiplies every incoming gradient by its mask with
  a single ``torch._foreach_mul_``.

The numbers are the per-layer kernel's, bit for bit (same ``_fq_rows`` code). A slot is only used by the
forward it was computed for: it is dropped once taken, and it is stale (so the group is recomputed) if
the weight changed (version counter or storage), the grad mode differs, or the group's backward already
ran. Used only where it is safe and pays off: CUDA tensors (or the Triton interpreter), the ``dynamic``
observer, not frozen, not under ``torch.compile`` (there the group is one opaque op instead, for
k-quants by default: see the section at the end of this file), and a single process (under DDP/FSDP every gradient would arrive at the end of backward,
defeating communication overlap, and FSDP shards the weights). ``QAT_BATCHED_FQ=0`` turns it off.

K-quants (Q2_K..Q6_K) join the same machinery without Triton, on GPUs: their two-level scale search
is a few hundred small torch ops per call; per layer, SmolLM2's 30 k-quant layers cost ~1.5 s of host
time per step (H200 quality runs, 500 steps: 998 s at q4_k_m against 260 s at q4_0). Every 256-element super-block is searched
independently, so the group concatenates the weights of all layers in one k-quant type and searches them
at once, in chunks of at most ``KQ_CHUNK`` elements (bounds the search's temporaries), bit for bit the
per-layer result. Their backward is the plain STE (no clip mask).

Recompute path (qat/recompute.py): layers that recompute ``w_hat`` in their backward take *detached*
slots, computed without the group backward node (no masks kept); the group's backward then serves only
the layers that still keep their masks (embeddings, k-quants unless ``QAT_RECOMPUTE=1``). Each mode is
computed once per forward, for the quantizers that mode serves.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import triton_fq as tfq

__all__ = ["BatchedFakeQuant", "attach", "group_of"]

# quantizer -> its group. Kept outside the modules so deepcopy/pickle of a model never sees it (a copy
# simply runs per layer until it is prepared again).
_GROUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def group_of(q) -> Optional["BatchedFakeQuant"]:
    return _GROUPS.get(q)

_WDT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KQ_CHUNK = 1 << 24  # elements per k-quant search call (~30 temporaries of this size, fp32)
# Grouping pays where the search is launch-bound (GPUs). On a CPU it is compute-bound and the larger
# temporaries cost more than the saved calls (2-core CPU, 8 layers 512/1536 wide, q4_k_m: 1.0 s per step with per-layer
# searches, 1.17 s grouped), so CPU weights keep the per-layer search unless this is set (the tests set it).
KQ_ON_CPU = False


_KQ_CLASS: list = []  # KQuantFormat, imported on first use (formats import this module's users)


def _is_kquant(fmt) -> bool:
    if not _KQ_CLASS:
        from ..formats.kquants import KQuantFormat

        _KQ_CLASS.append(KQuantFormat)
    return isinstance(fmt, _KQ_CLASS[0])


def _enabled() -> bool:
    return not torch.compiler.is_compiling() and _enabled_env()


def _fusable(q, w: Tensor, triton_on: Optional[bool] = None) -> bool:
    """Can the group compute this quantizer's weight? (k-quants: anywhere; the rest: the Triton kernel)
    ``triton_on``: the Triton switch, where the caller read it once for many weights."""
    if _is_kquant(q.fmt):
        return w.device.type != "cpu" or KQ_ON_CPU
    if triton_on is None:
        triton_on = tfq.HAS_TRITON and not os.environ.get("QAT_DISABLE_TRITON")
    return triton_on and (w.is_cuda or tfq.INTERPRET) and w.dtype in _WDT


class _State:
    """Shared by the slots of one group computation: has its backward run (saved masks consumed)?"""

    __slots__ = ("backward_ran",)

    def __init__(self):
        self.backward_ran = False


class _MultiSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group: "BatchedFakeQuant", qs: list, state: _State, *weights: Tensor):
        outs, masks = group._compute(qs, weights)
        ctx.masks, ctx.state = masks, state
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        grads = list(grads)
        # In place: these buffers are ours alone (one per output, from the layers' matmul backward), and
        # an out-of-place product would hold a second copy of every weight gradient at once.
        if ctx.masks is not None:  # k-quants: plain STE, the gradients pass as they are
            _mask_grads(grads, *ctx.masks)
        ctx.state.backward_ran = True
        ctx.masks = None
        return (None, None, None, *grads)


def _mask_grads(grads: list, mask: Tensor, tab: tuple) -> None:
    """``grad *= mask`` for every layer of one forward launch (``mask``: its flat uint8 clip mask): one
    Triton launch over the forward's program table where every gradient is a contiguous tensor of the
    weight's dtype (what the matmul backward gives), else one ``mul_`` per layer. ``torch._foreach_mul_``
    of bf16 gradients by bool masks took no fused path either: measured on an H200, 210 kernels and
    2.5 ms of host time per SmolLM2 step."""
    _, _, _, off, nb, pl, pr, _, rows, block, sizes, shapes, dtype, _ = tab
    if all(g is not None and g.dtype == dtype and g.is_contiguous() and g.shape == s for g, s in zip(grads, shapes)):
        gp, aligned = tfq.rel_offsets(grads)
        tfq._mask_multi_kernel[(pl.numel(),)](grads[0], gp, mask, off, nb, pl, pr, BLOCK=block, ROWS=rows,
                                               ALIGNED=aligned, num_warps=4, **tfq.launch_opts())
        return
    for g, m, s in zip(grads, mask.view(torch.bool).split(sizes), shapes):
        if g is not None:
            g.mul_(m.view(s))


@dataclass(slots=True)
class _Slot:
    """One quantizer's ``w_hat`` from a group computation, and what it was computed from."""

    tensor: Tensor
    uses: int  # modules still to take it in this mode and forward (tied layers share a quantizer)
    version: int  # the weight's version counter and storage at the time
    ptr: int
    grad: bool  # grad mode at the time
    state: _State


class BatchedFakeQuant:
    """The group of fusable quantizers of one prepared model (see the module docstring)."""

    def __init__(self, members: list):
        # members: (quantizer, a module whose .weight it quantizes, Linear users, Embedding users)
        self.members = [(weakref.ref(q), weakref.ref(m)) for q, m, _, _ in members]
        self.users = {id(q): (n_lin, n_emb) for q, _, n_lin, n_emb in members}
        self.slots: dict[tuple[int, bool], _Slot] = {}  # (id(quantizer), detached) -> slot
        self._tables: dict = {}
        self.launches = 0  # kernel launches so far (tests check: one per format and forward)

    # -- when to use it ------------------------------------------------------------------------------
    @staticmethod
    def active(q, w: Tensor) -> bool:
        return _enabled() and _fusable(q, w)

    # -- the per-layer entry point ---------------------------------------------------------------------
    def take(self, q, w: Tensor, detached: bool = False) -> Optional[Tensor]:
        """``w_hat`` for quantizer ``q`` and its weight ``w`` from this forward's group computation, or None
        where the group does not cover the call (the caller then fake-quantizes alone). ``detached``: for
        a layer that recomputes ``w_hat`` in its backward (no autograd graph, no mask kept)."""
        key = (id(q), detached)
        slot = self.slots.get(key)
        if slot is None or not self._valid(slot, w):
            # checked on a miss only: a valid slot was computed in this forward, while the group was active
            # (an eager step is host-bound: these checks on every layer cost ~2 us each, x 210 in SmolLM2)
            if not self.active(q, w):
                return None
            self._refresh(w, detached)
            slot = self.slots.get(key)
            if slot is None or slot.ptr != w.data_ptr():
                return None
        slot.uses -= 1
        if slot.uses <= 0:
            del self.slots[key]
        return slot.tensor

    def _valid(self, slot: _Slot, w: Tensor) -> bool:
        return (not slot.state.backward_ran and slot.grad == torch.is_grad_enabled()
                and slot.version == w._version and slot.ptr == w.data_ptr())

    def _uses(self, q, w: Tensor, detached: bool, switch: Optional[str] = None) -> int:
        """How many modules take ``q``'s slot in this mode: Linears that recompute take detached ones.
        ``switch``: ``QAT_RECOMPUTE`` as the caller read it (once for all members)."""
        n_lin, n_emb = self.users[id(q)]
        recompute = q.recomputes(w, switch) if n_lin else False
        return (n_lin if recompute else 0) if detached else n_emb + (0 if recompute else n_lin)

    def _refresh(self, w_caller: Tensor, detached: bool) -> None:
        for key in [k for k in self.slots if k[1] == detached]:
            del self.slots[key]
        by_key: dict = {}
        # the switches, read once here rather than once per member
        triton_on = tfq.HAS_TRITON and not os.environ.get("QAT_DISABLE_TRITON")
        switch = os.environ.get("QAT_RECOMPUTE", "")
        dev = w_caller.device
        for qref, mref in self.members:
            q, m = qref(), mref()
            if q is None or m is None or not q.enabled or (q._frozen and not _is_kquant(q.fmt)):
                continue
            w = m.weight
            if (w.device != dev or w.dtype not in _WDT or w.shape[-1] % q.fmt.block
                    or not w.is_contiguous() or not _fusable(q, w, triton_on)):
                continue
            uses = self._uses(q, w, detached, switch)
            if uses:
                by_key.setdefault((q.fmt.name, w.dtype), []).append((q, w, uses))
        grad = torch.is_grad_enabled()
        for members in by_key.values():
            state = _State()
            qs, ws = [q for q, _, _ in members], [w for _, w, _ in members]
            if detached:
                with torch.no_grad():
                    outs = self._compute(qs, ws)[0]  # the masks are dropped here: backward recomputes them
            else:
                outs = _MultiSTE.apply(self, qs, state, *ws)
            for (q, w, uses), out in zip(members, outs):
                self.slots[(id(q), detached)] = _Slot(out, uses, w._version, w.data_ptr(), grad, state)

    # -- the launch ------------------------------------------------------------------------------------
    def _compute(self, qs: list, weights) -> tuple[list[Tensor], Optional[tuple]]:
        """Every weight's ``w_hat`` (views of one buffer) and, for the backward, ``(flat mask, tables)``."""
        fmt = qs[0].fmt
        if _is_kquant(fmt):
            return self._compute_kquant(fmt, weights), None
        self.launches += 1
        out, mask, tab = _multi_launch(weights, [q.scale for q in qs], [q.zero for q in qs], fmt, self._tables)
        # one C++ split, then a view per layer (slicing and viewing each layer apart: ~10 us of host time each)
        outs = [o.view(sh) for o, sh in zip(out.split(tab[10]), tab[11])]
        return outs, (mask, tab)

    def _compute_kquant(self, fmt, weights) -> list[Tensor]:
        """Every weight's k-quant ``w_hat``: the layers concatenated (as super-blocks) and searched in chunks."""
        out, launches = _kquant_flat(fmt, weights)
        self.launches += launches
        outs, start = [], 0
        for w in weights:
            outs.append(out[start:start + w.numel()].view(w.shape))
            start += w.numel()
        return outs


def _kquant_flat(fmt, weights) -> tuple[Tensor, int]:
    """``(flat w_hat of all weights, calls)``: one k-quant format's weights concatenated (as super-blocks)
    and searched in chunks of at most ``KQ_CHUNK`` elements."""
    w0 = weights[0]
    out = torch.empty(sum(w.numel() for w in weights), dtype=w0.dtype, device=w0.device)
    chunk, start, pos, calls = [], 0, 0, 0
    for i, w in enumerate(weights):
        chunk.append(w.detach().reshape(-1))
        pos += w.numel()
        if pos - start >= KQ_CHUNK or i == len(weights) - 1:
            flat = chunk[0] if len(chunk) == 1 else torch.cat(chunk)
            out[start:pos] = fmt.fake(flat.reshape(-1, fmt.block)).reshape(-1)  # cast to w's dtype here
            calls += 1
            chunk, start = [], pos
    return out, calls


def _multi_launch(weights, scales, zeros, fmt, cache: dict) -> tuple[Tensor, Tensor, tuple]:
    """One ``_fq_multi_kernel`` launch over ``weights`` (one format and dtype; the dynamic rule, whose
    parameters it writes into ``scales``/``zeros`` in place): ``(flat w_hat, flat uint8 clip mask, tables)``.
    ``cache``: the program tables by member set."""
    w0 = weights[0]
    tab = cached_tables(cache, weights, scales, zeros, fmt)
    wp, sp, zp, off, nb, pl, pr, total, rows, block, sizes, shapes, _, aligned = tab
    out = torch.empty(total, dtype=w0.dtype, device=w0.device)
    mask = torch.empty(total, dtype=torch.uint8, device=w0.device)
    tfq._fq_multi_kernel[(pl.numel(),)](
        w0, wp, out, mask, sp, zp, off, nb, pl, pr, float(fmt.qmin), float(fmt.qmax),
        float(getattr(fmt, "offset", 0)), BLOCK=fmt.block, ROWS=rows, KIND=tfq.kernel_kind(fmt),
        HAS_ZERO=zeros[0] is not None, SCALE_F16=fmt.scale_dtype == torch.float16, ALIGNED=aligned,
        num_warps=4, **tfq.launch_opts())
    return out, mask, tab


def cached_tables(cache: dict, weights, scales, zeros, fmt, rows: Optional[int] = None) -> tuple:
    """``_tables_for(...)`` from ``cache`` (at most 8 entries, the oldest dropped), built on a miss."""
    # keyed by the members themselves: one format can have two groups in one step (the grad one, and the
    # detached one of layers that recompute in their backward, e.g. a tied lm_head), and a table keyed by
    # format alone was rebuilt twice per step (measured on an H200, SmolLM2 q4_k_m: 16 ms of host time)
    data_ptr = Tensor.data_ptr  # map over the unbound method: half the host time of a generator of tuples
    key = (fmt.name, tuple(map(data_ptr, weights)), tuple(map(data_ptr, scales)),
           None if zeros[0] is None else tuple(map(data_ptr, zeros)), tuple(map(Tensor.numel, weights)), rows)
    return tfq.cache_get(cache, key, lambda: _tables_for(weights, scales, zeros, fmt, rows))


def _tables_for(weights, scales, zeros, fmt, rows: Optional[int] = None):
    """The multi-layer kernels' program tables: every weight's offset from the first (``tfq.rel_offsets``),
    every scale's and zero's address, its offset in the flat output and its block count, program -> (layer,
    first block; ``rows`` blocks a program, by default 4096 elements' worth), and the weights' ``ALIGNED``
    constant."""
    dev = weights[0].device
    block = fmt.block
    rows = rows or max(1, 4096 // block)
    wp, aligned = tfq.rel_offsets(weights)
    sp = [s.data_ptr() for s in scales]
    zp = [(z if z is not None else s).data_ptr() for s, z in zip(scales, zeros)]
    sizes = torch.tensor([w.numel() for w in weights], dtype=torch.int64)
    off = torch.cumsum(sizes, 0) - sizes
    nb = sizes // block
    pl, pr = tfq.program_runs(nb, rows)  # program p -> (layer pl[p], first block pr[p])
    start = int(sizes.sum())
    i64 = dict(dtype=torch.int64, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    return (wp, torch.tensor(sp, **i64), torch.tensor(zp, **i64), off.to(**i64),
            nb.to(**i32), pl.to(**i32), pr.to(**i32), start, rows, block,
            [w.numel() for w in weights], [w.shape for w in weights], weights[0].dtype, aligned)


def attach(model: torch.nn.Module) -> Optional[BatchedFakeQuant]:
    """Give every fusable weight quantizer of a prepared ``model`` one shared group (``prepare`` calls this)."""
    from ..modules import FakeQuantEmbedding, FakeQuantLinear

    counts: dict[int, list] = {}
    users = []  # every module of the group (a tied quantizer has two)
    for m in model.modules():
        if type(m) in (FakeQuantLinear, FakeQuantEmbedding):
            q = m.weight_fake_quant
            if _is_kquant(q.fmt) or (tfq.HAS_TRITON and q.affine and q.observer == "dynamic"
                                     and tfq.kernel_kind(q.fmt) is not None):
                counts.setdefault(id(q), [q, m, 0, 0])[2 if type(m) is FakeQuantLinear else 3] += 1
                users.append(m)
    if not counts:
        return None
    group = BatchedFakeQuant([tuple(v) for v in counts.values()])
    for q, *_ in counts.values():
        _GROUPS[q] = group
    if tfq.HAS_TRITON:
        _patch_forward(model, [(q, m) for q, m, _, _ in counts.values()], users)
    return group



# -- torch.compile: every layer's fake quant in one opaque op -------------------------------------------------
# Under torch.compile the group above is off (its slots are host-side state); each layer then ran its own
# traced ``qat::fake_quant`` kernel, and the compiled step paid per layer for the launch, two allocations
# and the backward's ``grad * mask`` kernel: measured on an H200, SmolLM2-135M, 210 layers, +17 ms of host
# time per step against compiled bf16 (batch 1 x 32, host-bound), and at batch 8 x 2048 the GPU waited on
# it (83 ms against 73 ms). Here one op per (format, dtype) computes every ``w_hat`` into one flat buffer
# at the start of the forward, and its backward masks every gradient in one launch:
#
# * ``qat::fake_quant_group`` is a ``custom_op`` (opaque to inductor: its implementation runs as it is,
#   builds the multi-layer kernel's address tables on the host and launches it once; a ``triton_op`` could
#   not, since fake tensors have no addresses). With the dynamic rule the kernel writes each observer's
#   scale/zero buffers in place, as eager does; nothing in the graph reads them.
# * the fake quant has to run before the first layer and its results reach every layer in the same trace:
#   the members' lowest common module gets a ``forward`` that, while dynamo traces it, sets each
#   quantizer's ``_w_hat`` to its view of the flat output, runs the module's own forward and clears them
#   again (no state outlives the call). Outside torch.compile it only calls the module's forward.
# * a member not used in a forward gets a zero gradient (its slice of the flat one), not None.
# * the backward writes each weight's masked gradient into a tensor of its own (one launch): views of one
#   flat gradient made AOTAutograd rebuild every alias in Python after the backward (8 ms per step).
# * default: k-quants only (see ``_compile_group_affine``); ``QAT_COMPILE_GROUP=1`` adds the Triton-kernel
#   formats, which keep the per-layer ``qat::fake_quant`` op otherwise (it measured faster so far).
if tfq.HAS_TRITON:

    @torch.library.custom_op("qat::fake_quant_group", mutates_args=())
    def _fq_group_op(ws: list[Tensor], scales: list[Tensor], zeros: list[Tensor], fmt_name: str) -> tuple[Tensor, Tensor]:
        from ..formats import get_format

        fmt = get_format(fmt_name)
        if _is_kquant(fmt):
            out, _ = _kquant_flat(fmt, ws)
            return out, out.new_empty(0, dtype=torch.uint8)
        # the weights as they come (no detach: the kernel reads their addresses only): this op runs on the
        # host before the step's first kernel, while the GPU waits, so every call here counts in full
        out, mask, _ = _multi_launch(ws, scales, list(zeros) or [None] * len(ws), fmt, _COMPILED_TABLES)
        return out, mask

    @_fq_group_op.register_fake
    def _fq_group_fake(ws, scales, zeros, fmt_name):
        from ..formats import get_format

        total = sum(w.numel() for w in ws)
        kq = _is_kquant(get_format(fmt_name))
        return ws[0].new_empty(total), ws[0].new_empty(0 if kq else total, dtype=torch.uint8)

    @torch.library.custom_op("qat::fake_quant_group_grad", mutates_args=())
    def _fq_group_grad_op(grad: Tensor, mask: Tensor, ws: list[Tensor], fmt_name: str) -> list[Tensor]:
        """Each weight's gradient, ``grad * mask`` over its slice of the flat ones (k-quants: no mask), as a
        tensor of its own, in one launch (see ``_mask_split_kernel``)."""
        from ..formats import get_format

        fmt = get_format(fmt_name)
        outs = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in ws]
        key = ("grad", fmt.name, tuple((w.data_ptr(), w.numel()) for w in ws))
        # only the offsets and program lists are used here (the weights stand in for the scales)
        tab = tfq.cache_get(_COMPILED_TABLES, key, lambda: _tables_for(ws, ws, [None] * len(ws), fmt), limit=16)
        _, _, _, off, nb, pl, pr, _, rows, block, _, _, _, _ = tab
        op, aligned = tfq.rel_offsets(outs)
        tfq._mask_split_kernel[(pl.numel(),)](grad, mask if mask.numel() else grad, outs[0], op, off, nb, pl, pr,
                                              BLOCK=block, ROWS=rows, ALIGNED=aligned, MASKED=mask.numel() > 0,
                                              num_warps=4, **tfq.launch_opts())
        return outs

    @_fq_group_grad_op.register_fake
    def _fq_group_grad_fake(grad, mask, ws, fmt_name):
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in ws]

    def _fq_group_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], *inputs[0])
        ctx.fmt_name = inputs[3]
        ctx.n_params = (len(inputs[1]), len(inputs[2]))

    def _fq_group_backward(ctx, grad, _grad_mask):
        mask, *ws = ctx.saved_tensors
        # the STE: grad * mask, bitwise torch's grad * mask of the eager path (-g*0 = -0); k-quants: plain STE
        grads = torch.ops.qat.fake_quant_group_grad(grad.contiguous(), mask, ws, ctx.fmt_name)
        n_scales, n_zeros = ctx.n_params  # the returned structure must be the inputs' (lists included)
        return grads, [None] * n_scales, [None] * n_zeros, None

    _fq_group_op.register_autograd(_fq_group_backward, setup_context=_fq_group_setup)

_COMPILED_TABLES: dict = {}


@torch.compiler.assume_constant_result
def _compile_group_on() -> bool:
    """Read when dynamo traces a forward (not guarded on): ``QAT_BATCHED_FQ=0`` or more than one process
    (DDP/FSDP: shards, and gradient hooks per parameter) keep the per-layer op."""
    return tfq.HAS_TRITON and _enabled_env()


@torch.compiler.assume_constant_result
def _compile_group_affine() -> bool:
    """Do the Triton-kernel formats (Q4_0, Q8_0, intN, ...) take the group op under compile? Only with
    ``QAT_COMPILE_GROUP=1``: measured on H200s (SmolLM2, batch 8 x 2048), the group made the compiled step
    1.058-1.073x bf16, where the per-layer op measured 1.024-1.028x in other runs (not yet side by side in
    one run; BENCHMARKS.md). K-quants always take it: their per-layer path under compile is the traced torch
    search, with graph breaks (18 in a 2-layer model on an H200)."""
    return os.environ.get("QAT_COMPILE_GROUP", "") == "1"


def _enabled_env() -> bool:
    """``QAT_BATCHED_FQ`` is not "0", and one process (under DDP/FSDP the group is off)."""
    if os.environ.get("QAT_BATCHED_FQ", "1") == "0":
        return False
    d = torch.distributed
    return not (d.is_available() and d.is_initialized() and d.get_world_size() > 1)


def _stash(members) -> list:
    """Sets ``q._w_hat`` for every member that takes the group op now (see above); returns those quantizers."""
    by_key: dict = {}
    affine = _compile_group_affine()
    for q, m in members:
        if not q.enabled or q._frozen:
            continue
        w = m.weight
        if w.dtype not in _WDT or w.shape[-1] % q.fmt.block or not w.is_contiguous():
            continue
        # k-quants: any device (the op calls fmt.fake: their Triton kernel on CUDA, llama.cpp's encoder or
        # ours elsewhere); the rest: the Triton kernel's formats under the dynamic rule, when switched on
        if not _is_kquant(q.fmt) and (not affine or not (w.is_cuda or tfq.INTERPRET) or q.observer != "dynamic"
                                      or tfq.kernel_kind(q.fmt) is None):
            continue
        by_key.setdefault((q.fmt.name, w.dtype, w.device), []).append((q, w))
    done = []
    for (name, _, _), mem in by_key.items():
        qs, ws = [q for q, _ in mem], [w for _, w in mem]
        kq = _is_kquant(qs[0].fmt)
        scales = [] if kq else [q.scale for q in qs]
        zeros = [] if kq or qs[0].zero is None else [q.zero for q in qs]
        out, _ = torch.ops.qat.fake_quant_group(ws, scales, zeros, name)
        for q, w, v in zip(qs, ws, out.split([w.numel() for w in ws])):
            q._w_hat = v.view(w.shape)
            done.append(q)
    return done


def _group_forward(self, *args, **kwargs):
    """The forward of a prepared model's module that holds every fusable layer (see above)."""
    fwd = type(self).forward
    if not (torch.compiler.is_compiling() and _compile_group_on()):
        return fwd(self, *args, **kwargs)
    # without the affine group (the default), only the k-quant members can take the op: the others are not
    # looked at, so dynamo guards nothing of theirs here (each member read here adds guards that every call
    # checks, some in Python; a 16-layer tiny Llama with 112 packed layers, CPU: cache lookup ~1.07 -> ~0.95 ms)
    stashed = _stash(self._qat_compile_members if _compile_group_affine() else self._qat_compile_kquant)
    try:
        return fwd(self, *args, **kwargs)
    finally:
        for q in stashed:
            q._w_hat = None


def _patch_forward(model: torch.nn.Module, members: list, users: list) -> None:
    """Give the lowest module holding every user module of the members (quantizer, module) the group
    forward, unless something (accelerate's hooks, say) already set an instance ``forward``: then compile
    keeps the per-layer op. (A tied lm_head is a user outside the decoder: the root then holds them all.)"""
    import functools
    import types

    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    paths = [names[id(m)].split(".") if names[id(m)] else [] for m in users]
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    # the lowest module that is itself called: not a member (a single layer: its parent runs it), and not a
    # container without a forward of its own (ModuleList, ModuleDict: their parent iterates them)
    member_ids = {id(m) for m in users}
    while True:
        owner = model.get_submodule(".".join(common))
        if id(owner) not in member_ids and type(owner).forward is not torch.nn.Module.forward:
            break
        if not common:
            return
        common = common[:-1]
    if "forward" in owner.__dict__:
        return

    @functools.wraps(type(owner).forward)  # keeps the signature (HF inspects it) and the docstring
    def forward(self, *args, **kwargs):
        return _group_forward(self, *args, **kwargs)

    # bound to ``owner``: deepcopy rebinds it to the copy; pickle stores it as getattr(owner, "forward"), so
    # a loaded model runs its class's forward (the per-layer op under compile)
    owner.forward = types.MethodType(forward, owner)
    owner._qat_compile_members = members
    owner._qat_compile_kquant = [(q, m) for q, m in members if _is_kquant(q.fmt)]  # formats are set at prepare


def unpatch_forward(model: torch.nn.Module) -> None:
    """Undo ``_patch_forward`` (``qat.unprepare``)."""
    for m in model.modules():
        if "_qat_compile_members" in m.__dict__:
            del m.__dict__["_qat_compile_members"]
            m.__dict__.pop("_qat_compile_kquant", None)
            m.__dict__.pop("forward", None)
