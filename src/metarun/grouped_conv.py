"""A grouped 2-D convolution that is twice differentiable with grouped convolutions only.

The batched meta-batch (:mod:`metarun.algorithms.vectorized`) runs the ``T`` tasks of a
meta-batch as the groups of one convolution; its second-order meta-gradient differentiates that
convolution twice, which this keeps grouped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GroupedConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` with a backward written
    from differentiable grouped convolutions, for second-order meta-gradients.

    PyTorch's own double backward of a grouped convolution (``_convolution_double_backward``)
    computes its weight-gradient term with one convolution per group: at 32 tasks a second-order
    meta-step issues ~100 extra small convolutions. Here the backward is ``grad_x =
    conv_transpose2d(grad_y, weight)`` and ``grad_weight = ConvWeightGrad(x, grad_y)``, whose own
    backward is again one grouped ``conv_transpose2d`` and one grouped ``conv2d``; the outer
    backward of a MAML step therefore runs every convolution once for all tasks. (In the same
    process: +15% second-order meta-it/s at meta-batch 32, 1 step; first order gains nothing, so
    the engine uses it for second order only.) ``tests/test_vectorized.py`` checks it with
    ``gradcheck`` and ``gradgradcheck``; the parity gate covers it end to end.

    Shapes: ``x [n, groups*C_in, H, W]``, ``weight [groups*C_out, C_in, kH, kW]`` -> ``[n, groups*C_out, H', W']``.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad_y, weight, x.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_weight = ConvWeightGrad.apply(x, grad_y, weight.shape, stride, padding, dilation, groups)
        return grad_x, grad_weight, None, None, None, None


class ConvWeightGrad(torch.autograd.Function):
    """The weight gradient of :class:`GroupedConv2d`, differentiable in ``x`` and ``grad_y``:
    ``<ConvWeightGrad(x, g), h>`` is linear in each, with gradients ``conv_transpose2d(g, h)``
    (for ``x``) and ``conv2d(x, h)`` (for ``g``)."""

    @staticmethod
    def forward(ctx, x, grad_y, weight_shape, stride, padding, dilation, groups):
        ctx.save_for_backward(x, grad_y)
        ctx.conf = (stride, padding, dilation, groups)
        return torch.nn.grad.conv2d_weight(x, weight_shape, grad_y, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_grad_weight):
        x, grad_y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad_y, grad_grad_weight, x.shape, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_grad_y = GroupedConv2d.apply(x, grad_grad_weight, stride, padding, dilation, groups)
        return grad_x, grad_grad_y, None, None, None, None, None


def input_grad(grad_y: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size, stride, padding, dilation,
               groups: int) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight)`` w.r.t. ``x`` (shape ``x_shape``): a transposed
    convolution, with the output padding that restores ``x``'s height and width."""
    output_padding = tuple(
        size + 2 * pad - dil * (kernel - 1) - 1 - (out - 1) * st
        for size, pad, dil, kernel, out, st in zip(x_shape[2:], padding, dilation, weight.shape[2:],
                                                   grad_y.shape[2:], stride, strict=True))
    return F.conv_transpose2d(grad_y, weight, None, stride, padding, output_padding, groups, dilation)
