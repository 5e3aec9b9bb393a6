"""Op 4, attention, on the UniFormer shapes read off the models (bench/shapes.py): from the qkv
Linear's output to proj's input, forward and forward+backward.

Cases (``--models`` picks among their names): S-224 stages 3 and 4 (global), XXS-224 (the light
model's class-token attention, pruned N), video S 8x224 global and split (temporal over T per
position, spatial over H*W per frame), dense S hybrid at 512 (14x14 windows over the 32x32 stage-3
grid, and its global blocks). Each at ``--batch`` images.

Implementations, each given its natural input:

* ``eager``: the reference's lines (models/layers.py Attention.forward between ``self.qkv`` and
  ``self.proj``) on the sequences the reference module builds: contiguous (B*H*W, T) / (B*T, H*W)
  token sequences for split attention, padded windows for window attention (the reference's pad,
  partition, reverse and crop act on C-channel tensors outside this span and are not timed);
* ``compile``: ``torch.compile`` of that function;
* ``sdpa_<backend>``: ``F.scaled_dot_product_attention`` on strided q, k, v views of the same
  input, forced to one SDPA backend (CPU: flash, math; CUDA: flash, efficient, cudnn, math); a
  backend that rejects the shape is recorded as failed. For the class-token case the class row is
  added as one extra (B, H, N) softmax;
* ``ours_<backend>``: ``uk.ops.attention`` forced to that backend (cpu; triton on CUDA), on the
  packed qkv as the op's callers hold it: (B, N, 3C), strided views of the (B, T*H*W, 3C) buffer,
  or the unpadded (B, H*W, 3C) grid with the qkv bias.

``--impls`` names them (default: every one this device runs). Roofline: FLOPs of the two matmuls
(forward 4 S L^2 C for S sequences of L tokens, windows counted padded; forward+backward 3x that:
six matmuls) against the GEMM peak, bytes of qkv in and out (forward 4C per token; forward+backward
12C: qkv, out, grad_out, grad_qkv) against the copy bandwidth.

    python -m pytest bench/bench_attention.py -s                       # results in bench/results
    python -m pytest bench/bench_attention.py -s --quick               # one case per kind
    python -m pytest bench/bench_attention.py -s --models S-224-global-N196 --impls eager,ours_cpu
"""

from __future__ import annotations

import math
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import harness
import uniformer_kernels as uk
from bench.shapes import collect_shapes
from uniformer_kernels.ops.attention import attention

CONFIGS = ("S-224", "XXS-224", "video-S-8x224", "video-S-split-8x224", "dense-S-hybrid-512")
SDPA_BACKENDS = {
    "cpu": {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH},
    "cuda": {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH},
}


# ---- cases --------------------------------------------------------------------------------------

def _cases(batch: int) -> list[dict]:
    """One dict per attention shape of the configurations at ``batch`` images: name, kind, C,
    heads, head_dim and the kind's geometry; ``sequences`` x ``seq_len`` is what the kernels
    iterate over (windows padded), ``tokens`` the real tokens."""
    cases = []
    for config in CONFIGS:
        rows = collect_shapes(config, batch=batch, op="attention")
        for r in rows:
            common = dict(config=config, kind=r["kind"], C=r["C"], heads=r["heads"],
                          head_dim=r["head_dim"], count=r["count"])
            if r["kind"] in ("global", "global_cls"):
                cases.append(dict(common, name=f"{config}-{r['kind']}-N{r['N']}", images=r["B"],
                                  sequences=r["B"], seq_len=r["N"], tokens=r["B"] * r["N"]))
            elif r["kind"] == "window":
                grid = next(d["shape"][2:] for d in collect_shapes(config, batch=batch, op="dwconv")
                            if d["block"] == "SABlock_Windows" and d["kind"] == "pos_embed")
                ws = r["window"]
                windows = math.ceil(grid[0] / ws) * math.ceil(grid[1] / ws)
                cases.append(dict(common, name=f"{config}-window{ws}-{grid[0]}x{grid[1]}",
                                  images=batch, grid=grid, window=ws, sequences=batch * windows,
                                  seq_len=ws * ws, tokens=batch * grid[0] * grid[1]))
            elif r["kind"] == "temporal":  # rows (B*HW, T); its spatial partner: (B*T, HW)
                frames = r["N"]
                positions = next(s["N"] for s in rows
                                 if s["kind"] == "spatial" and s["C"] == r["C"])
                for kind, seq_len, sequences in (("temporal", frames, batch * positions),
                                                 ("spatial", positions, batch * frames)):
                    cases.append(dict(common, kind=kind,
                                      name=f"{config}-{kind}-T{frames}-HW{positions}-C{r['C']}",
                                      images=batch, frames=frames, positions=positions,
                                      sequences=sequences, seq_len=seq_len,
                                      tokens=batch * frames * positions))
    return cases


