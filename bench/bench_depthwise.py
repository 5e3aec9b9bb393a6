"""Ops 1 and 2 on the shapes UniFormer runs: depthwise conv (and the positional encoding + norm),
PyTorch eager in NCHW and in channels-last, ``torch.compile`` of the channels-last eager code, and
ours (each kernel backend present: cpu on CPU; triton and cuda on GPU).

Cases (``--models`` filters by case name):

* ``target_2d`` 8x64x56x56 3x3 residual and ``target_3d`` 1x64x8x56x56 5x5x5: the issue's targets,
  whatever ``--batch`` says;
* ``<config>:<block>:<kind>:<shape>`` read off the models by bench/shapes.py at ``--batch``
  (default 1 on CPU): UniFormer-S, XXS at 224, video S at 8x224 and the dense XXS at 512;
* ``pe_norm:*``: pos_embed_norm on the positional encodings of S (BatchNorm and LayerNorm blocks):
  eager is conv + residual + norm (eval BatchNorm, or LayerNorm on tokens as the reference does).

Rooflines: FLOPs (2 per tap, the residual and norm ignored) against the measured GEMM peak, bytes
(x read, y written; fwd+bwd adds grad_y read twice, x read again and grad_x written) against the
measured copy bandwidth; the larger wins.

    python -m pytest bench/bench_depthwise.py -s                 # results in bench/results
    python -m pytest bench/bench_depthwise.py -s --quick --models target_2d
"""
from __future__ import annotations

import math
import time
import traceback

import pytest
import torch
import torch.nn.functional as F

import uniformer_kernels as uk
from bench import harness
from bench.shapes import collect_shapes

TARGETS = {
    "target_2d": dict(shape=[8, 64, 56, 56], kernel=[3, 3], residual=True),
    "target_3d": dict(shape=[1, 64, 8, 56, 56], kernel=[5, 5, 5], residual=False),
}
MODEL_CONFIGS = ("S-224", "XXS-224", "video-S-8x224", "dense-XXS-512")
PE_NORM_CONFIG = "S-224"


def _channels_last(dims: int):
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def _our_backends(device: torch.device) -> list[str]:
    return [name for name in ("triton", "cuda", "cpu")
            if name in uk.available_backends(device) and uk.available_backends(device)[name][0]
            and not (name == "triton" and device.type == "cpu")]


def bench_cases(settings) -> dict[str, dict]:
    cases = {name: dict(case, op="depthwise_conv") for name, case in TARGETS.items()}
    batch = settings.batch
    for config in MODEL_CONFIGS:
        for rec in collect_shapes(config, batch=batch, op="dwconv"):
            shape = "x".join(map(str, rec["shape"]))
            name = f"{config}:{rec['block']}:{rec['kind']}:{shape}"
            cases[name] = dict(shape=rec["shape"], kernel=rec["kernel"], residual=rec["residual"],
                               op="depthwise_conv")
    for rec in collect_shapes(PE_NORM_CONFIG, batch=batch, op="dwconv"):
        if rec["kind"] == "pos_embed":
            shape = "x".join(map(str, rec["shape"]))
            cases[f"pe_norm:{rec['norm']}:{shape}"] = dict(
                shape=rec["shape"], kernel=rec["kernel"], norm=rec["norm"], op="pos_embed_norm")
    return cases


# make main's op summary (--main): a 2-D and a 3-D 5x5 conv of the models' first stage, against
# the reference's NCHW conv and channels-last (oneDNN / cuDNN), fwd and fwd+bwd
MAIN_CASES = ("S-224:CBlock:local:", "video-S-8x224:CBlock:local:")
MAIN_IMPLS = ("eager_nchw", "eager_cl")


def bench_params(settings) -> list[dict]:
    cases = bench_cases(settings)
    names = list(cases)
    if settings.main and not settings.models:
        names = [next(n for n in cases if n.startswith(prefix)) for prefix in MAIN_CASES]
        impls = settings.impls or (list(MAIN_IMPLS)
                                   + [f"ours_{b}" for b in _our_backends(torch.device(settings.device))])
        return [dict(cases[name], case=name, mode=mode, impl=impl, id=f"{name}-{mode}-{impl}")
                for name in names for mode in settings.modes for impl in impls]
    if settings.models:
        unknown = [m for m in settings.models if m not in cases]
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; known: {', '.join(cases)}")
        names = settings.models
    device = torch.device(settings.device)
    impls = settings.impls or (["eager_nchw", "eager_cl", "compile"]
                               + [f"ours_{b}" for b in _our_backends(device)])
    return [dict(cases[name], case=name, mode=mode, impl=impl, id=f"{name}-{mode}-{impl}")
            for name in names for mode in settings.modes for impl in impls]


# ---- the implementations ------------------------------------------------------------------------

