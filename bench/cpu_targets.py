"""Issue 19's CPU targets, measured in one run on this host: what a run on a new server kind (an
AVX-512 or AVX512-BF16 machine, more threads) prints to show whether each one holds there.

Rows (float32 unless said, channels-last activations, the cpu backend's own path):
- depthwise forward, and forward + backward, against oneDNN (PyTorch's conv on the same
  channels-last input): 3x3 on 8x64x56x56 and 5x5x5 on 1x64x8x56x56; targets 1.2x and 1.5x;
- pos_embed_norm (conv + residual + norm in one op) against the eager conv + add + norm: the
  CBlock's (3x3, BatchNorm in eval) on 8x64x56x56 and the SABlock's (3x3, LayerNorm) on
  8x320x14x14; target 1.3x;
- UniFormer-S batch 8 inference: ``uk.accelerate`` against ``torch.compile(reference)`` (1.1x) and
  against the host's GEMM roofline (90 %: the model's FLOPs at the measured 2048^3 float32 GEMM
  rate, bench/harness.measure_peaks);
- the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``: accelerated against the reference
  under the same autocast (1.3x) and against the accelerated float32 model (1.6x, a target only on
  a CPU with AVX512-BF16; elsewhere the row is reported and marked n/a).

Each comparison alternates the two sides round by round and keeps each side's minimum, so a busy
neighbour slows both alike; the load average before and after is printed, and on a shared machine
the ratios are indicative only. The host line names the CPU, its vector ISA, the cpu kernels' ISA
and the threads.

    python -m bench.cpu_targets [--threads N] [--rounds 7] [--md PATH] [--skip-models]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

import uniformer_kernels as uk
from uniformer_kernels import _extension
from bench import harness
from bench.bench_models import _count_flops
from bench.results import _cpu_flags, cpu_isa
from bench.shapes import build_model, model_input


def alternate_min_ms(fns: dict, rounds: int, round_s: float = 0.05) -> dict:
    """{name: minimum ms per call}: the callables' rounds interleaved, each round as many calls
    as fill ~``round_s`` (at least one), after one warm-up call each."""
    calls = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(round_s / max(time.perf_counter() - t0, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3 / calls[name])
    return best


def row(what: str, against: str, ms: dict, target: float | None, *, share: bool = False,
        note: str | None = None) -> dict:
    """A table row: the ratio is against/ours (a speed-up, or with ``share`` the fraction of the
    roofline time ``against`` that ours reaches)."""
    return dict(what=what, against=against, ours_ms=ms["ours"], against_ms=ms["theirs"],
                ratio=ms["theirs"] / ms["ours"], target=target, share=share, note=note)


def _conv_args(shape, kernel):
    channels = shape[1]
    x = torch.randn(shape).contiguous(
        memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    weight = torch.randn(channels, 1, *kernel) * 0.1
    return x, weight, torch.randn(channels) * 0.1


def _onednn_conv(x, weight, bias):
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    return conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=x.shape[1])


def _forward_and_backward(fn, x, weight, bias, grad):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
    return step


def depthwise_rows(rounds: int) -> list[dict]:
    rows = []
    for shape, kernel in (((8, 64, 56, 56), (3, 3)), ((1, 64, 8, 56, 56), (5, 5, 5))):
        x, weight, bias = _conv_args(shape, kernel)
        label = f"depthwise {'x'.join(map(str, kernel))} {'x'.join(map(str, shape))}"
        with torch.inference_mode():
            t = alternate_min_ms({"ours": lambda: uk.ops.depthwise_conv(x, weight, bias),
                                  "theirs": lambda: _onednn_conv(x, weight, bias)}, rounds)
        rows.append(row(f"{label} forward", "oneDNN channels-last", t, 1.2))
        grad = torch.randn_like(x)
        t = alternate_min_ms({
            "ours": _forward_and_backward(uk.ops.depthwise_conv, x, weight, bias, grad),
            "theirs": _forward_and_backward(_onednn_conv, x, weight, bias, grad)}, rounds)
        rows.append(row(f"{label} forward+backward", "oneDNN channels-last", t, 1.5))
    return rows


def pos_embed_norm_rows(rounds: int) -> list[dict]:
    rows = []
    for shape, norm in (((8, 64, 56, 56), "affine"), ((8, 320, 14, 14), "layernorm")):
        x, weight, bias = _conv_args(shape, (3, 3))
        channels = shape[1]
        norm_weight, norm_bias = torch.rand(channels) + 0.5, torch.randn(channels) * 0.1
        mean, var = torch.randn(channels) * 0.1, torch.rand(channels) + 0.5
        if norm == "affine":  # the CBlock's eval BatchNorm, folded as uk.nn folds it
            scale = norm_weight * torch.rsqrt(var + 1e-5)
            fused = (scale, norm_bias - mean * scale)

            def eager():
                y = x + _onednn_conv(x, weight, bias)
                return y, F.batch_norm(y, mean, var, norm_weight, norm_bias, False, 0.0, 1e-5)
        else:
            fused = (norm_weight, norm_bias)

            def eager():
                y = x + _onednn_conv(x, weight, bias)
                z = F.layer_norm(y.permute(0, 2, 3, 1), (channels,), norm_weight, norm_bias, 1e-6)
                return y, z.permute(0, 3, 1, 2)
        with torch.inference_mode():
            t = alternate_min_ms({
                "ours": lambda: uk.ops.pos_embed_norm(x, weight, bias, *fused, norm=norm),
                "theirs": eager}, rounds)
        what = (f"pos_embed_norm 3x3 + {'BatchNorm' if norm == 'affine' else 'LayerNorm'} "
                f"{'x'.join(map(str, shape))} forward")
        rows.append(row(what, "eager conv + add + norm", t, 1.3))
    return rows


def model_rows(rounds: int) -> list[dict]:
    reference = build_model("uniformer_small").eval()
    accelerated = uk.accelerate(copy.deepcopy(reference))
    compiled = torch.compile(reference)
    x = model_input(8, 224)
    peaks = harness.measure_peaks("cpu")
    flops = _count_flops(reference, x, "fwd")
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)

    def under_bf16(model):
        def run():
            with bf16:
                model(x)
        return run

    with torch.inference_mode():
        print("[cpu-targets] torch.compile warm-up (about a minute)", flush=True)
        compiled(x)
        fp32 = alternate_min_ms({"ours": lambda: accelerated(x), "theirs": lambda: compiled(x)},
                                rounds, round_s=0)
        autocast = alternate_min_ms({"ours": under_bf16(accelerated),
                                     "theirs": under_bf16(reference)}, rounds, round_s=0)
    roofline_ms = flops / (peaks["gemm_gflops"] * 1e9) * 1e3
    has_bf16 = "avx512_bf16" in _cpu_flags()
    return [
        row("UniFormer-S bs 8 forward", "torch.compile(reference)", fp32, 1.1),
        row("UniFormer-S bs 8 forward: share of the GEMM roofline",
            f"{flops / 1e9:.1f} GFLOP at {peaks['gemm_gflops']:.0f} GFLOP/s",
            {"ours": fp32["ours"], "theirs": roofline_ms}, 0.9, share=True),
        row("UniFormer-S bs 8 forward, bf16 autocast", "reference, same autocast", autocast, 1.3),
        row("UniFormer-S bs 8 forward, bf16 autocast", "accelerated float32",
            {"ours": autocast["ours"], "theirs": fp32["ours"]}, 1.6 if has_bf16 else None,
            note=None if has_bf16 else "n/a: no AVX512-BF16 on this CPU"),
    ]


def host_line() -> str:
    flags = _cpu_flags()
    extras = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    info = _extension.build_info() if _extension.loaded() else {}
    return (f"{harness._cpu_model_name()}, {cpu_isa(flags)} ({' '.join(extras) or 'no AVX-512'}), "
            f"cpu kernels {info.get('cpu_kernel_isa', 'not built')}, "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")


def render(rows: list[dict], header: str) -> str:
    lines = [header, "", "| what | against | ours ms | against ms | ratio | target | met |",
             "|---|---|--:|--:|--:|--:|---|"]
    for r in rows:
        fmt = "{:.0%}" if r["share"] else "{:.2f}x"
        target = "-" if r["target"] is None else fmt.format(r["target"])
        met = r["note"] or ("yes" if r["ratio"] >= r["target"] else "no")
        lines.append(f"| {r['what']} | {r['against']} | {r['ours_ms']:.2f} | {r['against_ms']:.2f} "
                     f"| {fmt.format(r['ratio'])} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds per comparison")
    ap.add_argument("--md", help="also write the table here")
    ap.add_argument("--skip-models", action="store_true", help="the op rows only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    rows = depthwise_rows(args.rounds) + pos_embed_norm_rows(args.rounds)
    if not args.skip_models:
        rows += model_rows(max(3, args.rounds // 2))
    header = (f"# Issue 19 CPU targets\n\n`python -m bench.cpu_targets "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
              f"{host_line()}; min of {args.rounds} alternating rounds; load average "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (indicative above ~1)")
    table = render(rows, header)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
