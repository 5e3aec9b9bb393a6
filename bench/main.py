"""The main job (``make main``): environment, parity summary, headline benchmark, compact table.

    python -m bench.main                    # default: 8 min on 2 quiet CPU cores (cold cache)
    python -m bench.main --quick            # smoke run: small inputs, one model
    python -m bench.main --full             # everything: parity of every variant, uk.accelerate
                                            # on every case with ours+compile, every variant
                                            # eager vs torch.compile (about an hour on 2 cores)
    python -m bench.main --results-dir bench/results   # write into bench/results/<host-slug>/
                                                       # (to commit them); default: a fresh
                                                       # bench/results/runs/<host-slug>-<time>/
Other arguments go to the benchmarks' pytest (e.g. ``--budget 2``, ``--threads 1``).

Default plan: parity of UniFormer-S, XXS, video S and the dense S hybrid backbone (float32 vs
float64, reference and ``uk.accelerate``, at 64 px, 2x64 px video, dense 128 px); then one pytest
session: ``uk.accelerate`` vs eager and ``torch.compile`` on those four models, inference and a
training step (compile's training step on S only; CPU: batch 1, 224 / 8x224 / 512; GPU: batch 64,
64, 8, 8), and a short op summary (two depthwise convs and two attention shapes, eager baselines vs
ours). Each case prints one line as it finishes, with the count and the time left; at the end one
compact table (ratios, % of roofline, peak memory), the plot, and where the files are.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARITY_CASES = "uniformer_small,uniformer_xxs,uniformer_small_video,dense_small_hybrid"
MAIN_BENCHES = ("bench_accelerate.py", "bench_depthwise.py", "bench_attention.py")
FULL_BENCHES = ("bench_accelerate.py", "bench_models.py")


def plan(mode: str, out_dir: Path, extra: list[str]) -> dict[str, list[str]]:
    """The commands of each step (argv after ``python``), for ``mode`` default | quick | full."""
    parity = ["-m", "bench.parity", "--run-dir", str(out_dir)]
    if mode == "quick":
        parity.append("--quick")
    elif mode == "default":  # the four headline models at small sizes (numerics, not scale)
        parity += ["--models", PARITY_CASES, "--img-size", "64", "--dense-size", "128",
                   "--frames", "2"]
    files = FULL_BENCHES if mode == "full" else MAIN_BENCHES
    bench = ["-m", "pytest", *(f"bench/{f}" for f in files), "-s", "-q", "-p", "no:cacheprovider",
             "--run-dir", str(out_dir),
             # pytest-benchmark: its per-round statistics to JSON, not a 200-column terminal table
             "--benchmark-quiet", "--benchmark-json", str(out_dir / "pytest-benchmark.json")]
    if mode != "full":
        bench.append("--main")
    if mode == "quick":
        bench.append("--quick")
    return {"environment": ["-m", "uniformer_kernels"], "parity": parity, "bench": bench + extra}


def _step(title: str, start: float) -> None:
    print(f"\n==== {title} ({time.perf_counter() - start:.0f} s) ====", flush=True)


def parity_summary(out_dir: Path) -> str:
    path = out_dir / "parity.json"
    if not path.exists():
        return "parity: no results"
    data = json.loads(path.read_text())
    rows = data.get("models", [])
    worst = max((v for r in rows for k, v in r.items() if k.startswith("ours_")), default=None)
    ok = all(r.get("ok") for r in rows)
    tol = rows[0]["tolerance"] if rows else None
    return (f"parity: {len(rows)} models, uk.accelerate's float32 error at most {worst:.1e} "
            f"(contract {tol:.0e}): {'ok' if ok else 'ABOVE TOLERANCE'}" if rows else
            "parity: no models")


def summarize(out_dir: Path) -> tuple[str, int]:
    """The compact table of every bench in ``out_dir``, the plot, and the count of noisy rows."""
    from bench import gpu_report, results

    benches = gpu_report._load_benches(out_dir)
    hosts = {results.host_label(env.get("host")) for d in benches.values()
             for env in (d.get("runs") or {}).values()}
    noisy = sum(bool(r.get("noisy")) for d in benches.values() for r in d.get("rows", []))
    text = "\n".join([f"measured on: {'; '.join(sorted(hosts)) or 'unknown'}",
                      gpu_report.peaks_line(benches), parity_summary(out_dir), "",
                      gpu_report.compact_table(benches)])
    if noisy:
        text += (f"\n\n{noisy} noisy row(s): measured twice under load or with a wide p20-p80 "
                 f"spread; their ratios carry a `~` and are not clean numbers.")
    (out_dir / "summary.md").write_text(f"# make main — {out_dir.name}\n\n{text}\n")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            gpu_report._plots(benches, Path(tmp), out_dir / "summary.png")
        except Exception as exc:  # no matplotlib: the tables stand
            text += f"\n(no plot: {type(exc).__name__}: {exc})"
    return text, noisy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke run")
    g.add_argument("--full", action="store_true", help="the whole suite (about an hour on 2 cores)")
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="results root: files go to <dir>/<host-slug>/ (e.g. bench/results, to "
                         "commit); default: a fresh bench/results/runs/<host-slug>-<time>/")
    args, extra = ap.parse_known_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    start = time.perf_counter()
    os.chdir(ROOT)

    import torch

    from bench import results

    threads = next((int(v.split("=", 1)[1]) if "=" in v else int(extra[i + 1])
                    for i, v in enumerate(extra) if v.startswith("--threads")), None)
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    slug = results.device_slug(device)
    if args.results_dir is not None:
        out_dir = args.results_dir / slug
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir = results.new_run_dir(slug, tag="" if mode == "default" else mode)
    env = dict(os.environ)
    if threads:  # the parity and environment steps too
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"make main ({mode}) on {results.host_label(results.host_info(device))}; "
          f"results -> {out_dir}", flush=True)

    failed = []
    for title, argv_ in plan(mode, out_dir, extra).items():
        _step({"environment": "environment", "parity": "parity vs float64 eager",
               "bench": "benchmarks: uk.accelerate vs eager and torch.compile"
                        + ("" if mode == "full" else ", op summary")}[title], start)
        rc = subprocess.run([sys.executable, *argv_], env=env).returncode
        if rc != 0:
            failed.append(f"{title} (exit {rc})")
    _step("summary", start)
    text, _ = summarize(out_dir)
    print(text)
    print(f"\nfiles: {out_dir}/ (summary.md, summary.png, <bench>.json/.md/.png, parity.md)")
    print(f"make main ({mode}): {time.perf_counter() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
