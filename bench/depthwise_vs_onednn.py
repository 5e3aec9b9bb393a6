"""Our CPU depthwise forward against oneDNN's (torch's channels-last conv) on the models' unfused
shapes: the CBlock's local 5x5 / 5x5x5 conv, no residual (bench/shapes.py), fp32, 1 thread.

The kernels are called directly (torch.ops.uniformer_kernels_C.depthwise_conv_cpu and F.conv2d /
F.conv3d on channels-last tensors) so that the op's dispatch does not enter the comparison. Times
are the minimum over ``--repeats`` rounds of ``--calls`` calls each, the two implementations
alternating round by round, so that a busy neighbour slows both alike; on a shared machine they
are indicative only.

    python -m bench.depthwise_vs_onednn [--batch 1] [--repeats 15] [--calls 20] [--configs ...]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import uniformer_kernels  # noqa: F401  (registers torch.ops.uniformer_kernels_C)
from uniformer_kernels import _extension
from bench.shapes import collect_shapes

CONFIGS = ("S-224", "B-224", "XXS-224", "video-S-8x224", "dense-XXS-512")


def unfused_shapes(configs, batch):
    seen = {}
    for config in configs:
        for row in collect_shapes(config, batch=batch, op="dwconv"):
            if row["kind"] == "local":
                key = (tuple(row["shape"]), tuple(row["kernel"]))
                seen.setdefault(key, f"{config}:{row['block']}")
    return seen


def min_time(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(shape, kernel, repeats, calls, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(*shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    weight = torch.randn(shape[1], 1, *kernel, generator=gen).to(dtype)
    bias = torch.randn(shape[1], generator=gen).to(dtype)
    conv = F.conv2d if len(shape) == 4 else F.conv3d
    padding = [k // 2 for k in kernel]
    ours = lambda: torch.ops.uniformer_kernels_C.depthwise_conv_cpu(x, weight, bias, False)  # noqa: E731
    onednn = lambda: conv(x, weight, bias, padding=padding, groups=shape[1])  # noqa: E731
    torch.testing.assert_close(ours(), onednn(), rtol=1e-4, atol=1e-4)
    best = {"ours": float("inf"), "onednn": float("inf")}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("onednn", onednn)):
            best[name] = min(best[name], min_time(fn, calls))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = _extension.build_info()
    print(f"torch {torch.__version__}, 1 thread, cpu kernels {info['cpu_kernel_isa']}, "
          f"min of {args.repeats} x {args.calls} calls (indicative)\n")
    print("| shape | kernel | first seen | ours us | oneDNN us | oneDNN / ours |")
    print("|---|---|---|--:|--:|--:|")
    for (shape, kernel), where in unfused_shapes(args.configs, args.batch).items():
        best = compare(shape, kernel, args.repeats, args.calls)
        print(f"| {'x'.join(map(str, shape))} | {'x'.join(map(str, kernel))} | {where} | "
              f"{best['ours'] * 1e6:.0f} | {best['onednn'] * 1e6:.0f} | {best['onednn'] / best['ours']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