MAIN_CASES = ("S-224-global-N196", "dense-S-hybrid-512-window14-32x32")


def bench_params(settings) -> list[dict]:
    cases = _cases(settings.batch)
    names = [c["name"] for c in cases]
    if settings.models:
        unknown = [m for m in settings.models if m not in names]
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; known: {', '.join(names)}")
        cases = [c for c in cases if c["name"] in settings.models]
    elif settings.main:  # make main's op summary: S stage 3 and dense S's windows
        cases = [c for c in cases if c["name"] in MAIN_CASES]
    elif settings.quick:  # the first case of each kind
        first = {}
        for case in cases:
            first.setdefault(case["kind"], case)
        cases = list(first.values())
    device = torch.device(settings.device)
    if settings.main and not settings.impls:
        impls = ["eager"] + [f"ours_{name}" for name in _our_backends(device)]
        return [dict(case, mode=mode, impl=impl, id=f"{case['name']}-{mode}-{impl}")
                for case in cases for mode in settings.modes for impl in impls]
    impls = settings.impls or (["eager", "compile"]
                               + [f"sdpa_{name}" for name in SDPA_BACKENDS[device.type]]
                               + [f"ours_{name}" for name in _our_backends(device)])
    return [dict(case, mode=mode, impl=impl, id=f"{case['name']}-{mode}-{impl}")
            for case in cases for mode in settings.modes for impl in impls]


def _our_backends(device: torch.device) -> list[str]:
    """The op's kernel backends that serve ``device`` (never the Triton interpreter)."""
    available = uk.available_backends(device)
    return [name for name in ("triton", "cpu")
            if available[name][0] and not (name == "triton" and device.type == "cpu")]


# ---- the implementations ------------------------------------------------------------------------

def reference_attention(qkv: torch.Tensor, num_heads: int, scale: float, return_cls_attn: bool):
    """models/layers.py Attention.forward from the qkv Linear's output to proj's input."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    cls_attn = attn[:, :, 0, 1:].mean(dim=1) if return_cls_attn else None
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return (x, cls_attn) if return_cls_attn else x


def sdpa_attention(qkv: torch.Tensor, num_heads: int, scale: float, return_cls_attn: bool):
    """SDPA on strided q, k, v views; the class row as one extra softmax of q_0 k^T."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, -1)
    if not return_cls_attn:
        return x
    cls_attn = (torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) * scale).softmax(-1)
    return x, cls_attn[:, :, 1:].mean(dim=1)


def _reference_input(case: dict, device, dtype) -> torch.Tensor:
    """The qkv the reference module holds: (sequences, seq_len, 3C) contiguous (windows padded)."""
    return torch.randn(case["sequences"], case["seq_len"], 3 * case["C"], device=device,
                       dtype=dtype)


