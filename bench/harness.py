"""The one timing helper every benchmark uses, plus the device's measured peaks and FLOP counting.

CPU: rounds go through pytest-benchmark's ``benchmark.pedantic`` when a bench test hands its
``benchmark`` fixture in (so pytest-benchmark's own table and ``--benchmark-json`` see them), else
through a plain ``perf_counter`` loop. CUDA: ``triton.testing.do_bench`` (or
``do_bench_cudagraph`` when asked and capturable). Either way the result is a :class:`Timing`, and
the number of rounds comes from a time budget per case, not a fixed count.

Rooflines: ``flops / measured GEMM peak`` and ``bytes / measured copy bandwidth``, where the peaks
are measured once per process on the device in hand (:func:`measure_peaks`), not datasheet values.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "Timing",
    "time_callable",
    "measure_peaks",
    "count_flops",
    "roofline_ms",
    "synchronize",
    "free_memory",
    "timed_call",
    "device_name",
    "LoadProbe",
    "noise_reasons",
    "MAX_CONTENTION",
    "MAX_SPREAD",
]

# A case is noisy when other processes took more than this share of the CPUs its threads need
# (or the hypervisor stole it), or when its p20-p80 spread exceeds this share of the median.
MAX_CONTENTION = 0.10
MAX_SPREAD = 0.10


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    rounds: int
    timer: str = "perf_counter"  # pytest-benchmark | perf_counter | do_bench | do_bench_cudagraph

    def as_dict(self) -> dict:
        return asdict(self)


def _device_type(device) -> str:
    return torch.device(device).type


def synchronize(device) -> None:
    if _device_type(device) == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    gc.collect()
    if _device_type(device) == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def timed_call(fn: Callable[[], Any], device) -> float:
    """Run ``fn()`` once, synchronised; wall time in s (e.g. torch.compile's first call)."""
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def device_name(device) -> str:
    """Human-readable name of the device: GPU model, or the CPU's model name."""
    if _device_type(device) == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model_name()


@functools.lru_cache(maxsize=None)
def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _quantile(sorted_ms: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted data (numpy's default method)."""
    if not sorted_ms:
        return math.nan
    pos = (len(sorted_ms) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def _timing_from_samples(samples_ms: Sequence[float], timer: str) -> Timing:
    s = sorted(samples_ms)
    return Timing(
        median_ms=statistics.median(s),
        p20_ms=_quantile(s, 0.2),
        p80_ms=_quantile(s, 0.8),
        rounds=len(s),
        timer=timer,
    )


def _rounds_for_budget(estimate_s: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    if estimate_s <= 0:
        return max_rounds
    return int(max(min_rounds, min(max_rounds, budget_s // estimate_s)))


def time_callable(
    fn: Callable[[], Any],
    *,
    device,
    warmup: int = 2,
    budget_s: float = 3.0,
    min_rounds: int = 3,
    max_rounds: int = 1000,
    benchmark=None,
    cuda_graph: bool = False,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> Timing:
    """Time ``fn()`` (no arguments) on ``device``; returns median and 20th/80th percentiles in ms.

    ``warmup`` untimed calls run first (at least one: on CPU it also estimates the time per
    call). Compile warm-up must already be done by the caller: the first call of a
    ``torch.compile``d function would otherwise dominate. On CPU the rounds are chosen so the
    timed part takes about ``budget_s`` seconds, clamped to ``[min_rounds, max_rounds]``; on CUDA
    ``do_bench`` picks them for ``rep = budget_s``.

    ``benchmark``: the pytest-benchmark fixture of the calling test, used on CPU (pedantic mode);
    ignored on CUDA, where Triton's ``do_bench`` times with CUDA events and flushes L2 between
    rounds. ``cuda_graph=True`` tries ``do_bench_cudagraph`` (launch overhead removed) and falls
    back to ``do_bench`` if capture fails. ``grad_to_none``: tensors whose ``.grad`` is reset
    between rounds (CUDA timers only; on CPU let ``fn`` do it).
    """
    if _device_type(device) == "cuda":
        return _time_cuda(fn, device=device, warmup=warmup, budget_s=budget_s,
                          cuda_graph=cuda_graph, grad_to_none=grad_to_none)

    # Calibration call (also the first warm-up), then the remaining warm-up calls.
    t0 = time.perf_counter()
    fn()
    estimate = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        t0 = time.perf_counter()
        fn()
        estimate = min(estimate, time.perf_counter() - t0)
    rounds = _rounds_for_budget(estimate, budget_s, min_rounds, max_rounds)

    if benchmark is not None and not getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        data = list(benchmark.stats.stats.data)  # seconds per round
        return _timing_from_samples([d * 1e3 for d in data], "pytest-benchmark")

    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _timing_from_samples(samples, "perf_counter")


def _time_cuda(fn, *, device, warmup, budget_s, cuda_graph, grad_to_none) -> Timing:
    from triton.testing import do_bench, do_bench_cudagraph

    with torch.cuda.device(torch.device(device)):
        for _ in range(max(0, warmup)):
            fn()
        torch.cuda.synchronize()
        rep_ms = max(20.0, budget_s * 1e3)
        grads = list(grad_to_none) if grad_to_none is not None else None
        if cuda_graph:
            try:
                return _do_bench_timing(do_bench_cudagraph, fn, "do_bench_cudagraph", rep=rep_ms,
                                        grad_to_none=grads)
            except Exception:  # not capturable (host sync, allocator, CPU op...): time it plainly
                torch.cuda.synchronize()
        return _do_bench_timing(do_bench, fn, "do_bench", warmup=25, rep=rep_ms, grad_to_none=grads)


def _do_bench_timing(bench_fn, fn, timer: str, **kw) -> Timing:
    """Run a Triton bencher; raw per-round times where it offers them (return_mode='all')."""
    try:
        out = bench_fn(fn, return_mode="all", **kw)
        if isinstance(out, (list, tuple)) and len(out) > 0:
            return _timing_from_samples([float(v) for v in out], timer)
    except (AssertionError, TypeError, ValueError):  # older Triton: no 'all'
        pass
    med, p20, p80 = bench_fn(fn, quantiles=[0.5, 0.2, 0.8], **kw)
    rounds = max(1, int(kw.get("rep", 100) / med)) if med > 0 else 1
    return Timing(median_ms=med, p20_ms=p20, p80_ms=p80, rounds=rounds, timer=timer)


# --------------------------------------------------------------------------------------------
# Peaks


@functools.lru_cache(maxsize=None)
def _measure_peaks_cached(device_str: str, dtype_str: str, budget_s: float) -> tuple:
    device = torch.device(device_str)
    dtype = getattr(torch, dtype_str)
    on_cuda = device.type == "cuda"

    # GEMM: fp32 2048^3 on CPU (the CPU's practical fp32 peak), 8192^3 in the bench dtype on GPU.
    n = 8192 if on_cuda else 2048
    gemm_dtype = dtype if on_cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=gemm_dtype)
    b = torch.randn(n, n, device=device, dtype=gemm_dtype)
    out = torch.empty(n, n, device=device, dtype=gemm_dtype)
    t_gemm = time_callable(lambda: torch.mm(a, b, out=out), device=device, warmup=2,
                           budget_s=budget_s, min_rounds=5)
    gemm_flops = 2.0 * n**3
    del a, b, out

    # Bandwidth: a large device-to-device copy, counting bytes read plus bytes written.
    nbytes = (1 << 30) if on_cuda else (256 << 20)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_copy = time_callable(lambda: dst.copy_(src), device=device, warmup=2, budget_s=budget_s,
                           min_rounds=5)
    del src, dst
    if on_cuda:
        torch.cuda.empty_cache()

    info = {
        "gemm_gflops": gemm_flops / (t_gemm.median_ms * 1e-3) / 1e9,
        "gemm_shape": [n, n, n],
        "gemm_dtype": str(gemm_dtype).replace("torch.", ""),
        "gemm_ms": t_gemm.median_ms,
        "copy_gbs": 2.0 * nbytes / (t_copy.median_ms * 1e-3) / 1e9,
        "copy_bytes": nbytes,
        "copy_ms": t_copy.median_ms,
        "threads": torch.get_num_threads(),
    }
    if on_cuda:
        info["allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        info["allow_tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    return tuple(sorted(info.items()))


def measure_peaks(device="cpu", dtype=torch.float32, budget_s: float = 2.0) -> dict:
    """Practical peaks of ``device``, measured once per process (cached per device and dtype).

    Returns ``gemm_gflops`` (2048^3 fp32 matmul on CPU; 8192^3 matmul in ``dtype`` on GPU, with
    the process's TF32 settings) and ``copy_gbs`` (large tensor copy, read + write bytes).
    Medians, like the benchmarks, so "% of roofline" compares like with like.
    """
    dtype_str = str(dtype).replace("torch.", "")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cpu":
        dtype_str = "float32"  # the CPU peak is the fp32 GEMM peak whatever the bench dtype
    return dict(_measure_peaks_cached(str(dev), dtype_str, float(budget_s)))


# --------------------------------------------------------------------------------------------
# FLOPs and rooflines


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None,
                        **kwargs) -> int:
    """convolution_backward FLOPs: grad_input and grad_weight each cost what the forward costs.

    torch's own formula (flop_counter.conv_backward_flop, still in torch 2.13) ignores ``groups``
    for grad_weight and counts a depthwise conv's weight gradient C times too high (a 64-channel
    5x5 depthwise conv: 652 MFLOP instead of 20), which would make fwd+bwd rooflines meaningless.
    """
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch.utils.flop_counter counts them (matmuls, convs, SDPA;
    elementwise ops and norms are not counted), with grouped-conv backward corrected.
    ``fn`` may run on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def roofline_ms(peaks: dict, *, flops: float | None = None, nbytes: float | None = None) -> float | None:
    """Lower bound on the time: ``max(flops / GEMM peak, bytes / copy bandwidth)`` in ms."""
    bounds = []
    if flops:
        bounds.append(flops / (peaks["gemm_gflops"] * 1e9) * 1e3)
    if nbytes:
        bounds.append(nbytes / (peaks["copy_gbs"] * 1e9) * 1e3)
    return max(bounds) if bounds else None


# --------------------------------------------------------------------------------------------
# Machine load during a case


def _proc_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) jiffies summed over all CPUs, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [float(x) for x in fields[1:9]] + [0.0] * max(0, 8 - len(fields[1:9]))
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return user + nice + system + irq + softirq, steal, sum(v[:8])


def contention(*, wall_s: float, self_cpu_s: float, busy_s: float, steal_s: float,
               cpus: int, threads: int) -> float:
    """Share of the CPU time this process's ``threads`` needed that others had: other processes'
    CPU use beyond the CPUs this process leaves idle, plus time stolen by the hypervisor, over
    ``threads x wall``. 0 on a quiet machine; 0.5: half of it went elsewhere."""
    if wall_s <= 0 or threads <= 0:
        return 0.0
    other_cpus = max(0.0, busy_s - self_cpu_s) / wall_s
    spare = max(0, cpus - threads)
    return max(0.0, other_cpus - spare) / threads + steal_s / wall_s / threads


class LoadProbe:
    """Measures what else ran on the machine while a case was timed::

        probe = LoadProbe(threads=torch.get_num_threads())
        ... time the case ...
        load = probe.stop()   # {"contention": 0.02, "other_cpus": 0.04, "steal_cpus": 0.0,
                              #  "loadavg_1min": 2.1} or {} where /proc/stat is missing

    Other processes' CPU time is the machine's busy time (/proc/stat) minus this process's own
    (all its threads, OpenMP spin-waits included); see :func:`contention`.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self.cpus = os.cpu_count() or 1
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self._stat0 = _proc_stat()

    def stop(self) -> dict:
        wall = time.perf_counter() - self._t0
        self_cpu = time.process_time() - self._cpu0
        stat1 = _proc_stat()
        if self._stat0 is None or stat1 is None or wall <= 0:
            return {}
        busy = (stat1[0] - self._stat0[0]) / self._tick
        steal = (stat1[1] - self._stat0[1]) / self._tick
        return {
            "contention": round(contention(wall_s=wall, self_cpu_s=self_cpu, busy_s=busy,
                                           steal_s=steal, cpus=self.cpus,
                                           threads=self.threads), 3),
            "other_cpus": round(max(0.0, busy - self_cpu) / wall, 2),
            "steal_cpus": round(steal / wall, 2),
            "loadavg_1min": round(os.getloadavg()[0], 2),
        }


def noise_reasons(timing: Timing, load: dict, *, max_contention: float = MAX_CONTENTION,
                  max_spread: float = MAX_SPREAD) -> list[str]:
    """Why a timing is not clean: ``["load 35 %", "spread 22 %"]``, or ``[]``."""
    reasons = []
    c = load.get("contention")
    if c is not None and c > max_contention:
        reasons.append(f"load {100 * c:.0f} %")
    if timing.median_ms and math.isfinite(timing.median_ms) and timing.median_ms > 0:
        spread = (timing.p80_ms - timing.p20_ms) / timing.median_ms
        if spread > max_spread:
            reasons.append(f"spread {100 * spread:.0f} %")
    return reasons
