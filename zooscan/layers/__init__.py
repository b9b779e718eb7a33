"""Find the first layer of any ``torch.nn.Module`` and turn it into one kernel.

The *first layer* (DESIGN §1) is the first 2-D convolution or linear layer applied to
the image input, possibly after parameter-free transforms (padding, space-to-depth,
flattening into patches, a fixed per-channel affine). :func:`find_first_layer` finds it
without weights:

1. **Trace.** The model, normally built on the ``meta`` device, runs one dummy forward
   under a :class:`~torch.overrides.TorchFunctionMode` that labels every tensor:
   *derived* (computed from the image by parameter-free operations), *tainted*
   (depends on the image through a learned parameter) or *parametric*. Forward
   pre-hooks on the modules see which tensor each ``Conv2d``/``Linear`` (subclasses
   included) consumes. The first one whose input is *derived* is the first layer.
2. **Branches.** The forward goes on while further convolutions consume the very same
   tensor object (re-parameterisable stems: RepVGG, MobileOne), recording the
   BatchNorm that follows each one and how their outputs are combined (summed, or
   concatenated). It is aborted, by an exception raised from a hook, at the first
   convolution or linear layer that consumes anything else, so the network is never
   run to the end.
3. **Probe.** When the first layer does not consume the image tensor itself, the
   parameter-free part of the forward before it is replayed on small CPU probe
   images (zeros, ones, channel index, pixel index, random): a meta model runs that
   part on CPU since it touches no parameter. This shows, for every value the layer
   reads, which image pixel it comes from and with which per-channel affine, hence the
   exact channel order of space-to-depth stems, the flatten order of linear patch
   embeddings, explicit padding, channel permutations and fixed input transforms
   (torchvision GoogLeNet/Inception3 ``transform_input``).

:class:`LayerSpec` holds the result. :meth:`LayerSpec.materialize` turns the
state-dict tensors it names (:attr:`LayerSpec.parameter_names`) into one
``(out, C, kh, kw)`` kernel in the image-input space: weight standardisation applied
(timm ``StdConv2d``/``ScaledStdConv2d``), summed branches fused with their BatchNorms
folded in, and space-to-depth or patch-embedding weights re-indexed so that the
kernel is applied to image patches flattened in ``(c, kh, kw)`` order, the order of
``weight.reshape(out, -1)``.

Decisions: 3-D, 1-D and transposed convolutions are not 2-D first layers
(:class:`~zooscan.errors.UnsupportedModel`); an image that reaches every
convolution only through a learned layer (an input BatchNorm, a LayerNorm before a
patch projection) has no first layer (:class:`~zooscan.errors.FirstLayerNotFound`);
the BatchNorm after a single convolution is not folded (the stored weight is what the
checkpoint holds), it is folded only where several branches are summed.

Modules, in import order: :mod:`~zooscan.layers.parts` (the records),
:mod:`~zooscan.layers.kernels` (kernel maths), :mod:`~zooscan.layers.spec`
(:class:`LayerSpec`), :mod:`~zooscan.layers.tracing` (steps 1-2),
:mod:`~zooscan.layers.pixelmap` and :mod:`~zooscan.layers.probe` (step 3),
:mod:`~zooscan.layers.branches` (branch records and their combination),
:mod:`~zooscan.layers.finder` (:func:`find_first_layer`) and
:mod:`~zooscan.layers.meta` (:func:`build_on_meta`).
"""

from zooscan.layers.finder import find_first_layer
from zooscan.layers.kernels import space_to_depth_kernel
from zooscan.layers.meta import build_on_meta
from zooscan.layers.parts import Branch, InputMap, WeightStandardization
from zooscan.layers.spec import LayerSpec

__all__ = [
    "Branch",
    "InputMap",
    "LayerSpec",
    "WeightStandardization",
    "build_on_meta",
    "find_first_layer",
    "space_to_depth_kernel",
]
