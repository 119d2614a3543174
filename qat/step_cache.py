"""Fake quant once per optimizer step: the step cache.

A fake-quantized linear normally runs its fake quant in every forward (one kernel per layer) and its STE in
every backward (``grad * mask``, one more kernel per layer). On a model of many small layers that is
latency, not bandwidth: SmolLM2-135M has 210 of them, ~2-3 us of GPU time each plus their launch gaps,
and its compiled QAT step stayed at 1.026x bf16's with every other cost removed (BENCHMARKS.md).

Between two optimizer steps the weights do not change, so neither do ``w_hat`` and the clip mask. The step
cache computes every covered layer's ``w_hat`` in one launch right after the optimizer step, into a tensor
per layer that the forward multiplies by (``FakeQuantLinear._w_cache``, a leaf that takes the gradient of
``w_hat``): the forward and backward graphs are then those of an unquantized model. Before the next
optimizer step, one more launch recomputes the clip masks from the unchanged weights and stored parameters
and moves ``mask * grad(w_hat)`` to ``weight.grad``: the STE's gradient, bitwise (the same product), and
for gradient accumulation too (the mask is the same for every micro-batch).

Covered: ``FakeQuantLinear`` layers with an affine format and the ``dynamic`` or ``mse`` observer (frozen or
not; ``learned`` scales take gradients of their own), whose weight no other fake-quant module shares, and
k-quant layers (``q4_k`` ... and the ``_k_m`` mixes' k-quant tensors), whose STE is the identity, so ``flush``
only moves their gradients. Anything else keeps its path. Affine formats: one launch per (format, dtype) on
CUDA with Triton; elsewhere the same numbers per layer with torch (``ste_forward``, what the eager STE
computes). K-quants: the group search of ``kernels/batch.py`` (all layers of one type at once, bitwise the
per-layer result), then a copy into each cache.

Large layers (the recompute path's size rule, ``RECOMPUTE_MIN_NUMEL`` on CUDA) would keep ``w_hat`` for the
whole step: 2 bytes per weight, 1.083x bf16's peak memory on a ~1B Llama (BENCHMARKS.md). Those in a format
of at most 4-bit codes (Q4_0, Q4_1, int4/int3/int2) are *packed* instead (``_PackBuf``, Triton only):
one launch after the optimizer step writes their codes two per byte, the stored scale (and zero term) per
block and one bit per weight saying where the code was clamped (~0.7 bytes per weight for Q4_0); every
forward unpacks ``w_hat`` from them, and the backward again (the recompute path's autograd node in eager mode;
``qat::unpack_w`` in a checkpoint region under compile), at ~2.5 bytes per weight against the fake quant
kernel's 5. Their STE is split: the identity in the graph, and the clip mask applied to ``weight.grad`` from the
bits by ``flush``, one launch for all of them (only the clamped elements are touched; applying it again after
another micro-batch changes nothing). Same bits as fake quant in every forward. ``QAT_STEP_CACHE_PACK=0``
leaves them to recompute fake quant. Other large layers recompute as before.

Who calls it: ``QATCallback`` on one GPU by default (a weight the forward does not use gets no gradient from
DDP's reducer, so never under DDP/FSDP); it refreshes right after the optimizer step (the refresh's host work
overlaps the optimizer's kernels, its launches a side stream: ``refresh(overlap=True)``) and checks again, and
waits for that stream, at every batch's start; it flushes after every backward, before clipping and before
fp16's GradScaler unscales. In a plain loop::

    cache = StepCache(model)
    cache.watch(opt)               # fused optimizers change the weights without bumping their versions
    cache.refresh()
    for batch in data:
        cache.refresh_if_stale()   # also waits for the refresh below (on the device: no host sync)
        loss = model(batch); loss.backward()
        cache.flush()              # before anything reads .grad (clipping, the optimizer); per micro-batch is fine
        opt.step(); opt.zero_grad()
        cache.refresh_if_stale(overlap=True)  # after every change of the weights (here: the optimizer step)
    cache.wait()                   # before anything else reads the caches or the quantizers' buffers
    cache.close()

A layer whose weight changed since the last ``refresh`` (eager: ``weight._version``) ignores its cache and
fake-quantizes as usual, so a missed ``refresh`` costs speed, not numbers. Under ``torch.compile`` that check
is not traced: there ``refresh`` must follow every change of the weights (the callback does it).
"""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .fake_quant import ste_forward
from .formats import AffineFormat
from .kernels import triton_fq as tfq
from .kernels.batch import _fusable, _is_kquant, _kquant_flat, cached_tables
from .modules import FakeQuantLinear, is_fake_quant
from .observers import switch_epoch

