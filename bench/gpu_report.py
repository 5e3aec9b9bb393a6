"""Packs the one-shot GPU run's results into few files and prints its compact summary.

``bench/run_gpu.sh`` lets every bench write ``<scratch>/<device-slug>/<bench>.json|md`` (after
each case), then calls this after each bench step and at the end:

    python -m bench.gpu_report pack SCRATCH OUT [--png] [--dry-run]
        -> OUT/results.json  {"dry_run", "note", "benches": {"<slug>/<bench>": <bench JSON>}}
           OUT/results.md    the compact table, then every bench's own table
           OUT/plots.png     (--png) every bench's plot, stacked (needs matplotlib; Pillow to stack)
    python -m bench.gpu_report summary OUT/results.json
        -> the compact table on stdout
    python -m bench.gpu_report unpack OUT/results.json bench/results
        -> bench/results/<device-slug>/<bench>.json (merged as bench/results.py merges), .md, .png:
           a GPU run's results, ready to commit (refuses a dry run's)

The device tool brings back at most 8 files and only the last 12,000 characters of output, hence
the packing and a compact table: one line per (bench, case, mode, dtype), our fastest backend
against each baseline measured in the same run (``x B`` = B's time / ours, > 1 means ours is
faster), each with its share of the roofline (roofline time / measured time; see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench import results

DRY_RUN_NOTE = "dry run: CPU, not GPU numbers (tiny shapes and budgets; checks the plan only)"
# Baselines per bench, in column order; impls named sdpa_* are folded into their fastest, "sdpa".
BASELINES = {
    "depthwise": ("eager_nchw", "eager_cl", "compile"),
    "attention": ("eager", "sdpa", "compile"),
    "accelerate": ("eager", "compile"),
    "models": ("eager",),
}
BASELINE_LABELS = {"eager_cl": "cl", "eager_nchw": "nchw"}


def _ok(row: dict | None) -> bool:
    return bool(row) and row.get("median_ms") is not None and not row.get("error") \
        and math.isfinite(row["median_ms"])


def _load_benches(scratch: Path) -> dict[str, dict]:
    """Every bench JSON under ``scratch/<slug>/`` (run_gpu.sh) or directly in ``scratch`` (a run
    folder of make main), keyed ``<slug>/<bench>``; other JSON files (parity, pytest-benchmark's)
    are left out."""
    benches = {}
    for path in sorted(scratch.glob("*/*.json")) + sorted(scratch.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # a half-written file must not lose the others
            print(f"gpu_report: cannot read {path}: {exc}", file=sys.stderr)
            continue
        if not (isinstance(data, dict) and "bench" in data and "rows" in data):
            continue
        slug = path.parent.name if path.parent != scratch else data.get("device_slug", "?")
        benches[f"{slug}/{path.stem}"] = data
    return benches


def _lines(bench: str, rows: list[dict]) -> list[dict]:
    """(case, mode, dtype) -> our fastest row and each baseline's row."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r.get("case"), r.get("mode"), r.get("dtype")), {})[r["impl"]] = r
    out = []
    for (case, mode, dtype), by_impl in groups.items():
        ours = {i: r for i, r in by_impl.items() if i.startswith("ours")}
        ok_ours = {i: r for i, r in ours.items() if _ok(r)}
        best = min(ok_ours, key=lambda i: ok_ours[i]["median_ms"]) if ok_ours else None
        sdpa = {i: r for i, r in by_impl.items() if i.startswith("sdpa_") and _ok(r)}
        if sdpa:
            by_impl = dict(by_impl, sdpa=min(sdpa.values(), key=lambda r: r["median_ms"]))
        out.append(dict(case=case, mode=mode, dtype=dtype, ours_name=best,
                        ours=ok_ours.get(best), ours_failed=bool(ours) and not ok_ours,
                        baselines={b: by_impl.get(b) for b in BASELINES.get(bench, ("eager",))}))
    return out


def _roof(row: dict) -> str:
    roof = row.get("roofline_ms")
    return f"{100 * roof / row['median_ms']:.0f}%" if roof else "-"


def compact_table(benches: dict[str, dict]) -> str:
    """One markdown table per bench: ours vs each baseline, each with its roofline share."""
    parts = []
    for key, data in benches.items():
        bench = data.get("bench") or key.split("/")[-1]
        rows = data.get("rows", [])
        if not rows:
            continue
        base = BASELINES.get(bench, ("eager",))
        head = ["case", "mode", "dtype", "ours", "ms", "roof"]
        for b in base:
            label = BASELINE_LABELS.get(b, b)
            head += [f"x {label}", f"{label} roof"]
        mem = bench == "accelerate"
        if mem:
            head.append("peak MiB ours/eager")
        table = [f"### {key}", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" if i < 4 else "--:" for i in range(len(head))) + "|"]
        for line in _lines(bench, rows):
            ours = line["ours"]
            cells = [str(line["case"]), str(line["mode"]), str(line["dtype"])]
            if ours:
                cells += [line["ours_name"], results.fmt_ms(ours["median_ms"]), _roof(ours)]
            else:
                cells += ["FAIL" if line["ours_failed"] else "-", "", ""]
            for b in base:
                r = line["baselines"][b]
                if _ok(r):
                    cells += [results.ratio_text(r, ours), _roof(r)]
                else:
                    cells += ["fail" if r and r.get("error") else "", ""]
            if mem:
                eager = line["baselines"].get("eager")
                if ours and _ok(eager) and ours.get("peak_mib") and eager.get("peak_mib"):
                    cells.append(f"{ours['peak_mib']:.0f}/{eager['peak_mib']:.0f}="
                                 f"{ours['peak_mib'] / eager['peak_mib']:.2f}")
                else:
                    cells.append("")
            table.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(table))
    if not parts:
        return "(no benchmark rows)"
    legend = ("`x B` = B's median / ours (same run; > 1: ours faster). `roof` = roofline time / "
              "measured time (roofline: max(FLOPs / measured GEMM peak, bytes / measured copy "
              "bandwidth), bench/README.md). `~1.23`: ours or B was noisy (measured twice "
              "under load or with a wide p20-p80 spread; see the JSON's `noise`): not a clean "
              "ratio.")
    return legend + "\n\n" + "\n\n".join(parts)


def peaks_line(benches: dict[str, dict]) -> str:
    """The peaks each bench process measured (GEMM and copy), so the roofline has its basis."""
    seen = []
    for data in benches.values():
        for env in (data.get("runs") or {}).values():
            p = env.get("peaks") or {}
            if p:
                seen.append(f"{p.get('gemm_dtype')} GEMM {p.get('gemm_gflops', math.nan):.0f} "
                            f"GFLOP/s, copy {p.get('copy_gbs', math.nan):.0f} GB/s")
    # one line per bench process: the spread between them is the peaks' own noise
    return "measured peaks, per bench process: " + ("; ".join(seen) if seen else "none")


def pack(scratch: Path, out: Path, *, png: bool, dry_run: bool) -> None:
    benches = _load_benches(scratch)
    note = DRY_RUN_NOTE if dry_run else "GPU run"
    (out / "results.json").write_text(json.dumps(
        {"dry_run": dry_run, "note": note, "benches": benches}, indent=1, default=str) + "\n")
    md = [f"# bench/run_gpu.sh results — {note}", "", peaks_line(benches), "",
          compact_table(benches)]
    for key, data in benches.items():
        md += ["", "---", "", results.render_markdown(data)]
    for extra in sorted(scratch.glob("*/*_memory.md")):
        md += ["", "---", "", extra.read_text()]
    (out / "results.md").write_text("\n".join(md) + "\n")
    if png:
        _plots(benches, scratch, out / "plots.png")


def _plots(benches: dict[str, dict], scratch: Path, path: Path) -> None:
    """Every bench's plot (bench/results.py), stacked into one PNG (the file count is limited)."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    pngs = []
    for key, data in benches.items():
        one = scratch / f"{key.replace('/', '__')}.png"
        try:
            if results.render_png(data, one) is not None:
                pngs.append(one)
        except Exception as exc:  # no matplotlib, or a plotting problem: the tables still stand
            print(f"gpu_report: plot of {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    if not pngs:
        return
    if Image is None or len(pngs) == 1:
        pngs[0].replace(path)
        return
    images = [Image.open(p).convert("RGB") for p in pngs]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    sheet.save(path, optimize=True)


def unpack(results_json: Path, results_dir: Path) -> list[Path]:
    """Write each bench of a packed ``results.json`` back as ``<dir>/<slug>/<bench>.json`` (merged
    with what is there, row by row) and re-render its md and png."""
    data = json.loads(results_json.read_text())
    if data.get("dry_run"):
        raise SystemExit(f"{results_json}: a dry run's results ({DRY_RUN_NOTE}); not unpacked")
    written = []
    for key, bench_data in data.get("benches", {}).items():
        slug, bench = key.split("/", 1)
        for run_id, env in bench_data.get("runs", {}).items():
            rows = [r for r in bench_data.get("rows", []) if r.get("run_id") == run_id]
            if rows:
                written.append(results.write_results(bench, rows, dict(env, device_slug=slug),
                                                     results_dir))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="SCRATCH/<slug>/<bench>.json -> OUT/results.{json,md}[, plots.png]")
    p.add_argument("scratch", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--png", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("summary", help="print the compact table of OUT/results.json")
    s.add_argument("results_json", type=Path)
    u = sub.add_parser("unpack", help="OUT/results.json -> DIR/<slug>/<bench>.{json,md,png}")
    u.add_argument("results_json", type=Path)
    u.add_argument("results_dir", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "unpack":
        for path in unpack(args.results_json, args.results_dir):
            print(f"wrote {path} (+ .md, .png)")
        return 0
    if args.cmd == "pack":
        pack(args.scratch, args.out, png=args.png, dry_run=args.dry_run)
        return 0
    data = json.loads(args.results_json.read_text())
    if data.get("dry_run"):
        print(f"** {data.get('note')} **")
    print(peaks_line(data.get("benches", {})))
    print(compact_table(data.get("benches", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
