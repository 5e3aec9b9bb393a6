"""The bench harness: shapes come from the models, the writer produces honest tables and plots,
results name their host and never mix hosts, noisy timings are marked, progress lines count down."""
import datetime as dt
import json

import pytest
import torch

from bench import gpu_report, main, progress, results
from bench.harness import Timing, contention, count_flops, noise_reasons, time_callable
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
    assert "| toy | 1x2 | fwd | float32 | 1 | 0.10 | 8.00 | 4.00 | 2.00 | 1.00 | 25 | compile |  |" in md
    png = path.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_time_callable_outside_pytest_benchmark():
    calls = []
    timing = time_callable(lambda: calls.append(1), device="cpu", warmup=2, budget_s=0.05)
    assert timing.rounds >= 1 and timing.median_ms >= 0
    assert len(calls) >= timing.rounds + 2
    with pytest.raises(Exception):
        time_callable(lambda: 1 / 0, device="cpu", warmup=1, budget_s=0.01)


# ---- hosts: slugs, run folders, no merging across hosts ----------------------------------------

def test_host_slug_names_model_isa_and_threads():
    cpu = dict(kind="cpu", name="AMD EPYC", isa="avx2", threads=2)
    assert results.slug_of(cpu) == "cpu-amd-epyc-avx2-2t"
    xeon = dict(kind="cpu", name="Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz", isa="avx512-amx",
                threads=56)
    assert results.slug_of(xeon) == "cpu-intel-xeon-platinum-8480-avx512-amx-56t"
    assert results.slug_of(dict(kind="cuda", name="NVIDIA H100 80GB HBM3")) == "nvidia-h100"
    assert results.cpu_isa({"sse2", "avx", "avx2", "avx512f", "amx_tile"}) == "avx512-amx"
    assert results.cpu_isa({"sse2", "avx", "avx2", "fma"}) == "avx2"
    assert results.cpu_isa({"sse2", "sse4_2"}) == "sse"
    label = results.host_label(dict(cpu, ids={"cpu family": "25", "model": "1"}, logical_cpus=2))
    assert label == "AMD EPYC (family 25 model 1), avx2, 2 threads of 2 logical CPUs"


def test_run_folder_is_fresh_and_named_by_host_and_time(tmp_path):
    when = dt.datetime(2026, 12, 7, 17, 5, 9, tzinfo=dt.timezone.utc)
    assert results.run_dir_name("cpu-amd-epyc-avx2-2t", when) == "cpu-amd-epyc-avx2-2t-20261207-170509"
    assert results.run_dir_name("nvidia-h100", when, tag="quick") == "nvidia-h100-20261207-170509-quick"
    first = results.new_run_dir("cpu-x-avx2-2t", root=tmp_path)
    second = results.new_run_dir("cpu-x-avx2-2t", root=tmp_path)  # same second: another folder
    assert first.is_dir() and second.is_dir() and first != second
    assert first.parent == second.parent == tmp_path and first.name.startswith("cpu-x-avx2-2t-")


def _env(run_id, isa="avx2", threads=2, name="AMD EPYC"):
    host = dict(kind="cpu", name=name, isa=isa, threads=threads, ids={"cpu family": "25"},
                logical_cpus=2)
    return dict(run_id=run_id, device=name, device_slug=results.slug_of(host), host=host,
                threads=threads)


def _row(impl, ms, **kw):
    return dict(case="toy", shape=[1], mode="fwd", impl=impl, median_ms=ms, p20_ms=ms, p80_ms=ms,
                dtype="fp32", batch=1, **kw)


def test_rows_of_another_host_are_never_merged(tmp_path):
    path = write_results("toy", [_row("eager", 8.0)], _env("run-a"), out_dir=tmp_path, png=False)
    before = path.read_text()
    for other in (_env("run-b", isa="avx512"), _env("run-c", threads=1),
                  _env("run-d", name="Intel Xeon")):
        with pytest.raises(results.HostMismatch, match="never merged"):
            write_results("toy", [_row("compile", 4.0)], other, out_dir=tmp_path, png=False)
    assert path.read_text() == before
    # the same host may add rows (a later run of the same machine)
    write_results("toy", [_row("compile", 4.0)], _env("run-e"), out_dir=tmp_path, png=False)
    data = json.loads(path.read_text())
    assert sorted(data["runs"]) == ["run-a", "run-e"]
    # a file from before hosts were recorded only takes rows of the same device and threads
    legacy = {"bench": "toy", "device_slug": "cpu-amd-epyc-2t", "rows": [],
              "runs": {"old": {"run_id": "old", "device": "AMD EPYC", "threads": 2}}}
    with pytest.raises(results.HostMismatch):
        results.check_same_host(legacy, _env("run-f"))


# ---- noise: load probe arithmetic, marking, ratios ---------------------------------------------

def test_contention_counts_only_what_takes_our_cpus():
    quiet = contention(wall_s=1.0, self_cpu_s=2.0, busy_s=2.0, steal_s=0.0, cpus=2, threads=2)
    assert quiet == 0.0
    # another process kept one of two cores busy: half of what our 2 threads needed
    assert contention(wall_s=1.0, self_cpu_s=2.0, busy_s=3.0, steal_s=0.0, cpus=2,
                      threads=2) == pytest.approx(0.5)
    # on 16 cores with 2 threads, one busy core elsewhere takes nothing from us
    assert contention(wall_s=1.0, self_cpu_s=2.0, busy_s=3.0, steal_s=0.0, cpus=16,
                      threads=2) == 0.0
    # time stolen by the hypervisor counts
    assert contention(wall_s=2.0, self_cpu_s=3.6, busy_s=3.6, steal_s=0.4, cpus=2,
                      threads=2) == pytest.approx(0.1)