__all__ = ["StepCache"]


class _Marks:
    """The version marks of a group of layers: the weights' versions their caches were computed from, in group
    order, or None while unmarked. A plan's cached layers share one (each layer's ``_w_cache_at`` is (it, the
    layer's index), read by ``FakeQuantLinear._w_cache_version``), and so do a packed group's (``_PackBuf.marks``,
    read by ``_Packed.version``). One assignment marks or unmarks them all: the marks are set at every batch's
    start, where the GPU waits for the host, and per-layer writes cost ~1 us each there (session 17)."""

    def __init__(self):
        self.versions: Optional[list] = None

    def version(self, index: int) -> int:
        """The version of layer ``index``; -1 (no version a weight has) while unmarked."""
        versions = self.versions
        return -1 if versions is None else versions[index]


class _PackBuf:
    """The flat buffers of one group of packed layers (one format and weight dtype): the codes two per byte,
    the stored scale (and zero term) per block, and one int32 of clip bits per 32 elements."""

    def __init__(self, fmt, total: int, device, has_zero: bool):
        s_dt, z_dt = tfq.packed_param_dtypes(fmt)
        self.total = total
        self.codes = torch.empty(total // 2, dtype=torch.uint8, device=device)
        self.ps = torch.empty(total // fmt.block, dtype=s_dt, device=device)
        self.pz = torch.empty(total // fmt.block, dtype=z_dt, device=device) if has_zero else None
        self.words = torch.empty(total // 32, dtype=torch.int32, device=device)
        self.marks = _Marks()  # the members' weight versions the codes were computed from (``_Packed.version``)


class _Packed:
    """One layer's place in its group's ``_PackBuf`` (blocks ``b_off`` .. ``b_off + n_blocks``), and the weight
    version the codes were computed from. The eager forward takes it as the recompute path's quantizer
    (``fake_quant_detached``/``redo``: w_hat unpacked in the forward and again in the backward, the identity
    STE there; ``StepCache.flush`` applies the mask to the weight's gradient)."""

    def __init__(self, buf: _PackBuf, b_off: int, n_blocks: int, fmt, index: int):
        self.buf, self.b_off, self.n_blocks, self.fmt = buf, b_off, n_blocks, fmt
        # for the compiled forward: the format's name, a string dynamo guards by value (the format object, shared
        # by many layers, took an identity guard per layer, evaluated in Python on every call)
        self.fmt_name = fmt.name
        self.index = index  # the layer's place in its group (``_PackBuf.marks``)

    @property
    def version(self) -> int:
        """The weight's version the codes were computed from; -1 (no version a weight has) while unmarked."""
        return self.buf.marks.version(self.index)

    def w_hat(self, w: Tensor) -> Tensor:
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        return tfq.unpack(self.buf.codes, self.buf.ps, self.buf.pz, self.b_off, self.n_blocks, self.fmt, out)

    def compiled_w_hat(self, w: Tensor) -> Tensor:
        """Under torch.compile: the ``qat::unpack_w`` op, whose gradient reaches ``w`` unchanged."""
        return torch.ops.qat.unpack_w(w, self.buf.codes, self.buf.ps, self.buf.pz, self.b_off, self.fmt_name)

    def fake_quant_detached(self, w: Tensor):
        return self.w_hat(w), "packed", ()

    def redo(self, w: Tensor, how: str, params: tuple):
        return self.w_hat(w), _identity


def _identity(g: Tensor) -> tuple:
    return (g,)


def _w(m) -> Tensor:
    """``m.weight``, read from the module's dict: ``nn.Module.__getattr__`` costs ~0.4 us a call, and the step
    cache's per-step loops read thousands of these (SmolLM2: 210 layers)."""
    return m._parameters["weight"]


def _q(m):
    """``m.weight_fake_quant`` (as ``_w``)."""
    return m._modules["weight_fake_quant"]


def _rule_in_kernel(m) -> bool:
    """Whether the refresh kernel computes the layer's parameters (the ``dynamic`` rule, not frozen)."""
    q = _q(m)
    return q.observer == "dynamic" and not q._frozen


class StepCache:
    def __init__(self, model: nn.Module):
        users: dict[int, int] = {}
        holders: dict[int, int] = {}  # modules holding each parameter, fake-quant or not (a tied head's embedding)
        for m in model.modules():
            if is_fake_quant(m):
                users[id(m.weight)] = users.get(id(m.weight), 0) + 1
            for p in m.parameters(recurse=False):
                holders[id(p)] = holders.get(id(p), 0) + 1
        switch = os.environ.get("QAT_RECOMPUTE", "")
        pack = os.environ.get("QAT_STEP_CACHE_PACK", "") != "0"
        self.modules: list[FakeQuantLinear] = []
        self.packed: list[FakeQuantLinear] = []  # large 4-bit layers: codes, not w_hat (``_Packed``)
        for m in model.modules():
            q = getattr(m, "weight_fake_quant", None)
            if not isinstance(m, FakeQuantLinear) or q is None or q.observer == "learned" or users[id(m.weight)] > 1:
                continue
            if m._parameters.get("weight") is not m.weight or m._modules.get("weight_fake_quant") is not q:
                continue  # e.g. a parametrized weight: ``_w``/``_q`` read the module's dicts
            if not (isinstance(q.fmt, AffineFormat) or _is_kquant(q.fmt)):
                continue
            if q.recompute_rule(m.weight, switch):  # large: no w_hat for the whole step; 4-bit codes may do
                # flush masks the weight's whole gradient: not for a weight another module adds to
                if pack and tfq.packable(q.fmt) and q.observer in ("dynamic", "mse") and holders[id(m.weight)] == 1:
                    self.packed.append(m)
                continue
            self.modules.append(m)
        # every covered layer's parameter and submodule dicts, in ``_state``'s order: what ``_w``/``_q`` read,
        # without the module and its ``__dict__`` (``_state`` runs at every batch's start, after the host waited
        # for the GPU: 112 layers' state in 150 instead of 220 us with the caches cold, 40 instead of 52 warm,
        # on this 2-core CPU; session 17)
        self._params = [m._parameters for m in self.modules + self.packed]
        self._mods = [m._modules for m in self.modules + self.packed]
        # the quantizers' switches (enabled, frozen) as ``_state`` last read them, and ``switch_epoch()`` then:
        # read again only when some switch was set since
        self._switches: tuple = ()
        self._switch_epoch: Optional[int] = None
        self._marks = _Marks()  # the cached layers' version marks (``_mark``)
        self._tables: dict = {}
        self._bufs: dict = {}  # the packed layers' flat buffers, per group
        self._clip_tables: dict = {}  # the packed layers' clip mask launch tables (``tfq.clip_zero``)
        self._masked_at: dict = {}  # id(module) -> (codes' version, the gradient (weakly), its version) when masked
        self.masked = 0  # packed layers' gradients ``flush`` masked, in total
        self._versions: Optional[list] = None
        # the layout the plan was made for (every covered weight's address, dtype, grad flag, quantizer switches)
        # and the plan: the live layers and their launch groups (refresh), and flush's groups by member set
        self._layout: Optional[list] = None
        self._plan: Optional[tuple] = None
        self._flush_groups: dict = {}
        self.refreshes = 0  # how many times ``refresh`` ran
        self.moved = 0  # gradients ``flush`` moved to weights, in total
        self._stepped = False  # an optimizer ``watch`` watches stepped since the last refresh
        self._hooks: list = []
        # an overlapped refresh (``refresh(overlap=True)``) not yet waited for: (the event its side stream
        # records when done, or None off CUDA; the version assignments that let the eager forwards use it)
        self._pending: Optional[tuple] = None
        self._side: Optional[torch.cuda.Stream] = None  # the side stream overlapped refreshes run on (CUDA)
        self._side_device: Optional[torch.device] = None  # the covered weights' one device (set with each plan)
        self.overlapped = 0  # refreshes that ran on the side stream

    # -- which layers use their cache this step ---------------------------------------------------------
    @staticmethod
    def _live(mods: list, attr: str) -> list[FakeQuantLinear]:
        """The layers of ``mods`` that train with fake quant on; the others' cache (``attr``) is dropped."""
        live = []
        for m in mods:
            if _q(m).enabled and _w(m).requires_grad:
                live.append(m)
            else:
                setattr(m, attr, None)
        return live

    def _state(self) -> list:
        """Every covered weight's ``(version, address, dtype, requires_grad)``, then one more item: every
        quantizer's ``(enabled, frozen)``, read again only if a switch was set since the last read."""
        out = []
        for params in self._params:
            w = params["weight"]  # ``_w(m)``
            out.append((w._version, w.data_ptr(), w.dtype, w.requires_grad))
        epoch = switch_epoch()
        if epoch != self._switch_epoch:
            self._switches = tuple((q.enabled, q._frozen) for q in (mods["weight_fake_quant"] for mods in self._mods))
            self._switch_epoch = epoch
        out.append(self._switches)
        return out

    def stale(self) -> bool:
        """Whether any covered weight changed (or moved), or a quantizer was switched or frozen, or a watched
        optimizer stepped, since the last ``refresh``."""
        return self._changed(self._state())

    def _changed(self, state: list) -> bool:
        """``stale()`` given ``state`` (``_state()`` now)."""
        return self._stepped or state != self._versions

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s steps as changes of the weights. Needed for fused optimizers: ``_fused_adamw_``
        (``AdamW(fused=True)``) and bitsandbytes' optimizers (``AdamW8bit``, their own kernels) write the
        weights without bumping their version counters, so neither ``refresh_if_stale`` nor the eager
        forward's version check would see the step (every forward after the first step would train on the
        old ``w_hat``). After each step the caches are marked stale until the next ``refresh``: an eager
        forward before it fake-quantizes as usual; a compiled one cannot check, so ``refresh`` (or
        ``refresh_if_stale``) must come first, as with any change of the weights."""
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, *_) -> None:
        self._stepped = True
        if self._pending is not None:  # an overlapped refresh of the weights before this step: its marks are stale
            self._pending = (self._pending[0], [], self._pending[2])
        self._unmark()

    def _unmark(self) -> None:
        """No eager forward uses a cache until the next marks (``_mark``)."""
        self._marks.versions = None  # no version a weight has: the eager forward ignores the cache
        for buf in self._bufs.values():  # every live packed layer's ``_Packed`` is in one of these
            buf.marks.versions = None

    # -- after every change of the weights ------------------------------------------------------------------
    def refresh(self, overlap: bool = False) -> None:
        """Every live layer's ``w_hat`` into its cache (and, as a forward would, the observer's parameters
        into its buffers).

        ``overlap=True``: on CUDA the launches go to a side stream, after the work queued so far on the
        current one, and nothing on the current stream waits for them until ``wait()`` (or a later
        ``refresh_if_stale()``/``flush``/``close``). Meant for right after the optimizer step: a training
        loop syncs the current stream at the step's end (Lightning's progress bar reads the loss), and the
        next step's host work (its hooks, dynamo's guards) leaves the GPU idle for ~1-2 ms, in which the
        refresh runs instead of on the critical path. Until ``wait()`` the eager forwards ignore the caches
        (fake quant as usual, the same numbers: their version marks are set at ``wait()``); a compiled
        forward cannot check, so ``wait()`` must come before it, and before anything reads the quantizers'
        buffers (the refresh writes the dynamic rule's parameters there). Off CUDA the refresh runs at once
        and only the marks wait."""
        self._refresh(self._state(), overlap)

    @torch.no_grad()
    def _refresh(self, state: list, overlap: bool = False) -> None:
        """``refresh`` from ``state`` (``_state()`` now; refresh changes no weight, so also the state after it)."""
        self._wait(mark=False)  # an earlier overlapped refresh: ordered before this one, its marks superseded
        layout = [s[1:] for s in state[:-1]] + [state[-1]]  # where the weights are and which train, not their versions
        replanned = layout != self._layout
        if replanned:
            self._plan, self._layout, self._flush_groups = self._make_plan(), layout, {}
            # a side stream is one device's: only when every covered weight is on that one CUDA device
            devices = {_w(m).device for m in self.modules + self.packed}
            self._side_device = devices.pop() if len(devices) == 1 else None
        live, groups, packed_groups = self._plan
        # a side stream only when nothing is allocated for good: a new plan's caches and buffers come from the
        # current stream's pool (the caching allocator keeps blocks per stream)
        side = self._side_stream() if overlap and not replanned else None
        if overlap and not self._stepped:
            # the weights' versions may be those the eager forwards' marks hold (a refresh without a step): until
            # ``wait()`` they must not read what the side stream writes. After a watched step ``_after_step`` did this
            self._unmark()
        main = None
        if side is None:
            marks = self._launch_refresh(live, groups, packed_groups)
            event = None
        else:
            main = torch.cuda.current_stream(side.device)
            side.wait_stream(main)  # the optimizer's writes to the weights first
            had = {id(tab) for tab in self._tables.values()}
            with torch.cuda.stream(side):
                marks = self._launch_refresh(live, groups, packed_groups)
            for tab in self._tables.values():  # a launch table built on the side stream: flush reads it on this one
                if id(tab) not in had:
                    for t in tab:
                        if isinstance(t, Tensor) and t.is_cuda:
                            t.record_stream(main)
            event = side.record_event()
            self.overlapped += 1
        if overlap:
            self._pending = (event, marks, main)
        else:
            self._mark(marks)
        self._versions, self._stepped = state, False
        self.refreshes += 1

    def _side_stream(self) -> Optional[torch.cuda.Stream]:
        dev = self._side_device
        if os.environ.get("QAT_STEP_CACHE_OVERLAP", "") == "0" or dev is None or dev.type != "cuda":
            return None
        if self._side is None or self._side.device != dev:
            self._side = torch.cuda.Stream(dev)
        return self._side

    @staticmethod
    def _mark(marks: list) -> None:
        """Let the eager forwards use the caches: each its weight's version when the refresh read it (one list
        per ``_Marks``)."""
        for holder, versions in marks:
            holder.versions = versions

    def wait(self) -> None:
        """After ``refresh(overlap=True)``: the current stream waits for the refresh (no host sync), and the
        eager forwards use the caches again. Nothing to do when no refresh is pending."""
        self._wait(mark=True)

    def _wait(self, mark: bool) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        event, marks, main = pending
        if event is not None:
            # the stream current at the refresh, if still current (no Stream object built: at the batch's start
            # the GPU waits for this host work)
            if torch._C._cuda_getCurrentStream(main.device_index)[0] == main.stream_id:
                event.wait(main)
            else:
                torch.cuda.current_stream(self._side.device).wait_event(event)
        if mark:
            self._mark(marks)

    def _launch_refresh(self, live: list, groups: list, packed_groups: list) -> list:
        """The refresh's launches; returns its version marks: (``_Marks``, its members' weight versions), for the
        cached layers and each packed group."""
        for group, fused in groups:
            fmt = _q(group[0]).fmt
            if _is_kquant(fmt):
                weights = [_w(m) for m in group]
                flat, _ = _kquant_flat(fmt, weights)
                for m, w, w_hat in zip(group, weights, flat.split([w.numel() for w in weights])):
                    m._w_cache.copy_(w_hat.view(w.shape))
            elif fused:
                in_kernel = _rule_in_kernel(group[0])  # else: mse's search (torch), or frozen parameters
                if not in_kernel:
                    for m in group:
                        _q(m).observe(_w(m))  # nothing when frozen
                self._launch(group, [m._w_cache for m in group], dynamic=in_kernel, mode=1)
            else:
                for m in group:
                    q, w = _q(m), _w(m)
                    q.observe(w)
                    m._w_cache.copy_(ste_forward(w, q.fmt, q.scale, q.zero)[0])
        return [(self._marks, [_w(m)._version for m in live])] + self._refresh_packed(packed_groups)

    def _make_plan(self) -> tuple:
        """``(live layers, their launch groups, the live packed layers' groups)`` for the current layout: a
        layer that does not train now drops its cache, a live one gets a cache of its weight's shape and dtype.
        Made again only when the layout changes (``refresh``): grouping SmolLM2's 210 layers costs ~0.5 ms of
        host time, which a compiled step of a small model waits for."""
        live = self._live(self.modules, "_w_cache")
        self._marks = _Marks()  # a new plan's layers: the old marks' indices no longer hold
        for i, m in enumerate(live):
            m.__dict__["_w_cache_at"] = (self._marks, i)
            c, w = m._w_cache, _w(m)
            if c is None or c.shape != w.shape or c.dtype != w.dtype or c.device != w.device:
                m._w_cache = torch.empty_like(w, memory_format=torch.contiguous_format).requires_grad_(True)
        return live, self._groups(live), self._groups(self._live(self.packed, "_w_packed"))

    def _refresh_packed(self, groups: list) -> list:
        """Every live packed layer's codes, stored parameters and clip bits, one launch per group; returns the
        version marks of their groups' ``_PackBuf`` (``_launch_refresh``)."""
        used, marks = set(), []
        for group, fused in groups:
            fmt, w0 = _q(group[0]).fmt, _w(group[0])
            if not fused:  # no Triton here, or a weight the kernel does not take: fake quant as usual
                for m in group:
                    m._w_packed = None
                continue
            in_kernel = _rule_in_kernel(group[0])
            if not in_kernel:
                for m in group:
                    _q(m).observe(_w(m))  # mse's search; nothing when frozen
            weights = [_w(m) for m in group]
            zeros = [_q(m).zero for m in group]
            wp, sp, zp, off, nb, pl, pr, total, rows, block, sizes, _, _, aligned = cached_tables(
                self._tables, weights, [_q(m).scale for m in group], zeros, fmt,
                rows=max(1, 1024 // fmt.block))
            key = (fmt.name, w0.dtype, w0.device, in_kernel)
            used.add(key)
            buf = self._bufs.get(key)
            if buf is None or buf.total != total:
                buf = self._bufs[key] = _PackBuf(fmt, total, w0.device, zeros[0] is not None)
            # 1024 elements and one warp a program: 23.9 -> 21.5 us against 4096 and 4 warps (one 8192 x 2048
            # bf16 weight, H100; the multi-layer kernels' other launches keep 4096)
            tfq._pack_table_kernel[(pl.numel(),)](
                w0, wp, sp, zp, off, nb, pl, pr, buf.codes, buf.ps, buf.ps if buf.pz is None else buf.pz, buf.words,
                float(fmt.qmin), float(fmt.qmax), float(getattr(fmt, "offset", 0)), BLOCK=block, ROWS=rows,
                KIND=tfq.kernel_kind(fmt), HAS_ZERO=zeros[0] is not None, SCALE_F16=fmt.scale_dtype == torch.float16,
                ALIGNED=aligned, DYNAMIC=in_kernel, num_warps=1, **tfq.launch_opts())
            start = 0
            for i, (m, n) in enumerate(zip(group, sizes)):
                pk = m._w_packed
                if pk is None or pk.buf is not buf or pk.b_off != start // block or pk.index != i:
                    pk = m._w_packed = _Packed(buf, start // block, n // block, fmt, i)
                start += n
            marks.append((buf.marks, [w._version for w in weights]))
        for key in [k for k in self._bufs if k not in used]:  # e.g. the unfrozen group's, after a freeze
            del self._bufs[key]
        return marks

    def refresh_if_stale(self, overlap: bool = False) -> None:
        """``refresh`` if ``stale()``. Without ``overlap``, also ``wait()`` for an overlapped refresh still
        pending: after it, the caches are ready for any forward."""
        state = self._state()  # once: ``_refresh`` takes it on
        if self._changed(state):
            self._refresh(state, overlap)
        if not overlap:
            self.wait()

    # -- before the optimizer reads .grad ------------------------------------------------------------------
    @torch.no_grad()
    def flush(self) -> None:
        """``weight.grad (+)= mask * grad(w_hat)`` for every layer whose cache took a gradient; and the packed
        layers' ``weight.grad *= mask`` (their graph's STE is the identity), one launch per group. Masking the
        same sum again (a later micro-batch, a second flush) changes nothing: the mask is 0 or 1."""
        self.wait()  # the clip bits and parameters of an overlapped refresh
        took = [m for m in self.modules if m._w_cache is not None and m._w_cache.grad is not None]
        key = tuple(map(id, took))
        groups = self._flush_groups.get(key)
        if groups is None:  # the same layers every step, as a rule: grouped once per layout (refresh clears it)
            groups = self._flush_groups[key] = self._groups(took)
        for group, fused in groups:
            grads = [m._w_cache.grad.contiguous() for m in group]
            if _is_kquant(_q(group[0]).fmt):
                pass  # the plain STE: the gradient of w_hat is the weight's
            elif fused:
                self._launch(group, grads, dynamic=False, mode=2)
            else:
                for m, g in zip(group, grads):
                    q = _q(m)
                    g.mul_(ste_forward(_w(m), q.fmt, q.scale, q.zero)[1])
            for m, g in zip(group, grads):
                m._w_cache.grad = None
                w = _w(m)
                if w.grad is None:
                    w.grad = g
                else:
                    w.grad += g
            self.moved += len(group)
        by_buf: dict = {}
        for m in self.packed:
            w = _w(m)
            pk, g = m._w_packed, w.grad
            # where the forward used the codes: the weight they came from (as the eager forward checks; compiled,
            # the forward always uses them); and not a gradient masked already (the callback flushes again
            # before the optimizer step): the same tensor (not one at the same address after zero_grad, as when
            # fp16's GradScaler skips a step) at the same version (the kernel's writes leave it as they found it)
            if pk is None or g is None or w._version != pk.version:
                continue
            done = self._masked_at.get(id(m))
            if done is not None and done[0] == pk.version and done[1]() is g and done[2] == g._version:
                continue
            by_buf.setdefault(id(pk.buf), []).append(m)
        for group in by_buf.values():
            buf = group[0]._w_packed.buf
            grads = [_w(m).grad for m in group]
            flat = [g if g.is_contiguous() else g.contiguous() for g in grads]
            tfq.clip_zero(flat, buf.words, [m._w_packed.b_off * m._w_packed.fmt.block // 32 for m in group],
                          self._clip_tables)
            for m, g, f in zip(group, grads, flat):
                if f is not g:
                    g.copy_(f)
                self._masked_at[id(m)] = (m._w_packed.version, weakref.ref(g), g._version)
            self.masked += len(group)

    def close(self) -> None:
        """Back to fake quant in every forward (frees the caches)."""
        self._wait(mark=False)  # the buffers go back to the allocator: after the work queued on them
        for m in self.modules:
            m._w_cache = None
            m.__dict__.pop("_w_cache_at", None)
        for m in self.packed:
            m._w_packed = None
        self._bufs, self._clip_tables, self._masked_at = {}, {}, {}
        self._versions = self._layout = self._plan = None
        for h in self._hooks:
            h.remove()
        self._hooks, self._stepped = [], False
        self._flush_groups = {}

    # -- launches --------------------------------------------------------------------------------------------
    @staticmethod
    def _groups(mods: list) -> list[tuple[list, bool]]:
        """``mods`` by (format, dtype), each with whether the multi-layer kernel takes it."""
        by: dict = {}
        for m in mods:
            w = _w(m)
            key = (_q(m).fmt.name, w.dtype, w.device, _rule_in_kernel(m))
            by.setdefault(key, []).append(m)
        out = []
        for group in by.values():
            w, fmt = _w(group[0]), _q(group[0]).fmt
            fused = (isinstance(fmt, AffineFormat) and _fusable(_q(group[0]), w)
                     and tfq.kernel_kind(fmt) is not None
                     and all(_w(m).is_contiguous() and _w(m).shape[-1] % fmt.block == 0 for m in group))
            out.append((group, fused))
        return out

    def _launch(self, group: list, outs: list[Tensor], dynamic: bool, mode: int) -> None:
        fmt = _q(group[0]).fmt
        weights = [_w(m) for m in group]
        zeros = [_q(m).zero for m in group]
        wp, sp, zp, _, nb, pl, pr, _, rows, block, _, _, _, w_aligned = cached_tables(
            self._tables, weights, [_q(m).scale for m in group], zeros, fmt)
        op, o_aligned = tfq.rel_offsets(outs)
        tfq._fq_table_kernel[(pl.numel(),)](
            weights[0], wp, outs[0], op, sp, zp, nb, pl, pr, float(fmt.qmin), float(fmt.qmax),
            float(getattr(fmt, "offset", 0)), BLOCK=block, ROWS=rows, KIND=tfq.kernel_kind(fmt),
            HAS_ZERO=zeros[0] is not None, SCALE_F16=fmt.scale_dtype == torch.float16,
            ALIGNED=min(w_aligned, o_aligned), DYNAMIC=dynamic, MODE=mode, num_warps=4, **tfq.launch_opts())
