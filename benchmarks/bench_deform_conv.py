"""DeformConv on onnxruntime: the native kernel, convlower's two lowerings, and the per-tap
`grid_sample` decomposition that ports without torchvision export.

    python benchmarks/bench_deform_conv.py [--threads 2] [--quick]

Each case is one deformable 3x3 layer (offsets up to a few pixels, so taps fall between pixels and
off the image) at a detector head's shape. Candidates, every one checked against the native node's
output before anything is timed, then timed interleaved (`time_calls`, rotating order):

- `native`: one ONNX DeformConv (opset 19), onnxruntime's own kernel;
- `gather_im2col`, `grid_sample`: that node lowered by `convlower.lower`;
- `per-tap grid_sample (export)`: the same layer written in plain torch as ports without
  torchvision write it (one `F.grid_sample` per tap, stacked, then an einsum with the weight),
  exported by torch's TorchScript exporter at opset 19 — what a user who cannot export
  `deform_conv2d` ships today.

Ratios are native's median over each candidate's: above 1 is faster than the native kernel. The
native model in a second session ("self-check") must read 1.00x: its distance from 1 is the noise.
The provider is printed; the machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F

import convlower
from convlower.runner import Runner, TimingPolicy, time_calls
from convlower.verify import compare

CASES = {
    "dcnv1_32x64x64": dict(channels=32, side=64, modulated=False),
    "dcnv2_32x64x64": dict(channels=32, side=64, modulated=True),
    "dcnv2_64x32x32": dict(channels=64, side=32, modulated=True),
}


class PerTapGridSample(torch.nn.Module):
    """DCN as ports without torchvision write it: per tap, the sampling grid (base + offset,
    normalized), one `F.grid_sample`, stacked; then the weights by einsum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ys = torch.arange(h, dtype=x.dtype).view(1, h, 1)
        xs = torch.arange(w, dtype=x.dtype).view(1, 1, w)
        samples = []
        for k in range(9):
            ky, kx = k // 3 - 1, k % 3 - 1
            py = ys + ky + offset[:, 2 * k]
            px = xs + kx + offset[:, 2 * k + 1]
            grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
            sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            samples.append(sampled * mask[:, k:k + 1])
        stacked = torch.stack(samples, 2)  # [N, C, 9, H, W]
        out = torch.einsum("nckhw,ock->nohw", stacked, self.weight.flatten(2))
        return out + self.bias.view(1, -1, 1, 1)


def native_model(channels: int, side: int, modulated: bool, weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    inputs = ["x", "w", "offset", "b"] + (["mask"] if modulated else [])
    node = helper.make_node("DeformConv", inputs, ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="dcn")
    values = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, side, side]),
              helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1, 18, side, side])]
    if modulated:
        values.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 9, side, side]))
    graph = helper.make_graph([node], "dcn", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, side, side])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def decomposed_model(weight: np.ndarray, bias: np.ndarray, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    module = PerTapGridSample(torch.from_numpy(weight), torch.from_numpy(bias)).eval()
    args = tuple(torch.from_numpy(feeds[name]) for name in ("x", "offset", "mask"))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=19, input_names=["x", "offset", "mask"])
    return onnx.load_from_string(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a short timing budget (a smoke run)")
    args = parser.parse_args(argv)
    runner = Runner("cpu", args.threads)
    policy = TimingPolicy(warmup=3, min_runs=20, max_runs=300, budget_s=1.0 if args.quick else 6.0)
    print(f"onnxruntime on {runner.provider} ({runner.device}), {args.threads} threads")
    print("| case | candidate | ms | native / candidate | max abs err |\n|---|---|---:|---:|---:|")
    for name, case in CASES.items():
        rng = np.random.default_rng(0)
        channels, side = case["channels"], case["side"]
        weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32)
        bias = rng.standard_normal(channels).astype(np.float32)
        feeds = {"x": rng.standard_normal((1, channels, side, side)).astype(np.float32),
                 "offset": (rng.standard_normal((1, 18, side, side)) * 2).astype(np.float32),
                 "mask": rng.random((1, 9, side, side)).astype(np.float32) if case["modulated"] else np.ones((1, 9, side, side), np.float32)}
        native = native_model(channels, side, case["modulated"], weight, bias)
        models = {"native": native, "native again (self-check)": native}
        for variant in ("gather_im2col", "grid_sample"):
            models[variant] = convlower.lower(native, {"DeformConv": variant}).model
        models["per-tap grid_sample (export)"] = decomposed_model(weight, bias, feeds)
        sessions, errors = [], {}
        expected = None
        for label, model in models.items():
            session = runner.session(model)
            needed = {i.name for i in model.graph.input}
            got = session.run({k: v for k, v in feeds.items() if k in needed})[0]
            expected = got if expected is None else expected
            errors[label] = compare("y", expected, got, None, None).max_abs_err
            sessions.append((label, session, {k: v for k, v in feeds.items() if k in needed}))
        timings = [t.median_ms for t in time_calls([session.runner_for(f) for _, session, f in sessions], policy)]
        base = timings[0]
        for (label, _, _), timing in zip(sessions, timings):
            print(f"| {name} | {label} | {timing:.3f} | {base / timing:.2f}x | {errors[label]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
