"""Pieces the zoo's families share: the size switch, seeded construction, and Conv + BatchNorm + act."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

SIZES = ("small", "realistic")
T = TypeVar("T")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def pick(size: str, small: T, realistic: T) -> T:
    """The configuration for `size`: "small" (tiny shapes for tests) or "realistic" (benchmarks)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return small if size == "small" else realistic


def instantiate(
    make: Callable[[], nn.Module], *input_shapes: tuple[int, ...], seed: int = 0
) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """`make()` in eval mode and random example inputs of `input_shapes`, the same on every call.

    The seed is set inside a forked RNG, so the caller's global torch RNG is left as it was.
    BatchNorm layers get random affine parameters and the statistics of one pass over the example
    inputs, as after training: then they are not the identity (an exporter's Conv + BatchNorm
    folding has something to fold) and activations keep their scale through deep stacks.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
        inputs = tuple(torch.randn(shape) for shape in input_shapes)
        norms = [m for m in module.modules() if isinstance(m, tuple(_NORM.values()))]
        for norm in norms:
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.normal_(norm.bias, std=0.1)
            norm.momentum = None  # a cumulative average: one pass sets the statistics of that pass
        if norms:
            with torch.no_grad():
                module.train()(*inputs)
    return module.eval(), inputs


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int | tuple[int, ...] = 1,
    *,
    groups: int = 1,
    dims: int = 2,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias, "same" padding for odd kernels) + BatchNorm + `act` (None: no activation)."""
    layers: list[nn.Module] = [
        _CONV[dims](in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        _NORM[dims](out_channels),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """`features`, a global average pool over every spatial axis, and a linear head."""

    def __init__(self, features: nn.Module, channels: int, classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.features(x)
        return self.head(y.mean(tuple(range(2, y.dim()))))


class Residual(nn.Module):
    """relu(body(x) + shortcut(x)): the residual block of ResNet and its relatives."""

    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))
