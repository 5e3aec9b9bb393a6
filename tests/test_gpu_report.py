"""bench/gpu_report.py: the GPU run's packed files and compact table say what the rows say."""
import json

import pytest

from bench import gpu_report


def _row(case, mode, impl, ms, roof=None, **extra):
    return dict(bench=extra.pop("bench", "attention"), case=case, shape=None, mode=mode,
                impl=impl, dtype="bf16", batch=64, median_ms=ms, roofline_ms=roof,
                run_id="run-a", **extra)


def _bench_json(bench, rows):
    env = {"run_id": "run-a", "device": "NVIDIA H200", "device_slug": "nvidia-h200",
           "peaks": {"gemm_dtype": "bfloat16", "gemm_gflops": 780e3, "copy_gbs": 4300.0}}
    return {"bench": bench, "device_slug": "nvidia-h200", "runs": {"run-a": env}, "rows": rows}


def _table_line(table, case):
    return next(line for line in table.splitlines() if line.startswith(f"| {case} |"))


def test_ratios_roofline_shares_and_fastest_sdpa():
    rows = [_row("S", "fwd", "eager", 4.0, 1.0), _row("S", "fwd", "compile", 2.0, 1.0),
            _row("S", "fwd", "sdpa_flash", 3.0, 1.0), _row("S", "fwd", "sdpa_math", 6.0, 1.0),
            _row("S", "fwd", "sdpa_cudnn", None, 1.0, error="RuntimeError: no kernel"),
            _row("S", "fwd", "ours_triton", 1.25, 1.0)]
    table = gpu_report.compact_table({"nvidia-h200/attention": _bench_json("attention", rows)})
    cells = [c.strip() for c in _table_line(table, "S").strip("|").split("|")]
    # case mode dtype ours ms roof | x eager, eager roof | x sdpa (fastest: flash), roof | x compile
    assert cells == ["S", "fwd", "bf16", "ours_triton", "1.25", "80%", "3.20", "25%", "2.40", "33%",
                     "1.60", "50%"]


def test_failed_ours_and_failed_baseline_are_marked_not_dropped():
    rows = [_row("X", "fwd+bwd", "eager_nchw", 2.0, bench="depthwise"),
            _row("X", "fwd+bwd", "eager_cl", None, bench="depthwise", error="OOM"),
            _row("X", "fwd+bwd", "ours_cuda", None, bench="depthwise", error="CUDA error")]
    table = gpu_report.compact_table({"nvidia-h200/depthwise": _bench_json("depthwise", rows)})
    cells = [c.strip() for c in _table_line(table, "X").strip("|").split("|")]
    assert cells[3] == "FAIL" and cells[8] == "fail"  # ours, then eager_cl's ratio column


def test_accelerate_peak_memory_ratio():
    rows = [_row("S-bs64", "fwd+bwd", "eager", 100.0, 50.0, bench="accelerate", peak_mib=2000.0),
            _row("S-bs64", "fwd+bwd", "ours", 50.0, 50.0, bench="accelerate", peak_mib=1200.0)]
    table = gpu_report.compact_table({"nvidia-h200/accelerate": _bench_json("accelerate", rows)})
    assert _table_line(table, "S-bs64").rstrip(" |").endswith("1200/2000=0.60")


def test_pack_writes_the_promised_files_and_unpack_refuses_a_dry_run(tmp_path):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    (scratch / "nvidia-h200").mkdir(parents=True)
    out.mkdir()
    rows = [_row("S", "fwd", "eager", 4.0, 1.0), _row("S", "fwd", "ours_triton", 2.0, 1.0)]
    (scratch / "nvidia-h200" / "attention.json").write_text(json.dumps(_bench_json("attention", rows)))
    gpu_report.pack(scratch, out, png=False, dry_run=True)
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    packed = json.loads((out / "results.json").read_text())
    assert packed["dry_run"] and packed["benches"]["nvidia-h200/attention"]["rows"] == rows
    assert gpu_report.DRY_RUN_NOTE in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="dry run"):
        gpu_report.unpack(out / "results.json", tmp_path / "committed")


def test_unpack_restores_each_bench(tmp_path):
    rows = [_row("S", "fwd", "eager", 4.0, 1.0), _row("S", "fwd", "ours_triton", 2.0, 1.0)]
    packed = tmp_path / "results.json"
    packed.write_text(json.dumps({"dry_run": False, "note": "GPU run", "benches": {
        "nvidia-h200/attention": _bench_json("attention", rows)}}))
    written = gpu_report.unpack(packed, tmp_path / "committed")
    assert written == [tmp_path / "committed" / "nvidia-h200" / "attention.json"]
    data = json.loads(written[0].read_text())
    assert [(r["impl"], r["median_ms"]) for r in data["rows"]] == [("eager", 4.0), ("ours_triton", 2.0)]
    assert (tmp_path / "committed" / "nvidia-h200" / "attention.md").exists()
