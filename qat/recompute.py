"""The fake-quantized linear that recomputes ``w_hat`` in its backward instead of keeping it.

Why: ``F.linear(x, fake_quant(w))`` keeps ``w_hat`` until the backward (the matmul saves it for
``grad_x = g @ w_hat``: 2 bytes/param in bf16) and the STE keeps its clip mask (1 byte/param), where a
plain bf16 step saves only the parameter itself. On a ~1B Llama that was 1.088x bf16's peak memory
(BENCHMARKS.md). Here one autograd node runs fake quant + matmul and saves ``x``, the weight Parameter
and, for non-``dynamic`` observers, the small scale/zero tensors; its backward recomputes ``w_hat`` and
the mask for that layer alone (``WeightQuantizer.redo``: the same kernel with the same or recomputed
parameters, so the same bits), then ``grad_x = g @ w_hat`` and ``grad_w = ste(g^T x)``.

Bitwise today's numbers: forward and backward issue the aten calls, with the layouts, that autograd's
``linear`` -> ``addmm``/``mm`` backward issues (``mm_mat1_backward``/``mm_mat2_backward``, ``sum_to``
for the bias), and autocast's casts, so any device runs the same kernels (tests/test_recompute.py).

Not used (the layer keeps ``F.linear(x, fake_quant(w))``): under ``torch.compile`` (there the same rule puts
the fused ``triton_op`` in a ``torch.utils.checkpoint`` region and AOTAutograd's partitioner recomputes it:
``WeightQuantizer.recomputes_compiled``), without grad, for frozen weights, and for QLoRA layers.
Double backward through it is not supported.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["recompute_linear"]


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """Autocast's cast of a ``linear`` input (floating point, not fp64)."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _fold(x: Tensor) -> Tensor:
    """``x`` as the 2-D matrix ``linear`` multiplies (matmul folds leading dims: the weight needs grad)."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _addmm_bias(x: Tensor) -> bool:
    """Whether ``linear`` adds its bias inside ``addmm`` (else ``mm`` then ``add_``)."""
    return x.dim() == 2 or x.is_contiguous()


class _RecomputeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], w_hat: Tensor, q, how: str, *params):
        dtype = _autocast_dtype(x)
        xc, wc, bc = _cast(x, dtype), _cast(w_hat, dtype), _cast(bias, dtype)
        x2 = _fold(xc)
        if bc is not None and _addmm_bias(xc):
            y = torch.addmm(bc, x2, wc.t())
        else:
            y = x2.mm(wc.t())
        if xc.dim() != 2:  # not a view: an output may be modified in place, as linear's may
            y = torch.ops.aten._unsafe_view(y, (*xc.shape[:-1], wc.shape[0]))
        if bc is not None and not _addmm_bias(xc):
            y.add_(bc)
        ctx.save_for_backward(xc, weight, *params)
        ctx.q, ctx.how, ctx.dtype = q, how, dtype
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, w_hat.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        xc, weight, *params = ctx.saved_tensors
        x_dtype, b_dtype, w_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        grad_params = [None] * len(params)
        x2 = _fold(xc)
        if need_b:  # the engine's sum_to of addmm's (or add_'s) gradient to the bias shape
            gb = g.reshape(x2.shape[0], g.shape[-1]) if _addmm_bias(xc) else g
            dims = tuple(range(gb.dim() - 1))
            grad_b = (gb.sum(dims, keepdim=True).view(-1) if dims else gb).to(b_dtype)
        if not (need_x or need_w or any(ctx.needs_input_grad[6:])):
            return grad_x, grad_w, grad_b, None, None, None, *grad_params
        w_hat, ste = ctx.q.redo(weight, ctx.how, tuple(params))
        wc = _cast(w_hat, ctx.dtype)
        del w_hat
        g2 = g.reshape(x2.shape[0], g.shape[-1]) if xc.dim() != 2 else g
        mat2 = wc.t()
        if need_x:  # mm_mat1_backward (column-major input: column-major gradient)
            if x2.stride(0) == 1 and x2.stride(1) == x2.size(0):
                gx = mat2.mm(g2.t()).t()
            else:
                gx = g2.mm(mat2.t())
            grad_x = gx.reshape(xc.shape).to(x_dtype)
        if need_w or any(ctx.needs_input_grad[6:]):  # mm_mat2_backward, then t()'s backward
            column_major = mat2.stride(0) == 1 and mat2.stride(1) == mat2.size(0)
            del wc, mat2  # w_hat is done with: free it before the weight gradient is allocated
            gw = g2.t().mm(x2) if column_major else x2.t().mm(g2).t()
            grad_w, *grads = ste(gw.to(w_dtype))
            grad_params[:len(grads)] = grads
        return grad_x, grad_w, grad_b, None, None, None, *grad_params


def recompute_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], q) -> Tensor:
    """``F.linear(x, q(weight), bias)`` with the gradients of that, bitwise, keeping no ``w_hat`` or mask
    for the backward (``q.recomputes(weight)`` says when a layer uses it)."""
    w_hat, how, params = q.fake_quant_detached(weight)
    return _RecomputeLinear.apply(x, weight, bias, w_hat, q, how, *params)