def _ours_inputs(case: dict, device, dtype):
    """(tensors the op differentiates, a function calling the op on them)."""
    C, heads, kind = case["C"], case["heads"], case["kind"]
    if kind == "window":
        grid = case["grid"]
        qkv = torch.randn(case["images"], grid[0] * grid[1], 3 * C, device=device, dtype=dtype)
        bias = torch.randn(3 * C, device=device, dtype=dtype)
        return [qkv, bias], lambda qkv, bias: attention(
            qkv, heads, window_size=case["window"], grid_size=tuple(grid), qkv_bias=bias)
    if kind in ("temporal", "spatial"):
        images, frames, positions = case["images"], case["frames"], case["positions"]
        qkv = torch.randn(images, frames * positions, 3 * C, device=device, dtype=dtype)
        if kind == "temporal":
            return [qkv], lambda qkv: attention(
                qkv.view(images, frames, positions, 3 * C).transpose(1, 2), heads)
        return [qkv], lambda qkv: attention(qkv.view(images, frames, positions, 3 * C), heads)
    qkv = torch.randn(case["images"], case["seq_len"], 3 * C, device=device, dtype=dtype)
    return [qkv], lambda qkv: attention(qkv, heads, return_cls_attn=kind == "global_cls")


def _callable(case: dict, impl: str, mode: str, device, dtype):
    """(the timed function, compile time or None)."""
    heads, scale, cls = case["heads"], case["head_dim"] ** -0.5, case["kind"] == "global_cls"
    if impl.startswith("ours_"):
        inputs, op = _ours_inputs(case, device, dtype)
    else:
        inputs = [_reference_input(case, device, dtype)]
        fn = reference_attention if impl in ("eager", "compile") else sdpa_attention
        if impl == "compile":
            torch._dynamo.reset()  # fresh caches: earlier cases must not eat the recompile limit
            fn = torch.compile(fn)

        def op(qkv):
            return fn(qkv, heads, scale, cls)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                op(*inputs)
    else:
        for t in inputs:
            t.requires_grad_()
        grads = []  # upstream gradients, made at the first call (compile time included there)

        def step():
            out = op(*inputs)
            out = out if isinstance(out, tuple) else (out,)
            if not grads:
                grads.extend(torch.randn_like(o) for o in out)
            torch.autograd.grad(out, inputs, grads)

    compile_s = harness.timed_call(step, device) if impl == "compile" else None
    if impl.startswith(("sdpa_", "ours_")):
        name = impl.split("_", 1)[1]
        if impl.startswith("sdpa_"):
            sdpa_backend = SDPA_BACKENDS[torch.device(device).type][name]

            def context():
                return sdpa_kernel([sdpa_backend])
        else:
            def context():
                return uk.backend(name)
        plain = step

        def step():
            with context():
                plain()
        step()  # a backend that rejects the shape raises here, before timing
    return step, compile_s


def _roofline_terms(case: dict, mode: str, element_size: int) -> tuple[float, float]:
    flops = 4.0 * case["sequences"] * case["seq_len"] ** 2 * case["C"]
    nbytes = 4.0 * case["tokens"] * case["C"] * element_size
    return (flops, nbytes) if mode == "fwd" else (3 * flops, 3 * nbytes)


def test_attention(bench_case, meter):
    case, mode, impl = bench_case, bench_case["mode"], bench_case["impl"]
    shape = {k: case[k] for k in ("images", "sequences", "seq_len", "C", "heads", "head_dim")}
    flops, nbytes = _roofline_terms(case, mode, torch.empty((), dtype=meter.dtype).element_size())
    torch.manual_seed(0)
    compile_s = None
    try:
        fn, compile_s = _callable(case, impl, mode, meter.device, meter.dtype)
        meter.measure(fn, case=case["name"], mode=mode, impl=impl, shape=shape, flops=flops,
                      nbytes=nbytes, compile_s=compile_s, cuda_graph=meter.settings.cuda_graphs)
    except Exception as exc:
        error = traceback.format_exc()
        meter.fail(error, case=case["name"], mode=mode, impl=impl, shape=shape,
                   compile_s=compile_s)
        if impl.startswith("sdpa_"):  # not every SDPA backend takes every shape: a finding
            pytest.skip(f"{impl} rejects this case: {exc}")
        pytest.fail(error.strip().splitlines()[-1], pytrace=False)
    finally:
        if impl == "compile":
            torch._dynamo.reset()
