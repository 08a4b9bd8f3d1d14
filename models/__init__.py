"""The model zoo: torch modules with factories returning (module, example_inputs).

Each family lives in its own module with `build(size="realistic") -> (module, inputs)`: the module
in eval mode, deterministically initialised, and example inputs; size "small" gives tiny shapes
for tests, "realistic" the shapes benchmarks use. Families with dynamic filters (spatially variant
filters predicted from the input, applied through `F.unfold`, what convlower's `DynamicFilter`
recognizer and lowerings are for): `kpn_denoiser`, `involution`, `carafe`, `seed_filter`
(`DYNAMIC_FILTER`). Families with cost volumes (a `LocalCorrelation` written the stereo and flow
repositories' way): `stereo`, `flow` (`CORRELATION`). `dcn_head` holds deformable convolutions
(ONNX DeformConv, so it exports at opset 19: `MIN_OPSET`).
The others hold static Conv / ConvTranspose of varied kinds. `builders` holds ONNX models built
without torch; `idioms` and `correlation_idioms` hold single dynamic-filter and correlation layers written the
ways papers' code writes them (recognition tests and benchmarks use them).

torch is an optional extra of convlower, so importing this package does not import it: `ZOO`'s
factories and `load(name)` import a family's module (and torch) only when called.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor, nn

Factory = Callable[..., "tuple[nn.Module, tuple[Tensor, ...]]"]

FAMILIES: dict[str, str] = {
    "kpn_denoiser": "kernel-prediction denoiser: per-pixel softmax K x K filters, unfold * filters .sum",
    "involution": "RedNet-style involution network: per-pixel kernels shared within channel groups, one strided",
    "resnet": "ResNet classifier: basic blocks, BatchNorm, stride-2 stages with 1x1 projection shortcuts",
    "mobilenet": "MobileNetV2: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 project)",
    "tcn": "temporal convolutional network: causal dilated Conv1d (dilations 1, 2, 4, 8) with residuals",
    "conv3d": "C3D-style video classifier: 3x3x3 Conv3d over [N, C, T, H, W] clips",
    "unet": "UNet with ConvTranspose2d (k2, s2) upsampling and skip concatenation",
    "carafe": "CARAFE 2x upsampler: per-position softmax reassembly kernels, unfold + einsum + pixel shuffle",
    "seed_filter": "seed 000's method_1 as written: unfold + einsum with given per-pixel filters (N=2048, 32x32, K=3)",
    "stereo": "stereo matching net: shared encoder, GwcNet's group-wise cost volume filled by slice assignment, soft-argmin",
    "flow": "optical-flow net: shared encoder, a 9x9 local correlation written with F.unfold, a conv head",
    "dcn_head": "DCNv2 detector head: two modulated deformable 3x3 convolutions (ONNX DeformConv, opset 19)",
}
DYNAMIC_FILTER: tuple[str, ...] = ("kpn_denoiser", "involution", "carafe", "seed_filter")
CORRELATION: tuple[str, ...] = ("stereo", "flow")
"""Families whose cost volume or correlation is a `convlower.LocalCorrelation` written as papers' code writes it."""
MIN_OPSET: dict[str, int] = {"dcn_head": 19}
"""Families that need an export opset above convlower.export's default 18 (DeformConv is opset 19)."""


def load(name: str) -> Factory:
    """The `build` factory of family `name`, importing its module (and torch) now."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; the zoo has {', '.join(FAMILIES)}")
    return import_module(f"{__name__}.{name}").build


def _deferred(name: str) -> Factory:
    def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
        return load(name)(size)

    build.__qualname__ = build.__name__ = f"build_{name}"
    build.__doc__ = f"{FAMILIES[name]}. Returns (module in eval mode, example inputs) for `size`."
    return build


ZOO: dict[str, Factory] = {name: _deferred(name) for name in FAMILIES}
