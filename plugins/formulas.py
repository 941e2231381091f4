"""Backward formulas, checked against autograd: the gradient of a residual block (convolution, BatchNorm,
ReLU, linear layer and the residual addition) written out by hand, evaluated on one block of this model and
compared with PyTorch's autograd in float64.

One question per section: does the textbook backward pass of y = post(F(x) + S(x)) describe what this model
really computes? The formulas themselves live in ``_formulas``.
"""

from __future__ import annotations

from resinspect import Section, hookimpl
from resinspect_plugins._formulas import check_model_formulas

NAME = "formulas"


@hookimpl
def resinspect_estimate(ctx) -> float:
    """A forward pass of a few images and the float64 checks of single layers, about 120 passes of one image
    (measured on torchvision's resnet50 at 224 px: 12 s)."""
    return 120.0 * ctx.multiply_adds()


@hookimpl
def resinspect_analyze(ctx) -> Section:
    return check_model_formulas(ctx)
