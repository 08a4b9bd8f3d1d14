"""The distinct Conv layer shapes of the real-model corpus, as a small JSON file the GPU check times.

    python benchmarks/corpus_conv_shapes.py [--cache-dir DIR] [--out benchmarks/corpus_conv_shapes.json]

The corpus is `real_models.MODELS`: ONNX files shipped inside registry packages. Each model's
inputs are bound to the shapes its package feeds it (the entry's `--input-shape` options; static
models as they are), shapes are inferred, and every main-graph Conv with a constant weight is read
into convlower's own `ConvSpec`, so pads are resolved exactly as the tuner resolves them. Convs
inside If branches (silero-vad) are out of reach of shape inference and are left out, as the
optimizer leaves them. Layers alike are listed once, with the models they occur in and how often.

The output is committed (a few kilobytes) because the GPU machines reach no package index: this
script regenerates it wherever the registry is reachable, and `benchmarks/gpu_check.py` reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx_graphsurgeon as gs

from convlower.modelio import default_opset, load_model
from convlower.passes import NotLowerable
from convlower.passes.base import constant_value
from convlower.passes.conv import make_spec
from convlower.shapes import with_static_inputs

sys.path.insert(0, str(Path(__file__).parent))
from real_models import DEFAULT_CACHE, MODELS, Model, ensure_model  # noqa: E402

OUT = Path(__file__).with_name("corpus_conv_shapes.json")


def bound_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """The input shapes the entry's `--input-shape` options give (none for a static model)."""
    shapes = {}
    for flag, value in zip(model.options, model.options[1:]):
        if flag == "--input-shape":
            name, _, dims = value.rpartition(":")
            shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def conv_layers(model: Model, cache_dir: Path) -> list[dict]:
    """Every main-graph Conv of the model at its bound shapes, as bench_conv's `ConvShape` fields."""
    proto = load_model(ensure_model(model, cache_dir))
    graph = gs.import_onnx(with_static_inputs(proto, bound_shapes(model)))
    layers = []
    for node in graph.nodes:
        if node.op != "Conv" or constant_value(node.inputs[1]) is None:
            continue
        try:
            spec = make_spec(node, default_opset(proto))
        except NotLowerable:
            continue
        if None in spec.in_spatial or spec.batch is None or spec.pads is None:
            continue
        layers.append({
            "in_channels": spec.in_channels, "out_channels": spec.out_channels, "spatial": list(spec.in_spatial),
            "kernel": list(spec.kernel_shape), "strides": list(spec.strides), "pads": list(spec.pads),
            "dilations": list(spec.dilations), "group": spec.group, "batch": spec.batch,
        })
    return layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    distinct: dict[str, dict] = {}
    for model in MODELS:
        for layer in conv_layers(model, args.cache_dir):
            key = json.dumps(layer, sort_keys=True)
            entry = distinct.setdefault(key, {**layer, "models": {}})
            entry["models"][model.name] = entry["models"].get(model.name, 0) + 1
    layers = sorted(distinct.values(), key=lambda e: (-sum(e["models"].values()), e["in_channels"], e["spatial"]))
    for index, layer in enumerate(layers):
        layer["name"] = f"corpus_{index:03d}_{'x'.join(map(str, layer['kernel']))}_g{layer['group']}"
    lines = ",\n".join(f"  {json.dumps(layer)}" for layer in layers)
    args.out.write_text(f'{{"source": "benchmarks/corpus_conv_shapes.py", "layers": [\n{lines}\n]}}\n')
    print(f"{len(layers)} distinct Conv layers from {len(MODELS)} models -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
