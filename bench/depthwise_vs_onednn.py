"""The cpu backend's depthwise forward against oneDNN (PyTorch's conv) on every depthwise shape of
the models (bench/shapes.py): the pos_embed 3x3 / 3x3x3 and the CBlock's local 5x5 / 5x5x5 convs,
with and without the fused residual, in each layout the op may receive (channels-last, NCHW) and
each dtype asked for. This is the measurement the cpu backend's oneDNN rule rests on
(ops/_depthwise_common.py: forward_on_onednn; docs/DESIGN.md has the summary), and the last
column says what that rule picks, so a run on another host (AVX-512, more threads) shows at once
whether the rule still holds there.

Both sides run the op's own implementation function with the backend forced, so they pay the same
Python: ``cpu`` with the oneDNN rule off (our C++ kernel, 16-bit widened as the op does) and
``eager`` (``F.conv2d/3d`` with padding k//2, ``+ x`` for the residual, the result in x's memory
format). Times are the minimum over ``--repeats`` rounds, the two alternating round by round so
that a busy neighbour slows both alike; a round is as many calls as fill ~``--round-ms``. On a
shared machine they are indicative only; the load average is printed.

    python -m bench.depthwise_vs_onednn [--batch 1] [--threads 1] [--dtypes float32 float64]
        [--layouts channels_last nchw] [--residual both] [--kinds pos_embed local] [--configs ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import uniformer_kernels as uk
from uniformer_kernels import _extension
from uniformer_kernels.ops import _depthwise_common as common
from uniformer_kernels.ops.depthwise import _depthwise_conv_impl
from bench.shapes import collect_shapes

CONFIGS = ("S-224", "XXS-224", "video-S-8x224", "dense-XXS-512")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}


def model_shapes(configs, batch, kinds):
    """{(shape, kernel, kind): first config:block seen} over the configs' depthwise convs."""
    seen = {}
    for config in configs:
        for row in collect_shapes(config, batch=batch, op="dwconv"):
            if row["kind"] in kinds:
                key = (tuple(row["shape"]), tuple(row["kernel"]), row["kind"])
                seen.setdefault(key, f"{config}:{row['block']}")
    return seen


def round_time(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(shape, kernel, dtype, layout, residual, repeats, round_s):
    """(ours s, oneDNN s, whether the cpu backend's rule picks oneDNN): minima over alternating
    rounds."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    weight = torch.randn(shape[1], 1, *kernel, generator=gen).to(dtype)
    bias = torch.randn(shape[1], generator=gen).to(dtype)
    run = lambda: _depthwise_conv_impl(x, weight, bias, residual)  # noqa: E731
    sides = {}
    for name, backend in (("ours", "cpu"), ("onednn", "eager")):
        with uk.backend(backend), common.cpu_onednn(False):
            out = run()
            start = time.perf_counter()
            run()
            calls = max(1, int(round_s / max(time.perf_counter() - start, 1e-7)))
        sides[name] = (backend, out, calls)
    torch.testing.assert_close(sides["ours"][1].double(), sides["onednn"][1].double(),
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    best = {"ours": float("inf"), "onednn": float("inf")}
    with common.cpu_onednn(False):
        for _ in range(repeats):
            for name, (backend, _, calls) in sides.items():
                with uk.backend(backend):
                    best[name] = min(best[name], round_time(run, calls))
    return best["ours"], best["onednn"], common.forward_on_onednn(x, kernel, residual)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--round-ms", type=float, default=4.0)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--kinds", nargs="*", default=["pos_embed", "local"])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "float64"], choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="*", default=["channels_last", "nchw"],
                        choices=["channels_last", "nchw"])
    parser.add_argument("--residual", choices=["both", "yes", "no"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    residuals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.residual]
    info = _extension.build_info()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}, cpu kernels {info['cpu_kernel_isa']}, {args.threads} thread(s), torch "
          f"{torch.__version__}, batch {args.batch}, min of {args.repeats} rounds of "
          f"~{args.round_ms:g} ms, load average {os.getloadavg()[0]:.2f} at start (indicative)\n")
    print("| shape | kernel | first seen | dtype | layout | residual | ours us | oneDNN us | "
          "oneDNN / ours | the cpu backend runs |")
    print("|---|---|---|---|---|---|--:|--:|--:|---|")
    for (shape, kernel, kind), where in model_shapes(args.configs, args.batch, args.kinds).items():
        for dtype_name in args.dtypes:
            for layout in args.layouts:
                for residual in residuals:
                    ours, onednn, rule = compare(shape, kernel, DTYPES[dtype_name], layout,
                                                 residual, args.repeats, args.round_ms / 1e3)
                    print(f"| {'x'.join(map(str, shape))} | {'x'.join(map(str, kernel))} | "
                          f"{where}:{kind} | {dtype_name} | {layout} | "
                          f"{'yes' if residual else 'no'} | "
                          f"{ours * 1e6:.0f} | {onednn * 1e6:.0f} | {onednn / ours:.2f} | "
                          f"{'oneDNN' if rule else 'ours'} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
