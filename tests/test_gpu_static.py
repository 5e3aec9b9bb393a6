"""bench/gpu_static.py, the ahead-of-time compile check, without compiling everything: the launchers
launch exactly the plans the check enumerates, a bad row fails, one small real compile reports
registers. Needs Triton (not a GPU)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the AOT check compiles Triton kernels")

from bench import gpu_static  # noqa: E402
from uniformer_kernels.triton import _plan  # noqa: E402
from uniformer_kernels.triton import attention as at  # noqa: E402
from uniformer_kernels.triton import depthwise as dw  # noqa: E402


@pytest.fixture
def launched(monkeypatch):
    """The plans the launchers launch (LaunchPlan.launch recorded, not run)."""
    plans = []
    monkeypatch.setattr(_plan.LaunchPlan, "launch", lambda self: plans.append(self))
    return plans


def _keys(plans):
    return {gpu_static._config_key(p, "sm_90") for p in plans}


def test_depthwise_launches_are_enumerated(launched):
    # the S-224 stage-1 shapes at batch 1: a 3x3 pos_embed (residual) and a 5x5 local conv
    records = [r for r in gpu_static.collect_shapes("S-224", 1, op="dwconv")
               if r["shape"][1] == 64]
    enumerated = []
    for r in records:
        n, c, h, w = r["shape"]
        k = [1] + r["kernel"]
        for dtype in (torch.float32, torch.bfloat16):
            acc = torch.float32
            x = torch.empty((n, 1, h, w, c), dtype=dtype, device="meta")
            weight = torch.empty((*k, c), dtype=acc, device="meta")
            bias = torch.empty((c,), dtype=acc, device="meta")
            dw.depthwise_conv_forward(x, weight, bias, r["residual"])
            dw.depthwise_conv_forward(x, weight, None, r["residual"])  # dx
            dw.depthwise_conv_backward_weight(x, x, k, True)
            dw.depthwise_conv_backward_weight(x, x, k, False)
            enumerated += gpu_static.depthwise_plans(r["shape"], r["kernel"], r["residual"],
                                                     None, dtype)
    assert launched
    missing = {gpu_static._config_key(p, "sm_90") for p in launched
               if p.op == "depthwise.fwd"} - {
        gpu_static._config_key(dataclasses.replace(p, op="depthwise.fwd"), "sm_90")
        for p in enumerated}
    assert not missing
    assert not ({_k for _k in _keys(launched) if _k[0] == "depthwise.dw"} - _keys(enumerated))


def test_attention_launches_are_enumerated(launched):
    for dtype in (torch.float32, torch.float16):
        qkv = torch.empty((2, 197, 3 * 224), dtype=dtype, device="meta")
        plans = gpu_static.attention_plans(qkv, 8, cls=True)
        out = torch.empty((2, 197, 224), dtype=dtype, device="meta")
        lse = torch.empty((2, 8, 197), dtype=torch.float32, device="meta")
        cls_probs = torch.empty_like(lse)
        at.attention_forward(qkv, None, out, lse, cls_probs, num_heads=8, scale=0.1, window=None)
        at.attention_backward(out, cls_probs, qkv, None, out, lse, cls_probs,
                              torch.empty_like(qkv), None, num_heads=8, scale=0.1, window=None)
        assert _keys(plans) == _keys(launched[-3:])
    # the full enumeration holds the models' head_dim 28 class-row attention in every dtype
    labels = {p.label() for p in gpu_static._extra_attention_plans(torch.bfloat16)}
    assert any("HEAD_DIM=28" in label and "RETURN_CLS=True" in label for label in labels)


def test_specialisation_mirrors_the_runtime():
    x = torch.empty((1, 1, 14, 14, 64), dtype=torch.float16, device="meta")
    weight = torch.empty((1, 3, 3, 64), dtype=torch.float32, device="meta")
    plan = dw.forward_plan(x, weight, None, torch.empty_like(x), True)
    signature, constexprs, attrs, _ = gpu_static.triton_specialisation(plan, 90)
    assert signature["x_ptr"] == "*fp16" and signature["w_ptr"] == "*fp32"
    assert constexprs[(4,)] == 1  # D = 1: the JIT specialises value-1 integers as constants
    assert attrs[(0,)] == [["tt.divisibility", 16]]  # an aligned pointer
    # a view 4 bytes into its storage is not 16-byte aligned: no divisibility attribute
    shifted = torch.empty(14 * 14 * 64 + 2, dtype=torch.float16, device="meta")[2:]
    plan = dataclasses.replace(plan, args=(shifted.view(x.shape),) + plan.args[1:])
    _, _, attrs, _ = gpu_static.triton_specialisation(plan, 90)
    assert attrs[(0,)] == []


def test_bad_rows_fail():
    good = dict(kernel="k", source="triton", dtype="bf16", arch="sm_80", ok=True, regs=100,
                spills=0, shared_bytes=1024, error=None)
    assert gpu_static.row_failures(good) == []
    assert gpu_static.row_failures(good | {"spills": 8})
    assert gpu_static.row_failures(good | {"shared_bytes": 163 * 1024 + 1})
    assert gpu_static.row_failures(good | {"ok": False, "error": "boom"})
    assert gpu_static.row_failures(good | {"dtype": "fp64", "spills": 8}) == []  # reported only
    bad_grid = _plan.LaunchPlan("x.fwd", dw._forward_kernel, (1, 70000), ())
    assert gpu_static.grid_errors([bad_grid])


def test_only_listed_spills_are_waived(tmp_path):
    """A spill listed in the known-spills file is reported as open; the same row with a compile
    failure or a shared-memory overflow, or an unlisted spill, still fails."""
    spill = dict(kernel="k", source="triton", dtype="bf16", arch="sm_80", ok=True, regs=100,
                 spills=8, shared_bytes=1024, error=None)
    listed = tmp_path / "known.txt"
    listed.write_text("# comment\n" + gpu_static.row_key(spill) + "\n")
    known = gpu_static.read_known_spills(str(listed))
    assert known == {"k | bf16 | sm_80"}
    assert gpu_static._is_known_spill(spill, known)
    assert not gpu_static._is_known_spill(spill | {"arch": "sm_90"}, known)
    assert not gpu_static._is_known_spill(spill | {"ok": False, "error": "boom"}, known)
    assert not gpu_static._is_known_spill(spill | {"shared_bytes": 10**6}, known)
    assert not gpu_static._is_known_spill(spill | {"spills": 0}, known)  # passes: nothing to waive


# The real compiles run in a child without TRITON_INTERPRET (which conftest sets on a CPU machine,
# and under which @triton.jit kernels cannot be compiled).
_COMPILE = """
import dataclasses, json, sys, tempfile, torch
from bench import gpu_static
from uniformer_kernels.triton import depthwise as dw
gpu_static._worker_init(tempfile.mkdtemp())
x = torch.empty((1, 1, 8, 8, 16), dtype=torch.bfloat16, device="meta")
weight = torch.empty((1, 3, 3, 16), dtype=torch.float32, device="meta")
plan = dw.forward_plan(x, weight, None, torch.empty_like(x), False)
if sys.argv[1] == "bad":  # BLOCK_C must be a power of two: the compiler rejects 24
    plan = dataclasses.replace(plan, constexprs=plan.constexprs | {"BLOCK_C": 24})
job, = gpu_static.triton_jobs([plan], archs=["sm_90"])
print(json.dumps(gpu_static._compile_triton(job)))
"""


def _compile_in_child(which: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, which], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parent.parent,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_bad_plan_is_reported():
    row = _compile_in_child("bad")
    assert not row["ok"] and row["error"] and gpu_static.row_failures(row)


def test_one_real_compile():
    row = _compile_in_child("good")
    assert row["ok"], row["error"]
    assert 0 < row["regs"] <= 255 and row["spills"] == 0 and row["shared_bytes"] >= 0
    assert gpu_static.row_failures(row) == []


def test_cuda_ptxas_log_parsing():
    log = """ptxas info    : Compiling entry function '_Z3fooIfEvPT_' for 'sm_80'
ptxas info    : Function properties for _Z3fooIfEvPT_
    0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 364 bytes cmem[0]
"""
    row, = gpu_static._parse_ptxas_log(log, "x.cu", "sm_80")
    assert row["kernel"] == "x.cu:foo<float>" and row["dtype"] == "fp32"
    assert (row["regs"], row["spills"], row["shared_bytes"]) == (40, 8, 2048)
    assert gpu_static.row_failures(row)