def test_noise_reasons_load_and_spread():
    clean = Timing(median_ms=100.0, p20_ms=97.0, p80_ms=104.0, rounds=9)
    assert noise_reasons(clean, {"contention": 0.02}) == []
    assert noise_reasons(clean, {}) == []  # no /proc/stat: only the spread can tell
    assert noise_reasons(clean, {"contention": 0.35}) == ["load 35 %"]
    wide = Timing(median_ms=100.0, p20_ms=90.0, p80_ms=125.0, rounds=9)
    assert noise_reasons(wide, {"contention": 0.5}) == ["load 50 %", "spread 35 %"]


def test_noisy_rows_have_no_clean_ratio(tmp_path):
    rows = [_row("eager", 8.0), _row("compile", 4.0, noisy=True, noise="load 40 %")]
    path = write_results("toy", rows, _env("run-a"), out_dir=tmp_path, png=False)
    md = path.with_suffix(".md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| toy "))
    assert "~2.00" in line and line.rstrip().endswith("| compile (load 40 %) |")
    assert results.ratio_text(_row("eager", 8.0), _row("ours", 4.0)) == "2.00"
    table = gpu_report.compact_table({"x/accelerate": {
        "bench": "accelerate", "rows": [_row("eager", 9.0), _row("ours", 3.0, noisy=True),
                                        _row("compile", 6.0)]}})
    assert "| toy | fwd | fp32 | ours | 3.00 | - | ~3.00 | - | ~2.00 | - |" in table


# ---- progress: count and time left ---------------------------------------------------------------

def test_progress_line_and_time_left():
    eta = progress.Eta()
    compile_fwd, eager_fwd = progress.case_kind("compile", "fwd"), progress.case_kind("eager", "fwd")
    assert eta.remaining([eager_fwd]) is None  # nothing learnt yet
    eta.add(compile_fwd, 60.0)
    eta.add(eager_fwd, 4.0)
    eta.add(eager_fwd, 6.0)
    bwd = progress.case_kind("ours", "fwd+bwd")  # not seen: the mean of all cases so far
    assert eta.remaining([compile_fwd, eager_fwd, bwd]) == pytest.approx(60 + 5 + 70 / 3)
    assert progress.format_left(None) == "" and progress.format_left(0) == ""
    assert progress.format_left(42.4) == "~42 s left"
    assert progress.format_left(430) == "~7 min left"
    assert progress.line(3, 24, "S fwd eager: 157 ms", 65) == "[3/24] S fwd eager: 157 ms  ~65 s left"
    assert progress.line(24, 24, "last", 0.0) == "[24/24] last"
    assert progress.line(1, 24, "first", None) == "[1/24] first"


def test_main_plan_modes(tmp_path):
    default = main.plan("default", tmp_path, [])
    bench = default["bench"]
    assert "--main" in bench and "--quick" not in bench and "--benchmark-quiet" in bench
    assert [a for a in bench if a.startswith("bench/")] == [
        "bench/bench_accelerate.py", "bench/bench_depthwise.py", "bench/bench_attention.py"]
    assert bench[bench.index("--run-dir") + 1] == str(tmp_path)
    assert default["parity"][default["parity"].index("--models") + 1] == main.PARITY_CASES
    quick = main.plan("quick", tmp_path, ["--threads", "1"])
    assert "--quick" in quick["bench"] and "--quick" in quick["parity"]
    assert quick["bench"][-2:] == ["--threads", "1"]
    full = main.plan("full", tmp_path, [])
    assert "--main" not in full["bench"] and "bench/bench_models.py" in full["bench"]
    assert "--models" not in full["parity"]


def test_cpu_targets_rows_and_verdicts(tmp_path):
    """bench.cpu_targets: every op row has both timings, its ratio against/ours and a verdict; the
    roofline row reads as a share and a row without a target says why."""
    from bench import cpu_targets

    out = tmp_path / "targets.md"
    assert cpu_targets.main(["--skip-models", "--rounds", "1", "--md", str(out)]) == 0
    text = out.read_text()
    assert "cpu kernels" in text and "thread(s)" in text  # the host it ran on
    op_rows = [line for line in text.splitlines() if line.startswith("| depthwise") or
               line.startswith("| pos_embed_norm")]
    assert len(op_rows) == 6
    for line in op_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        ours, theirs, ratio = float(cells[2]), float(cells[3]), float(cells[4].rstrip("x"))
        assert ours > 0 and theirs > 0
        # the table rounds: ms to 0.01, the ratio to 0.01
        assert (theirs - 0.005) / (ours + 0.005) - 0.005 <= ratio <= (theirs + 0.005) / (ours - 0.005) + 0.005
        assert cells[6] == ("yes" if ratio >= float(cells[5].rstrip("x")) else "no")
    share = cpu_targets.row("m", "roofline", {"ours": 2.0, "theirs": 1.5}, 0.9, share=True)
    none = cpu_targets.row("m", "fp32", {"ours": 2.0, "theirs": 1.0}, None, note="n/a: why")
    table = cpu_targets.render([share, none], "# t")
    assert "| 75% | 90% | no |" in table and "| 0.50x | - | n/a: why |" in table