def eager_depthwise(x, weight, bias, residual):
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    y = conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=x.shape[1])
    return y + x if residual else y


def eager_pos_embed_norm(x, weight, bias, norm_weight, norm_bias, norm):
    """The reference blocks' code: BatchNorm in eval (running stats folded by PyTorch at run time,
    here as the functional batch_norm) or LayerNorm on tokens."""
    y = eager_depthwise(x, weight, bias, residual=True)
    if norm == "batchnorm":
        channels = x.shape[1]
        stats = torch.zeros(channels, dtype=x.dtype, device=x.device)
        z = F.batch_norm(y, stats, stats + 1, norm_weight, norm_bias, training=False, eps=1e-5)
    else:
        tokens = y.flatten(2).transpose(1, 2)
        z = F.layer_norm(tokens, (x.shape[1],), norm_weight, norm_bias, 1e-6)
    return y, z


def ours_pos_embed_norm(x, weight, bias, norm_weight, norm_bias, norm):
    return uk.ops.pos_embed_norm(x, weight, bias, norm_weight, norm_bias,
                                 norm="layernorm" if norm == "layernorm" else "affine")


def _inputs(case, device, dtype, mode, impl):
    shape, kernel = case["shape"], case["kernel"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if impl != "eager_nchw":
        x = x.contiguous(memory_format=_channels_last(len(shape)))
    channels = shape[1]
    params = [torch.randn(channels, 1, *kernel, generator=gen) / math.prod(kernel),
              torch.randn(channels, generator=gen)]
    if case["op"] == "pos_embed_norm":
        params += [1 + 0.1 * torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)]
    params = [p.to(device=device, dtype=dtype) for p in params]
    if mode == "fwd+bwd":
        x.requires_grad_()
        for p in params:
            p.requires_grad_()
    return x, params


def _step(case, impl, x, params, mode):
    """The callable that is timed."""
    if case["op"] == "depthwise_conv":
        residual = case["residual"]
        if impl.startswith("ours_"):
            def op(x, w, b):
                return (uk.ops.depthwise_conv(x, w, b, residual=residual),)
        else:
            def op(x, w, b):
                return (eager_depthwise(x, w, b, residual),)
    else:
        norm = case["norm"]
        fn = ours_pos_embed_norm if impl.startswith("ours_") else eager_pos_embed_norm

        def op(*args):
            return fn(*args, norm)
    if impl == "compile":
        op = torch.compile(op, fullgraph=True)
    if impl.startswith("ours_"):
        backend = impl[len("ours_"):]
        inner = op

        def op(*args):
            with uk.backend(backend):
                return inner(*args)

    inputs = (x, *params)
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                op(*inputs)
        return fwd
    grads = [torch.randn_like(t) for t in op(*inputs)]

    def fwd_bwd():
        torch.autograd.grad(op(*inputs), inputs, grads)
    return fwd_bwd


def _cost(case, mode, element_size) -> tuple[int, int]:
    """(FLOPs, bytes) of one call; see the module docstring."""
    numel = math.prod(case["shape"])
    flops = 2 * numel * math.prod(case["kernel"])
    outputs = 2 if case["op"] == "pos_embed_norm" else 1
    moved = 1 + outputs
    if mode == "fwd+bwd":
        flops *= 3  # grad_x (a conv) and grad_weight (a conv-sized reduction)
        moved += 2 * outputs + 2  # grad outputs read by both passes, x read again, grad_x written
    return flops, moved * numel * element_size


def test_depthwise(bench_case, meter):
    s = meter.settings
    case, mode, impl = bench_case["case"], bench_case["mode"], bench_case["impl"]
    shape = {"x": bench_case["shape"], "kernel": bench_case["kernel"]}
    compile_s = None
    try:
        x, params = _inputs(bench_case, meter.device, meter.dtype, mode, impl)
        if impl == "compile":
            torch._dynamo.reset()
        start = time.perf_counter()
        fn = _step(bench_case, impl, x, params, mode)  # fwd+bwd runs the op once (compiles it)
        if impl == "compile":
            compile_s = time.perf_counter() - start + harness.timed_call(fn, meter.device)
        flops, nbytes = _cost(bench_case, mode, x.element_size())
        meter.measure(fn, case=case, mode=mode, impl=impl, shape=shape, flops=flops, nbytes=nbytes,
                      batch=bench_case["shape"][0], compile_s=compile_s,
                      cuda_graph=s.cuda_graphs)
    except Exception:
        error = traceback.format_exc()
        meter.fail(error, case=case, mode=mode, impl=impl, shape=shape,
                   batch=bench_case["shape"][0], compile_s=compile_s)
        pytest.fail(error.strip().splitlines()[-1], pytrace=False)
    finally:
        if impl == "compile":
            torch._dynamo.reset()
