"""Input data for verification and timing: seeded random arrays by dtype, or real arrays from .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UsageError
from .shapes import InputInfo

Feeds = dict[str, np.ndarray]


def random_inputs(inputs: list[InputInfo], shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Feeds:
    """Random arrays for every input: floats ~ N(0, 1), ints in [0, 4), bools fair coin flips.

    Small non-negative ints keep index-like inputs (Gather indices, sizes) in range.
    """
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for info in inputs:
        shape = shapes[info.name]
        dtype = info.dtype
        if dtype == np.bool_:
            feeds[info.name] = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            feeds[info.name] = np.asarray(rng.integers(0, 4, size=shape), dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[info.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        else:
            raise UsageError(
                f"input {info.name!r} has element type {dtype}, which convlower cannot generate",
                "pass real data with --inputs DATA.npz",
            )
    return feeds


def load_npz(path: str | Path, inputs: list[InputInfo]) -> Feeds:
    """Arrays by input name from an .npz file, checked against the model's inputs.

    The file may hold only some inputs (a sample rate, a vocabulary index): the others are then
    made at random (`complete_feeds`). A name that is not an input is refused, as a typo would be.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file", "check the --inputs path")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable .npz file ({exc})", "write it with numpy.savez") from exc
    by_name = {info.name: info for info in inputs}
    unknown = sorted(set(arrays) - set(by_name))
    if unknown:
        raise UsageError(
            f"{path}: holds {unknown[0]!r}, which is not a model input",
            f"the model's inputs are: {', '.join(by_name)}",
        )
    for name, array in arrays.items():
        info = by_name[name]
        if array.dtype != info.dtype:
            raise UsageError(
                f"{path}: array {name!r} is {array.dtype}, the model wants {info.dtype}",
                "save it with the model's dtype",
            )
        if info.dims is not None and (
            len(info.dims) != array.ndim or any(isinstance(d, int) and d != s for d, s in zip(info.dims, array.shape))
        ):
            raise UsageError(
                f"{path}: array {name!r} has shape {array.shape}, the model wants {info.dims}",
                "save arrays of the model's shape",
            )
    return arrays


def complete_feeds(inputs: list[InputInfo], given: Feeds, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Feeds:
    """The given arrays, and seeded random ones at `shapes` for every input they leave out."""
    missing = [info for info in inputs if info.name not in given]
    return {**random_inputs(missing, shapes, seed=seed), **given}


def feeds_shapes(feeds: Feeds) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in feeds.items()}
