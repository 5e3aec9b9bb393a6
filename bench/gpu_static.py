"""Ahead-of-time GPU check without a GPU: every Triton kernel specialisation the launchers produce on
the models' shapes, and every CUDA kernel instantiation, compiled for sm_80 and sm_90, with
registers, spills and shared memory from ptxas.

Triton. The launchers build LaunchPlans (uniformer_kernels/triton/_plan.py) with the plan
functions ``forward_plan``, ``weight_grad_plan``, ``pos_embed_norm_plan`` (depthwise.py) and
``forward_plan``, ``backward_plans`` (attention.py); this check calls the same functions on meta
tensors of every shape of bench/shapes.py's configurations (batch 1 and the default batch), plus the
family's sizes the models do not use (kernels 3x1x1 and 1x7x7, head_dim 32 and 128, every attention
mode at every head_dim), in float32, float16, bfloat16 and float64. Each plan is specialised by
Triton's own binder (pointer alignment, divisibility by 16 and value-1 integers, as a launch would
see them; tensors are taken as 16-byte aligned at their storage offset, as the CUDA caching
allocator gives them), deduplicated, and compiled with ``triton.compile`` for a GPUTarget. The
grids are checked against CUDA's limits on every plan.

CUDA. Each csrc/cuda/*.cu is compiled by nvcc with ``-Xptxas -v`` for sm_80 and sm_90; one row per
kernel instantiation and arch.

Fails (exit 1) on a compile error, shared memory above the arch's per-block opt-in maximum, a grid
over CUDA's limits, or a register spill in a 32/16-bit dtype (float64 spills are reported only).

    python -m bench.gpu_static --json PATH [--md PATH] [--jobs 2] [--no-cuda] [--nvcc NVCC]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.shapes import CONFIGS, collect_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent

ARCHS = {"sm_80": 80, "sm_90": 90}
# Per-block shared memory, opt-in maximum (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability": 163 KB on 8.0, 227 KB on 9.0).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
# The check's own extras: sizes the launchers accept that the models do not use.
EXTRA_KERNEL_SIZES = ((3, 1, 1), (1, 7, 7))
EXTRA_HEAD_DIMS = (28, 32, 64, 128)


# ---- Triton: the plans --------------------------------------------------------------------------

def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _acc(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def depthwise_plans(shape, kernel, residual: bool, norm: str | None, dtype) -> list:
    """The plans of one depthwise conv of the models (NC[D]HW input ``shape``): forward (with the
    conv's bias), dx (the forward with the flipped weight, no bias), dw (deterministic and atomic)
    and, for a positional embedding, pos_embed_norm with its block's norm."""
    from uniformer_kernels.triton import depthwise as dw

    n, c, *spatial = shape
    d, h, w = ([1] + spatial) if len(spatial) == 2 else spatial
    kd, kh, kw = ([1] + list(kernel)) if len(kernel) == 2 else kernel
    acc = _acc(dtype)
    x = _meta((n, d, h, w, c), dtype)
    weight, bias = _meta((kd, kh, kw, c), acc), _meta((c,), acc)
    plans = [dw.forward_plan(x, weight, bias, torch.empty_like(x), residual),
             replace(dw.forward_plan(x, weight, None, torch.empty_like(x), residual),
                     op="depthwise.dx")]
    plans += [dw.weight_grad_plan(x, x, (kd, kh, kw), det)[0] for det in (False, True)]
    if norm is not None:
        layer_norm = norm == "layernorm"
        pixels = n * d * h * w if layer_norm else 0
        plans.append(dw.pos_embed_norm_plan(
            x, weight, bias, bias, bias, torch.empty_like(x), torch.empty_like(x),
            _meta((pixels,), acc), _meta((pixels,), acc), layer_norm, 1e-6))
    return plans


def attention_plans(qkv: torch.Tensor, num_heads: int, *, window=None, with_bias=False,
                    cls=False) -> list:
    """Forward, delta and backward plans of one attention call on ``qkv`` (meta), its outputs laid
    out as the op allocates them; with ``cls`` the class row and its gradient."""
    from uniformer_kernels.ops.attention import Window, _empty_outputs
    from uniformer_kernels.triton import attention as at

    window_t = Window(*window) if window is not None else None
    qkv_bias = _meta((qkv.shape[-1],), qkv.dtype) if with_bias else None
    out, lse, cls_probs = _empty_outputs(qkv, num_heads, window_t, cls)
    scale = 0.125
    plans = [at.forward_plan(qkv, qkv_bias, out, lse, cls_probs if cls else None,
                             num_heads=num_heads, scale=scale, window=window_t)]
    delta_plan, gradient_plans, *_ = at.backward_plans(
        torch.empty_like(out), torch.empty_like(cls_probs) if cls else None, qkv, qkv_bias, out,
        lse, torch.empty_like(qkv), num_heads=num_heads, scale=scale, window=window_t)
    return plans + [delta_plan, *gradient_plans]


def _attention_cases(records: list[dict], dtype) -> list:
    """Plans of the models' attention records: global (3-D qkv), global_cls (class row, with and
    without its gradient), window (the padded grid, with and without the qkv bias), split
    (strided 4-D views of one (B, T*HW, 3C) qkv, as uniformer_kernels.nn.attention builds them)."""
    plans = []
    temporal = {r["C"]: r for r in records if r["kind"] == "temporal"}
    for r in records:
        B, N, C, heads = r["B"], r["N"], r["C"], r["heads"]
        if r["kind"] == "global":
            plans += attention_plans(_meta((B, N, 3 * C), dtype), heads)
        elif r["kind"] == "global_cls":
            plans += attention_plans(_meta((B, N, 3 * C), dtype), heads, cls=True)
            plans += attention_plans(_meta((B, N, 3 * C), dtype), heads)
        elif r["kind"] == "window":
            side = int(round(N ** 0.5))
            for bias in (False, True):
                plans += attention_plans(_meta((B, N, 3 * C), dtype), heads,
                                         window=(r["window"], side, side), with_bias=bias)
        elif r["kind"] == "spatial":
            # the spatial record holds (batch * T, HW) sequences, its temporal twin T
            frames = temporal[C]["N"]
            seqs = _meta((B // frames, frames, N, 3 * C), dtype)
            plans += attention_plans(seqs, heads)
            plans += attention_plans(seqs.transpose(1, 2), heads)
    return plans


def _extra_attention_plans(dtype) -> list:
    """Every mode at every head_dim on one small shape (B 2, 7x7 grid of 64-channel heads ...)."""
    plans = []
    for head_dim in EXTRA_HEAD_DIMS:
        heads = 4
        C = heads * head_dim
        plans += attention_plans(_meta((2, 49, 3 * C), dtype), heads)
        plans += attention_plans(_meta((2, 50, 3 * C), dtype), heads, cls=True)
        for bias in (False, True):
            plans += attention_plans(_meta((2, 100, 3 * C), dtype), heads, window=(7, 10, 10),
                                     with_bias=bias)
        plans += attention_plans(_meta((2, 4, 49, 3 * C), dtype), heads)
        plans += attention_plans(_meta((2, 4, 49, 3 * C), dtype).transpose(1, 2), heads)
    return plans


def _at_batch(record: dict, batch: int, default_batch: int) -> dict:
    """A shape record of the default batch rescaled to ``batch`` (the leading dim only)."""
    r = dict(record)
    if "shape" in r:
        r["shape"] = [r["shape"][0] // default_batch * batch] + r["shape"][1:]
    if "B" in r:
        r["B"] = r["B"] // default_batch * batch
    return r


def all_plans(dtypes=DTYPES, configs=None, batches=(1, None)) -> list:
    """Every plan the launchers build on the configurations' shapes (batch 1 and each
    configuration's default batch) and on the extras, per dtype."""
    plans = []
    for dtype in dtypes:
        for name in configs or CONFIGS:
            default_batch = CONFIGS[name]["batch"]
            for batch in batches:
                records = [_at_batch(r, batch or default_batch, default_batch)
                           for r in collect_shapes(name)]
                for r in records:
                    if r["op"] == "dwconv":
                        pos = r["kind"] == "pos_embed"
                        plans += depthwise_plans(r["shape"], r["kernel"], pos,
                                                 r["norm"] if pos else None, dtype)
                plans += _attention_cases([r for r in records if r["op"] == "attention"], dtype)
        for kernel in EXTRA_KERNEL_SIZES:
            plans += depthwise_plans((2, 64, 4, 14, 14), kernel, False, None, dtype)
        if configs is None:
            plans += _extra_attention_plans(dtype)
    return plans


def grid_errors(plans) -> list[str]:
    """Plans whose grid CUDA would reject (x < 2^31, y and z <= 65535)."""
    bad = []
    for p in plans:
        grid = tuple(p.grid) + (1,) * (3 - len(p.grid))
        if grid[0] > MAX_GRID_X or max(grid[1:]) > MAX_GRID_YZ or min(grid) < 1:
            bad.append(f"{p.label()} grid {p.grid}")
    return sorted(set(bad))


# ---- Triton: specialisation and compile (the only place that touches Triton's internals) -------

class _DevicePointer:
    """A meta tensor as Triton's binder sees a CUDA tensor: its dtype and an address, 16-byte
    aligned at storage offset 0 (the caching allocator's blocks are 512-byte aligned)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = 512 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


def _jit_function(kernel):
    """The JITFunction of a kernel: under TRITON_INTERPRET=1 (the test suite on a CPU machine)
    ``@triton.jit`` gives an InterpretedFunction, which cannot be compiled; rebuild it."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def triton_specialisation(plan, cc: int):
    """(signature, constexprs, attrs, options) exactly as ``kernel[grid](...)`` computes them for
    the plan's arguments on a device of compute capability ``cc``: Triton's binder and argument
    packer (the same private API in 3.6 and 3.9; a version that changes it fails here, loudly)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(plan.kernel)
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in plan.args]
    kwargs = {**plan.constexprs, **plan.options()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return signature, constexprs, attrs, options


@dataclass(frozen=True)
class TritonJob:
    label: str
    dtype: str
    arch: str
    kernel: str           # "module:name" of the @triton.jit function
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def _plan_dtype(plan) -> str:
    first = next(a for a in plan.args if isinstance(a, torch.Tensor))
    return DTYPE_NAMES[first.dtype]


def _config_key(plan, arch: str) -> tuple:
    """What sets a kernel's code shape: op, constexprs but the head count (address arithmetic
    only), warps, stages, dtype and arch; not the runtime integers' divisibility."""
    constexprs = tuple((k, v) for k, v in plan.constexprs.items() if k != "HEADS")
    return (plan.op, constexprs, plan.num_warps, plan.num_stages, _plan_dtype(plan), arch)


def triton_jobs(plans, scope: str = "full", dtypes=None, archs=None) -> list[TritonJob]:
    """One job per distinct (specialisation, arch) with scope "full"; with scope "configs", one per
    _config_key (the first plan of each class stands for it). The label names op, constexprs and
    warps, and a #n suffix tells apart plans that differ only in runtime specialisation."""
    jobs: dict = {}
    for plan in plans:
        if dtypes and _plan_dtype(plan) not in dtypes:
            continue
        for arch, cc in ARCHS.items():
            if archs and arch not in archs:
                continue
            if scope == "configs":
                key = _config_key(plan, arch)
                if key in jobs:
                    continue
            signature, constexprs, attrs, options = triton_specialisation(plan, cc)
            if scope == "full":
                key = (plan.op, plan.kernel.fn.__qualname__, repr(sorted(signature.items())),
                       repr(sorted(constexprs.items(), key=str)), repr(sorted(attrs.items())),
                       repr(options), arch)
            if key in jobs:
                continue
            jobs[key] = TritonJob(plan.label(), _plan_dtype(plan), arch,
                                  f"{plan.kernel.fn.__module__}:{plan.kernel.fn.__name__}",
                                  signature, constexprs, attrs, dict(options.__dict__))
    # plans equal in label but specialised differently (an integer divisible by 16 or not) get a
    # suffix that says which runtime arguments are specialised
    out, seen = [], {}
    for job in jobs.values():
        n = seen.get((job.label, job.dtype, job.arch), 0)
        seen[(job.label, job.dtype, job.arch)] = n + 1
        out.append(job if n == 0 else replace(job, label=f"{job.label}#{n + 1}"))
    return out


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_triton(job: TritonJob) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = job.kernel.split(":")
    kernel = _jit_function(getattr(importlib.import_module(module), name))
    row = dict(kernel=job.label, source="triton", dtype=job.dtype, arch=job.arch, ok=False,
               regs=None, spills=None, shared_bytes=None, error=None)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(
                ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                target=GPUTarget("cuda", ARCHS[job.arch], 32), options=job.options)
    except Exception as e:  # noqa: BLE001 - any compile failure is a row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return row
    text = log.getvalue()
    regs, spills = _PTXAS_REGS.search(text), _PTXAS_SPILLS.search(text)
    if regs is None or spills is None:
        row["error"] = "no ptxas -v report in the compile log"
        return row
    row.update(ok=True, regs=int(regs.group(1)),
               spills=int(spills.group(1)) + int(spills.group(2)),
               shared_bytes=int(compiled.metadata.shared))
    return row


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # a fresh cache: every kernel runs ptxas
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, without its warning


def compile_triton(jobs, workers: int, partial: Path | None = None) -> list[dict]:
    """Compiles the jobs; each finished row is also appended to ``partial`` (JSON lines), so an
    interrupted run leaves what it found."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-static-triton-") as cache_dir:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                                    initializer=_worker_init,
                                                    initargs=(cache_dir,)) as pool:
            futures = [pool.submit(_compile_triton, job) for job in jobs]
            for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                row = fut.result()
                rows.append(row)
                if partial is not None:
                    with partial.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                status = "ok" if row["ok"] else "FAILED"
                print(f"[gpu-static] triton {i}/{len(jobs)} {status} {row['arch']} {row['dtype']} "
                      f"{row['kernel']} regs={row['regs']} spills={row['spills']} "
                      f"shared={row['shared_bytes']}" + (f" {row['error']}" if row["error"] else ""),
                      flush=True)
    return rows


# ---- CUDA ----------------------------------------------------------------------------------------

_CUDA_DTYPES = {"float": "fp32", "double": "fp64", "__half": "fp16", "c10::Half": "fp16",
                "__nv_bfloat16": "bf16", "c10::BFloat16": "bf16"}


def _demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _short_cuda_name(demangled: str) -> str:
    """``void depthwise_forward_kernel<Size<3, 3, 3>, 4, float, int>(...)`` -> the name and its
    template arguments without the parameter list, anonymous namespaces and spaces."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    name = name.replace("uniformer_kernels::cuda::", "")
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    return name[:end].replace(" ", "")


def _cuda_dtype(short_name: str) -> str:
    args = short_name[short_name.find("<") + 1:].replace(">", ",").split(",")
    for arg in args:
        for key, value in _CUDA_DTYPES.items():
            if arg == key or arg.endswith("::" + key.split("::")[-1]) and key.startswith("c10"):
                return value
    return "-"


def compile_cuda(nvcc: str, archs=tuple(ARCHS)) -> list[dict]:
    rows = []
    sources = sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu"))
    for src in sources:
        for arch in archs:
            cc = ARCHS[arch]
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [nvcc, "-std=c++17", "-Werror", "all-warnings", "-Xptxas", "-v",
                       "-gencode", f"arch=compute_{cc},code=sm_{cc}", "-c", str(src),
                       "-o", os.path.join(tmp, "k.o")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            label = f"{src.name}"
            if proc.returncode != 0:
                rows.append(dict(kernel=label, source="cuda", dtype="-", arch=arch, ok=False,
                                 regs=None, spills=None, shared_bytes=None,
                                 error=(proc.stderr.strip().splitlines() or ["nvcc failed"])[-1][:300]))
                continue
            rows += _parse_ptxas_log(proc.stderr, src.name, arch)
    return rows


def _parse_ptxas_log(log: str, source: str, arch: str) -> list[dict]:
    """Rows from ``ptxas -v``: per function 'Compiling entry function', 'Function properties'
    (stack frame, spill stores / loads) and 'Used N registers, ... N bytes smem'."""
    entries: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = entries.setdefault(m.group(1), {})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = entries.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = _PTXAS_SPILLS.search(line)
        if m:
            current["spills"] = int(m.group(1)) + int(m.group(2))
        m = _PTXAS_REGS.search(line)
        if m:
            current["regs"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared"] = int(smem.group(1)) if smem else 0
    mangled = [k for k, v in entries.items() if "regs" in v]  # entry functions only
    rows = []
    for name, pretty in zip(mangled, _demangle(mangled)):
        info = entries[name]
        short = _short_cuda_name(pretty)
        rows.append(dict(kernel=f"{source}:{short}", source="cuda", dtype=_cuda_dtype(short),
                         arch=arch, ok=True, regs=info["regs"], spills=info.get("spills", 0),
                         shared_bytes=info["shared"], error=None))
    if not rows:
        rows.append(dict(kernel=source, source="cuda", dtype="-", arch=arch, ok=False, regs=None,
                         spills=None, shared_bytes=None, error="no kernel in the ptxas -v report"))
    return rows


# ---- verdict and report --------------------------------------------------------------------------

def row_failures(row: dict) -> list[str]:
    """Why a row fails the check (empty: it passes)."""
    if not row["ok"]:
        return [f"compile failed: {row['error']}"]
    why = []
    if row["shared_bytes"] > SHARED_LIMIT[row["arch"]]:
        why.append(f"shared memory {row['shared_bytes']} B > {SHARED_LIMIT[row['arch']]} B")
    if row["spills"] and row["dtype"] != "fp64":
        why.append(f"{row['spills']} bytes of register spills")
    return why


def versions(nvcc: str | None) -> dict:
    import triton
    out = {"triton": triton.__version__, "torch": torch.__version__,
           "python": platform.python_version()}
    if nvcc:
        try:
            text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            out["nvcc"] = re.search(r"release ([\d.]+)", text).group(1)
        except (OSError, AttributeError):
            out["nvcc"] = "unknown"
    return out


def row_key(row: dict) -> str:
    """How a row is named in a known-spills file: kernel | dtype | arch."""
    return f"{row['kernel']} | {row['dtype']} | {row['arch']}"


def read_known_spills(path: str | None) -> set[str]:
    """The rows whose spills are known defects (one row_key per line, '#' comments): they are
    reported as open, not failed, so CI stops any new spill while these are fixed. Only spills
    can be listed; a compile failure or a shared-memory overflow always fails."""
    if path is None:
        return set()
    lines = Path(path).read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def to_markdown(rows: list[dict], meta: dict, known: set[str]) -> str:
    lines = [f"# GPU static check (ahead-of-time compile, no GPU): triton {meta['triton']}"
             + (f", nvcc {meta['nvcc']}" if "nvcc" in meta else ""), "",
             f"Command: `{meta['command']}` (torch {meta['torch']}, Python {meta['python']}). "
             f"{meta['summary']}", "",
             "| kernel | source | dtype | arch | ok | regs | spills | shared bytes | error |",
             "|---|---|---|---|---|--:|--:|--:|---|"]
    for r in rows:
        lines.append(f"| `{r['kernel']}` | {r['source']} | {r['dtype']} | {r['arch']} | "
                     f"{_verdict(r, known)} | {r['regs']} | "
                     f"{r['spills']} | {r['shared_bytes']} | {r['error'] or ''} |")
    return "\n".join(lines) + "\n"


def _verdict(row: dict, known: set[str]) -> str:
    why = row_failures(row)
    if not why:
        return "yes"
    return "NO (known spill, open)" if _is_known_spill(row, known) else "NO"


def _is_known_spill(row: dict, known: set[str]) -> bool:
    why = row_failures(row)
    return bool(why) and row_key(row) in known and all("spills" in w for w in why)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write {'rows': [...]} here")
    ap.add_argument("--md", help="also write the markdown table here")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc rows")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "/usr/local/cuda-13.0/bin/nvcc"))
    ap.add_argument("--scope", choices=("full", "configs"), default="full",
                    help="full: every distinct specialisation (runtime integer divisibility and "
                         "head counts included); configs: one per kernel configuration")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16,fp64", help="comma-separated subset")
    ap.add_argument("--archs", default="sm_80,sm_90", help="comma-separated subset")
    ap.add_argument("--known-spills", help="file of rows (kernel | dtype | arch) whose spills are "
                                           "known open defects: reported, not failed")
    args = ap.parse_args(argv)
    known = read_known_spills(args.known_spills)
    start = time.monotonic()

    plans = all_plans()
    grid_bad = grid_errors(plans)
    archs = args.archs.split(",")
    jobs = triton_jobs(plans, args.scope, args.dtypes.split(","), archs)
    print(f"[gpu-static] {len(plans)} launch plans -> {len(jobs)} Triton compiles "
          f"(scope {args.scope}, dtypes {args.dtypes}, archs {args.archs})", flush=True)
    partial = Path(args.json + ".partial")
    partial.unlink(missing_ok=True)
    rows = compile_triton(jobs, args.jobs, partial)
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["arch"]))
    nvcc = None if args.no_cuda else args.nvcc
    if nvcc:
        if shutil.which(nvcc) is None:
            print(f"[gpu-static] ERROR: nvcc not found at {nvcc} (use --nvcc or --no-cuda)")
            return 1
        cuda_start = time.monotonic()
        cuda_rows = compile_cuda(nvcc, archs)
        print(f"[gpu-static] cuda: {len(cuda_rows)} kernel x arch rows in "
              f"{time.monotonic() - cuda_start:.0f} s", flush=True)
        rows += sorted(cuda_rows, key=lambda r: (r["kernel"], r["arch"]))

    failures = [(r, why) for r in rows if not _is_known_spill(r, known) for why in row_failures(r)]
    open_spills = [r for r in rows if _is_known_spill(r, known)]
    # listed rows this run compiled without a spill (rows outside its scope say nothing)
    fixed = sorted(({row_key(r) for r in rows} & known) - {row_key(r) for r in open_spills})
    elapsed = time.monotonic() - start
    summary = (f"{len(rows)} rows ({sum(r['source'] == 'triton' for r in rows)} Triton from "
               f"{len(plans)} launch plans, {sum(r['source'] == 'cuda' for r in rows)} CUDA); "
               f"{len(failures) + len(grid_bad)} failures, {len(open_spills)} known spills "
               f"still open; {elapsed:.0f} s with {args.jobs} "
               f"processes.")
    meta = versions(nvcc) | {"command": "python -m bench.gpu_static " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])), "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "grid_errors": grid_bad, "rows": rows},
                                          indent=1) + "\n")
    partial.unlink(missing_ok=True)
    table = to_markdown(rows, meta, known)
    if args.md:
        Path(args.md).write_text(table)
    print(table)
    for r, why in failures:
        print(f"[gpu-static] FAIL {r['kernel']} {r['dtype']} {r['arch']}: {why}")
    for r in open_spills:
        print(f"[gpu-static] KNOWN SPILL (open) {row_key(r)}: {r['spills']} bytes")
    for key in fixed:
        print(f"[gpu-static] listed in {args.known_spills} but not spilling under this "
              f"compiler (remove it once no version spills): {key}")
    for g in grid_bad:
        print(f"[gpu-static] FAIL grid over CUDA's limits: {g}")
    print(f"[gpu-static] {summary}")
    return 1 if failures or grid_bad else 0


if __name__ == "__main__":
    sys.exit(main())
