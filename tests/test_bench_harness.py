"""The bench harness: shapes come from the models, the writer produces honest tables and plots."""
import json

import pytest
import torch

from bench.harness import count_flops, time_callable
from bench.results import collect_env, write_results
from bench.shapes import collect_shapes


def test_shapes_of_uniformer_small_come_from_the_model():
    rows = collect_shapes("S-224", batch=8)
    attention = {(r["N"], r["C"], r["heads"], r["head_dim"]): r["count"]
                 for r in rows if r["op"] == "attention"}
    assert attention == {(196, 320, 5, 64): 8, (49, 512, 8, 64): 3}  # depths 8 and 3
    local = [r for r in rows if r["op"] == "dwconv" and r["kind"] == "local"]
    assert [(r["shape"], r["kernel"], r["count"]) for r in local] == [
        ([8, 64, 56, 56], [5, 5], 3), ([8, 128, 28, 28], [5, 5], 4)]


def test_window_and_split_shapes():
    hybrid = collect_shapes("dense-S-hybrid-512", batch=1)
    kinds = {(r["kind"], r["N"]) for r in hybrid if r["op"] == "attention"}
    assert ("window", 196) in kinds and ("global", 1024) in kinds  # 32x32 grid, 14x14 windows
    split = collect_shapes("video-S-split-8x224", batch=1)
    kinds = {(r["kind"], r["N"]) for r in split if r["op"] == "attention"}
    assert ("temporal", 4) in kinds and ("spatial", 196) in kinds  # T = 8 / 2 after the stem


def test_depthwise_flops_count_groups():
    conv = torch.nn.Conv2d(64, 64, 5, padding=2, groups=64)
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    fwd = count_flops(lambda: conv(x))
    assert fwd == 2 * 64 * 25 * 16 * 16
    total = count_flops(lambda: conv(x).sum().backward())
    assert total == 3 * fwd  # dx and dw cost what the forward costs; torch's counter says ~33x


def test_writer_tables_ratios_and_plot(tmp_path):
    env = collect_env("cpu", torch.float32)
    rows = [dict(case="toy", shape=[1, 2], mode="fwd", impl=impl, median_ms=ms, p20_ms=ms,
                 p80_ms=ms, flops=1e8, roofline_ms=1.0, dtype="float32", batch=1)
            for impl, ms in (("eager", 8.0), ("compile", 4.0))]
    path = write_results("toy", rows, env, tmp_path)
    data = json.loads(path.read_text())
    assert [r["impl"] for r in data["rows"]] == ["eager", "compile"]
    md = path.with_suffix(".md").read_text()
    # eager 8 ms, compile 4 ms: 2x; roofline 1 ms is 25 % of the fastest
    assert "| toy | 1x2 | fwd | float32 | 1 | 0.10 | 8.00 | 4.00 | 2.00 | 1.00 | 25 | compile |" in md
    png = path.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_time_callable_outside_pytest_benchmark():
    calls = []
    timing = time_callable(lambda: calls.append(1), device="cpu", warmup=2, budget_s=0.05)
    assert timing.rounds >= 1 and timing.median_ms >= 0
    assert len(calls) >= timing.rounds + 2
    with pytest.raises(Exception):
        time_callable(lambda: 1 / 0, device="cpu", warmup=1, budget_s=0.01)
