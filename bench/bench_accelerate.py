"""Whole models through ``uk.accelerate``: forward and forward+backward of the reference eager,
``torch.compile(reference)``, the accelerated model (``ours``) and ``torch.compile(accelerated)``
(``ours+compile``), with the FLOP roofline and the peak memory of one step.

Cases (each with its own batch; ``--batch`` does not apply): UniFormer-S at batch 1 and 8, XXS at
batch 8 (image side --img-size, default 224), video S at batch 1 (--frames x --img-size, default
8x224), the dense S hybrid backbone (windows of 14) at batch 1 (--dense-size, default 512); on a
GPU also UniFormer-S at batch 64, the issue's training-step target (CPU runs take it only when
``--models`` names it). ``--main`` (make main): S, XXS, video S and dense S hybrid, eager,
``torch.compile`` and ours (batch 1 on CPU; 64, 64, 8, 8 on a GPU), compile's training step on S
only.

Protocol as bench_models.py: eval under no_grad for fwd, train() with dropout and drop path at 0
for fwd+bwd (loss ``out.float().square().mean()`` summed over outputs); compile warm-ups are not
timed (``compile_s``). Peak memory: the most memory the step holds at once beyond what was live
before it (CUDA: the caching allocator's peak; CPU: the profiler's allocation events, with
gradients freed before it starts and Kineto's log lines off), measured in one extra call before
the timing (after the compile warm-up); it is the row's ``peak_mib`` and the
``accelerate_memory.md`` table next to the results.

    python -m pytest bench/bench_accelerate.py -s                         # full run
    python -m pytest bench/bench_accelerate.py -s --quick                 # smoke run: S bs 1,
                                                                          # small input
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench import harness
from bench.bench_models import _count_flops, _set_mode, _step_fn
from bench.conftest import bench_session
from bench.shapes import DENSE_CASES, build_model, model_input
from uniformer_kernels.convert import accelerate

IMPLS = ("eager", "compile", "ours", "ours+compile")
# case -> model, create_model kwargs, kind (image | video | dense), batch
CASES = {
    "uniformer_small-bs1": ("uniformer_small", {}, "image", 1),
    "uniformer_small-bs8": ("uniformer_small", {}, "image", 8),
    "uniformer_small-bs64": ("uniformer_small", {}, "image", 64),
    "uniformer_xxs-bs1": ("uniformer_xxs", {}, "image", 1),
    "uniformer_xxs-bs8": ("uniformer_xxs", {}, "image", 8),
    "uniformer_xxs-bs64": ("uniformer_xxs", {}, "image", 64),
    "uniformer_small_video-bs1": ("uniformer_small_video", {}, "video", 1),
    "uniformer_small_video-bs8": ("uniformer_small_video", {}, "video", 8),
    "dense_small_hybrid-bs1": (*DENSE_CASES["dense_small_hybrid"], "dense", 1),
    "dense_small_hybrid-bs8": (*DENSE_CASES["dense_small_hybrid"], "dense", 8),
}
# the default (full) list: CPU and GPU; bs 64 on a GPU only (a bs-64 training step takes minutes
# on a small CPU)
DEFAULT_CASES = ("uniformer_small-bs1", "uniformer_small-bs8", "uniformer_small-bs64",
                 "uniformer_xxs-bs8", "uniformer_small_video-bs1", "dense_small_hybrid-bs1")
GPU_ONLY_CASES = ("uniformer_small-bs64",)
# make main's headline (--main): each model once, at a batch the device is made for. The training
# step of torch.compile runs on the first (S) only: each of its warm-ups takes ~2 min on 2 CPU
# cores, and all four would double make main's ten minutes (--full has them)
MAIN_CASES = {"cpu": ("uniformer_small-bs1", "uniformer_xxs-bs1", "uniformer_small_video-bs1",
                      "dense_small_hybrid-bs1"),
              "cuda": ("uniformer_small-bs64", "uniformer_xxs-bs64", "uniformer_small_video-bs8",
                       "dense_small_hybrid-bs8")}
MAIN_IMPLS = ("eager", "compile", "ours")


def bench_params(settings) -> list[dict]:
    # --quick: one case (each torch.compile warm-up takes a minute or two on a small CPU)
    device = "cuda" if settings.on_cuda else "cpu"
    if settings.models:
        names = settings.models
    elif settings.quick:
        names = ["uniformer_small-bs1"]
    elif settings.main:
        names = list(MAIN_CASES[device])
    else:
        names = [n for n in DEFAULT_CASES if settings.on_cuda or n not in GPU_ONLY_CASES]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; known: {', '.join(CASES)}")
    bad = [i for i in settings.impls or () if i not in IMPLS]
    if bad:
        raise ValueError(f"--impls: bench_accelerate knows {', '.join(IMPLS)}, not {bad}")
    impls = settings.impls or (MAIN_IMPLS if settings.main else IMPLS)
    params = []
    for name in names:
        model, kwargs, kind, batch = CASES[name]
        for mode in settings.modes:
            for impl in impls:
                if (settings.main and impl == "compile" and mode == "fwd+bwd"
                        and name != MAIN_CASES[device][0]):
                    continue  # see MAIN_CASES
                params.append(dict(case=name, model=model, kwargs=kwargs, kind=kind, batch=batch,
                                   mode=mode, impl=impl, id=f"{name}-{mode}-{impl}"))
    return params


def _input(case: dict, settings) -> torch.Tensor:
    if case["kind"] == "dense":
        return model_input(case["batch"], settings.dense_size)
    frames = settings.frames if case["kind"] == "video" else None
    return model_input(case["batch"], settings.img_size, frames)


def peak_memory_mib(fn, device: torch.device, before=None) -> float:
    """MiB allocated at the step's high-water mark beyond what was live before it.

    ``before()`` runs first, outside the measurement (e.g. dropping the last step's gradients):
    the CPU profiler cannot size a block allocated before it started, so a step that frees one
    would make it print a warning (CPUAllocator.cpp, "Memory block of unknown size").
    """
    if before is not None:
        before()
    harness.free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # Kineto (the profiler's backend) prints profiler_start/stop lines at its USDT level (5)
    # unless its level is above it; read when the profiler first starts, so set here.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def test_accelerate(bench_case, meter):
    error = _run_case(bench_case, meter)
    if error:
        pytest.fail(error.strip().splitlines()[-1], pytrace=False)


def _run_case(case: dict, meter) -> str | None:
    s = meter.settings
    name, mode, impl = case["case"], case["mode"], case["impl"]
    torch.manual_seed(0)
    model = _set_mode(build_model(case["model"], **case["kwargs"]), mode)
    x = _input(case, s).to(dtype=s.torch_dtype)
    shape = {"input": list(x.shape)}
    flops = meter.cached(("flops", name, mode), lambda: _count_flops(model, x.float(), mode))
    compile_s = None
    try:
        model = model.to(device=meter.device, dtype=meter.dtype)
        x = x.to(meter.device)
        if impl.startswith("ours"):
            model = accelerate(model)
        if impl.endswith("compile"):
            torch._dynamo.reset()  # fresh caches: earlier cases must not eat the recompile limit
            fn = _step_fn(torch.compile(model, mode=s.compile_mode), x, mode)
            compile_s = harness.timed_call(fn, meter.device)
        else:
            fn = _step_fn(model, x, mode)
        params = [p for p in model.parameters() if p.requires_grad]

        def drop_grads():
            for p in params:
                p.grad = None

        peak = peak_memory_mib(fn, meter.device, before=drop_grads)
        meter.measure(fn, case=name, mode=mode, impl=impl, shape=shape, flops=flops,
                      batch=case["batch"], compile_s=compile_s, extra={"peak_mib": peak})
        return None
    except Exception:
        error = traceback.format_exc()
        meter.fail(error, case=name, mode=mode, impl=impl, shape=shape, batch=case["batch"],
                   compile_s=compile_s)
        return error
    finally:
        if impl.endswith("compile"):
            torch._dynamo.reset()


@pytest.fixture(scope="module", autouse=True)
def memory_table(request):
    """After the module: the peak memory of every case as a table next to the timing results."""
    yield
    sess = bench_session(request.config)
    rows = [r for r in sess.rows.get("accelerate", []) if r.get("peak_mib") is not None]
    if not rows:
        return
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    lines = ["# accelerate — peak memory of one step (MiB beyond what was live before it)", "",
             "| case | mode | " + " | ".join(impls) + " |",
             "|---|---|" + "--:|" * len(impls)]
    table: dict[tuple, dict] = {}
    for r in rows:
        table.setdefault((r["case"], r["mode"]), {})[r["impl"]] = r["peak_mib"]
    for (case, mode), by_impl in table.items():
        cells = [f"{by_impl[i]:.0f}" if i in by_impl else "" for i in impls]
        lines.append(f"| {case} | {mode} | " + " | ".join(cells) + " |")
    (sess.out_dir() / "accelerate_memory.md").write_text("\n".join(lines) + "\n")
