"""Whole reference models: forward and forward+backward, eager vs torch.compile, with FLOPs and the
FLOP roofline (FLOPs / measured GEMM peak).

Cases: every ``um.list_models()`` variant (image at --img-size, default 224; video at
--frames x --img-size, default 8x224) plus two dense backbones at --dense-size (default 512):
``dense_small_hybrid`` (uniformer_small, features_only, hybrid windows of 14) and ``dense_xxs``
(uniformer_xxs, features_only).

The reference runs as users run it: contiguous NCHW, ``eval()`` under ``torch.no_grad()`` for fwd;
``train()`` with dropout and drop-path at 0 for fwd+bwd, loss = sum over outputs of
``out.float().square().mean()`` (light models and large_ls return tuples in train mode).
torch.compile's warm-up is not timed; its duration is the row's ``compile_s``.

    python -m pytest bench/bench_models.py -s                      # full run, results in bench/results
    python -m pytest bench/bench_models.py -s --quick                # smoke run: uniformer_small only
    python -m pytest bench/bench_models.py -s --quick --models uniformer_xxs,uniformer_small
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch

from bench import harness
from bench.shapes import DENSE_CASES, build_model, import_models, model_input

# the windows-only backbone is left to the parity summary: hybrid covers both attention kinds
BENCH_DENSE_CASES = ("dense_small_hybrid", "dense_xxs")


def model_cases() -> dict[str, dict]:
    """case name -> model name, create_model kwargs, kind (image | video | dense)."""
    um = import_models()
    cases = {}
    for name in um.list_models():
        kind = "video" if name.endswith("_video") else "image"
        cases[name] = dict(model=name, kwargs={}, kind=kind)
    for case in BENCH_DENSE_CASES:
        name, kwargs = DENSE_CASES[case]
        cases[case] = dict(model=name, kwargs=kwargs, kind="dense")
    return cases


def bench_params(settings) -> list[dict]:
    cases = model_cases()
    # --quick: one model (each torch.compile warm-up takes a minute or more on a small CPU)
    names = ["uniformer_small"] if settings.quick else list(cases)
    if settings.models:
        unknown = [m for m in settings.models if m not in cases]
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; known: {', '.join(cases)}")
        names = settings.models
    params = []
    for name in names:
        for mode in settings.modes:
            for impl in settings.impls or ("eager", "compile"):
                params.append(dict(cases[name], case=name, mode=mode, impl=impl,
                                   id=f"{name}-{mode}-{impl}"))
    return params


def _input_spec(case: dict, settings) -> tuple[int, int | None]:
    if case["kind"] == "dense":
        return settings.dense_size, None
    if case["kind"] == "video":
        return settings.img_size, settings.frames
    return settings.img_size, None


def _loss(out) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        return sum(_loss(o) for o in out)
    return out.float().square().mean()


def _step_fn(model, x, mode: str, no_grad: bool = True):
    """The callable that is timed: a no-grad forward, or forward + loss + backward."""
    if mode == "fwd":
        def fwd():
            with torch.set_grad_enabled(not no_grad):
                model(x)
        return fwd

    params = [p for p in model.parameters() if p.requires_grad]

    def fwd_bwd():
        for p in params:
            p.grad = None
        _loss(model(x)).backward()
    return fwd_bwd


def _set_mode(model, mode: str):
    return model.eval() if mode == "fwd" else model.train()


def _count_flops(model, x, mode: str) -> int:
    """FLOPs of one step, counted on a meta copy (no compute); on the real model if that fails.

    The forward is counted with grad enabled (same FLOPs): FlopCounterMode's module tracker trips
    over views of parameters made under no_grad (the light models' expanded cls_token).
    """
    try:
        meta_model = _set_mode(copy.deepcopy(model).to("meta"), mode)
        meta_x = torch.empty(x.shape, dtype=x.dtype, device="meta")
        return harness.count_flops(_step_fn(meta_model, meta_x, mode, no_grad=False))
    except (NotImplementedError, RuntimeError):
        return harness.count_flops(_step_fn(model, x, mode, no_grad=False))


def test_model(bench_case, meter):
    error = _run_case(bench_case, meter)
    if error:  # the case's tensors are gone by now (an OOM must not starve the next case)
        pytest.fail(error.strip().splitlines()[-1], pytrace=False)


def _run_case(bench_case, meter) -> str | None:
    """Build, (compile,) time and record one case; the formatted error if it raised."""
    s = meter.settings
    case, mode, impl = bench_case["case"], bench_case["mode"], bench_case["impl"]
    size, frames = _input_spec(bench_case, s)
    torch.manual_seed(0)
    model = _set_mode(build_model(bench_case["model"], **bench_case["kwargs"]), mode)
    x = model_input(s.batch, size, frames, dtype=s.torch_dtype)
    shape = {"input": list(x.shape)}
    flops = meter.cached(("flops", case, mode, tuple(x.shape)),
                         lambda: _count_flops(model, x.float(), mode))
    compile_s = None
    try:
        model = model.to(device=meter.device, dtype=meter.dtype)
        x = x.to(meter.device)
        if impl == "eager":
            fn = _step_fn(model, x, mode)
        elif impl == "compile":
            torch._dynamo.reset()  # fresh caches: earlier cases must not eat the recompile limit
            fn = _step_fn(torch.compile(model, mode=s.compile_mode), x, mode)
            compile_s = harness.timed_call(fn, meter.device)
        else:
            raise ValueError(f"--impls: bench_models knows eager and compile, not {impl!r}")
        meter.measure(fn, case=case, mode=mode, impl=impl, shape=shape, flops=flops,
                      batch=s.batch, compile_s=compile_s)
        return None
    except Exception:
        error = traceback.format_exc()
        meter.fail(error, case=case, mode=mode, impl=impl, shape=shape, batch=s.batch,
                   compile_s=compile_s)
        return error
    finally:
        if impl == "compile":
            torch._dynamo.reset()
