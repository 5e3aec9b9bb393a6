"""The one results writer: rows -> ``<folder>/<bench>.{json,md,png}``.

The folder: a fresh, untracked ``bench/results/runs/<host-slug>-<YYYYmmdd-HHMMSS>/`` per run by
default (:func:`new_run_dir`); ``<results-dir>/<host-slug>/`` when a results root is named
(``--results-dir bench/results`` is how results get committed, deliberately). The host slug names
the machine: ``cpu-<model>-<isa>-<N>t`` or the GPU's name (:func:`device_slug`). Rows from
different hosts are never merged: writing into a file that holds another host's runs raises
:class:`HostMismatch`.

A row is a dict with (at least) ``bench, case, shape, mode, impl, median_ms`` and optionally
``p20_ms, p80_ms, rounds, timer, flops, bytes, roofline_ms, dtype, batch, compile_s, error``.
Rows are merged into an existing ``<bench>.json``: a new row replaces the stored row with the same
key (case, shape, mode, impl, dtype, batch); each row keeps the ``run_id`` of the process that
measured it and the JSON keeps each run's environment, so a table line whose numbers come from
different runs is marked (speed-ups are only trustworthy within one run).

Re-render the markdown and the plot from a JSON file: ``python -m bench.results <file.json>``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterable

ROW_KEY = ("case", "shape", "mode", "impl", "dtype", "batch")
IMPL_ORDER = ("eager", "compile", "ours")
MODE_ORDER = ("fwd", "fwd+bwd")
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN_ID = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]

__all__ = ["device_slug", "host_info", "new_run_dir", "collect_env", "write_results", "render",
           "RUN_ID", "HostMismatch"]


class HostMismatch(ValueError):
    """Rows of one host would be merged into a file that holds another host's rows."""


# --------------------------------------------------------------------------------------------
# Device slug and environment


def _slugify(text: str) -> str:
    text = text.lower().replace("(r)", "").replace("(tm)", "")
    text = re.sub(r"\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_isa(flags: set[str] | None = None) -> str:
    """The widest vector ISA of this CPU, as the benchmarks care: ``avx512`` (``-amx`` with AMX
    tiles), ``avx2``, ``avx``, ``sse``, or the machine name (e.g. ``aarch64``) elsewhere."""
    if flags is None:
        flags = _cpu_flags()
    if "avx512f" in flags:
        return "avx512-amx" if "amx_tile" in flags else "avx512"
    for isa in ("avx2", "avx"):
        if isa in flags:
            return isa
    if flags & {"sse4_2", "sse2"}:
        return "sse"
    return platform.machine().lower() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_ids() -> dict:
    """cpu family / model / stepping from /proc/cpuinfo: a VM's model name is often just
    "AMD EPYC", and these tell two generations apart."""
    ids = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model", "stepping") and key not in ids:
                    ids[key] = value.strip()
                if not line.strip() and ids:
                    break
    except OSError:
        pass
    return ids


def host_info(device) -> dict:
    """What makes two result files comparable: the device's model, and on CPU the vector ISA,
    family/model ids, the threads torch uses and the logical CPUs the machine has."""
    import torch

    from bench.harness import device_name

    dev = torch.device(device)
    info = {"kind": dev.type, "name": device_name(dev)}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
    else:
        info.update(isa=cpu_isa(), ids=_cpu_ids(), threads=torch.get_num_threads(),
                    logical_cpus=os.cpu_count())
    return info


def slug_of(host: dict) -> str:
    """``nvidia-h100`` (memory size and form factor dropped, PCIe kept), or
    ``cpu-<model>-<isa>-<N>t`` with N the threads torch uses (2 and 64 threads must not mix)."""
    slug = _slugify(host["name"])
    if host["kind"] == "cuda":
        slug = re.sub(r"-(\d+gb|hbm\d*e?|sxm\d*)(?=-|$)", "", slug)
        return slug if slug.startswith(("nvidia", "amd")) else "gpu-" + slug
    return f"cpu-{slug or 'unknown'}-{host['isa']}-{host['threads']}t"


def device_slug(device) -> str:
    """The host slug of ``device`` (see :func:`slug_of`)."""
    return slug_of(host_info(device))


def host_label(host: dict | None) -> str:
    """A table's "measured on": e.g. ``AMD EPYC (family 25 model 1), avx2, 2 threads of 2``."""
    if not host:
        return "unknown host"
    if host.get("kind") == "cuda":
        return f"{host.get('name')} (sm {host.get('capability')})"
    ids = host.get("ids") or {}
    idtxt = (f" (family {ids.get('cpu family')} model {ids.get('model')})"
             if ids.get("cpu family") else "")
    return (f"{host.get('name')}{idtxt}, {host.get('isa')}, {host.get('threads')} threads of "
            f"{host.get('logical_cpus')} logical CPUs")


def _host_identity(env: dict) -> tuple:
    """What must match for two runs' rows to share a table (not the CPU count of the VM)."""
    host = env.get("host")
    if not host:  # results written before hosts were recorded: device name and threads
        return ("legacy", env.get("device"), env.get("threads"))
    if host.get("kind") == "cuda":
        return ("cuda", host.get("name"), host.get("capability"))
    ids = host.get("ids") or {}
    return ("cpu", host.get("name"), host.get("isa"), host.get("threads"),
            ids.get("cpu family"), ids.get("model"))


RUNS_DIR = Path(__file__).resolve().parent / "results" / "runs"


def run_dir_name(slug: str, when: _dt.datetime | None = None, tag: str = "") -> str:
    """``<slug>-<YYYYmmdd-HHMMSS>[-tag]`` (UTC)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return f"{slug}-{when.strftime('%Y%m%d-%H%M%S')}" + (f"-{tag}" if tag else "")


def new_run_dir(slug: str, tag: str = "", root: Path | None = None) -> Path:
    """A fresh folder for one run's results under ``bench/results/runs/`` (gitignored)."""
    root = Path(root) if root else RUNS_DIR
    path = root / run_dir_name(slug, tag=tag)
    n = 1
    while path.exists():  # two runs in the same second
        n += 1
        path = root / f"{run_dir_name(slug, tag=tag)}-{n}"
    path.mkdir(parents=True)
    return path


def _git_commit() -> tuple[str, bool | None]:
    env = os.environ.get("UK_GIT_COMMIT")
    if env:
        return env, None
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def collect_env(device, dtype=None, peaks: dict | None = None, options: dict | None = None) -> dict:
    """Everything needed to tell two result files apart: versions, device, threads, peaks, commit."""
    import torch

    from bench.harness import device_name

    dev = torch.device(device)
    host = host_info(dev)
    commit, dirty = _git_commit()
    env = {
        "run_id": RUN_ID,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dev),
        "device_slug": slug_of(host),
        "host": host,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "uniformer_kernels": _version("uniformer_kernels"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews times
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
        "peaks": peaks or {},
        "options": options or {},
        "argv": sys.argv,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env["gpu"] = {"sm_count": props.multi_processor_count,
                      "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}"}
    return env


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # not installed, or broken install: record, don't fail the bench
        return None


# --------------------------------------------------------------------------------------------
# Writing


def _key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in ROW_KEY)


def check_same_host(data: dict, env: dict, path=None) -> None:
    """Raise :class:`HostMismatch` if ``data`` (a results file) holds a run of another host."""
    mine = _host_identity(env)
    for run_id, other in (data.get("runs") or {}).items():
        if run_id != env.get("run_id") and _host_identity(other) != mine:
            raise HostMismatch(
                f"{path or data.get('bench')}: holds run {run_id} from "
                f"{host_label(other.get('host')) if other.get('host') else other.get('device')}, "
                f"this run is on {host_label(env.get('host'))}: rows of different hosts are never "
                f"merged into one table; write into another folder")


def write_results(bench: str, rows: Iterable[dict], env: dict, results_dir=None, *,
                  png: bool = True, out_dir=None) -> Path:
    """Merge ``rows`` into ``<out_dir>/<bench>.json`` and re-render md (and png).

    ``out_dir`` defaults to ``<results_dir>/<device-slug>/`` (``results_dir`` defaults to
    ``bench/results``). Returns the JSON path. ``env`` comes from :func:`collect_env` (its
    ``device_slug`` picks the folder and its ``run_id`` is stamped on rows that lack one).
    Raises :class:`HostMismatch` when the file holds rows of another host.
    """
    if out_dir is None:
        results_dir = Path(results_dir) if results_dir else DEFAULT_RESULTS_DIR
        out_dir = results_dir / env["device_slug"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench}.json"

    data = {"bench": bench, "device_slug": env["device_slug"], "runs": {}, "rows": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            path.rename(path.with_suffix(".json.corrupt"))
    check_same_host(data, env, path)

    run_id = env.get("run_id", RUN_ID)
    data.setdefault("runs", {})[run_id] = env
    new = []
    for row in rows:
        row = dict(row)
        row.setdefault("bench", bench)
        row.setdefault("run_id", run_id)
        new.append(row)
    new_keys = {_key(r) for r in new}
    kept = [r for r in data.get("rows", []) if _key(r) not in new_keys]
    data["rows"] = kept + new
    used = {r.get("run_id") for r in data["rows"]}
    data["runs"] = {k: v for k, v in data["runs"].items() if k in used or k == run_id}

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    render(path, png=png)
    return path


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


# --------------------------------------------------------------------------------------------
# Rendering: markdown table and bar chart


def _impls(rows: list[dict]) -> list[str]:
    seen = {r["impl"] for r in rows}
    return [i for i in IMPL_ORDER if i in seen] + sorted(seen - set(IMPL_ORDER))


def _groups(rows: list[dict]) -> list[tuple[tuple, dict[str, dict]]]:
    """Table lines: (case, shape, mode, dtype, batch) -> {impl: row}, in first-seen case order."""
    order: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        g = (r.get("case"), json.dumps(r.get("shape")), r.get("mode"), r.get("dtype"),
             r.get("batch"))
        order.setdefault(g, {})[r["impl"]] = r
    case_rank = {}
    for g in order:
        case_rank.setdefault(g[0], len(case_rank))

    def rank(g):
        mode = MODE_ORDER.index(g[2]) if g[2] in MODE_ORDER else len(MODE_ORDER)
        return (case_rank[g[0]], g[1], str(g[3]), str(g[4]), mode, str(g[2]))

    return [(g, order[g]) for g in sorted(order, key=rank)]


def _ok(row: dict | None) -> bool:
    return bool(row) and row.get("median_ms") is not None and not row.get("error") \
        and math.isfinite(row["median_ms"])


def fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt_shape(shape) -> str:
    if shape is None:
        return ""
    if isinstance(shape, dict):
        return ", ".join(f"{k}={_fmt_shape(v)}" for k, v in shape.items())
    if isinstance(shape, (list, tuple)):
        return "x".join(str(s) for s in shape)
    return str(shape)


def ratio_text(base: dict | None, ours: dict | None, mark: str = "") -> str:
    """``base time / ours`` to 2 decimals; ``~`` in front when either time is marked noisy."""
    if not (_ok(base) and _ok(ours)):
        return ""
    noisy = "~" if base.get("noisy") or ours.get("noisy") else ""
    return f"{noisy}{base['median_ms'] / ours['median_ms']:.2f}{mark}"


def _line_stats(impl_rows: dict[str, dict]) -> dict:
    ok = {i: r for i, r in impl_rows.items() if _ok(r)}
    any_row = next(iter(impl_rows.values()))
    roof = next((r.get("roofline_ms") for r in impl_rows.values() if r.get("roofline_ms")), None)
    flops = next((r.get("flops") for r in impl_rows.values() if r.get("flops")), None)
    nbytes = next((r.get("bytes") for r in impl_rows.values() if r.get("bytes")), None)
    fastest = min(ok, key=lambda i: ok[i]["median_ms"]) if ok else None
    runs = {r.get("run_id") for r in ok.values()}
    return {"ok": ok, "any": any_row, "roofline_ms": roof, "flops": flops, "bytes": nbytes,
            "fastest": fastest, "mixed_runs": len(runs) > 1}


def render_markdown(data: dict) -> str:
    rows = data.get("rows", [])
    impls = _impls(rows)
    others = [i for i in impls if i != "eager"]
    lines = [f"# {data.get('bench')} — {data.get('device_slug')}", ""]
    runs = data.get("runs", {})
    for run_id, env in runs.items():
        peaks = env.get("peaks") or {}
        peak_txt = ""
        if peaks:
            gemm = "x".join(map(str, peaks.get("gemm_shape", [])))
            peak_txt = (f"; measured peaks: {peaks.get('gemm_gflops', math.nan):.0f} GFLOP/s "
                        f"({peaks.get('gemm_dtype')} GEMM {gemm}), "
                        f"{peaks.get('copy_gbs', math.nan):.0f} GB/s (copy)")
        quick = (" — **QUICK smoke run, not a measurement**"
                 if (env.get("options") or {}).get("quick") else "")
        dirty = " (dirty)" if env.get("git_dirty") else ""
        where = (host_label(env["host"]) if env.get("host")
                 else f"{env.get('device')}, {env.get('threads')} threads")
        lines.append(f"- run `{run_id}`: {env.get('date')}, {where}, torch {env.get('torch')}, "
                     f"triton {env.get('triton')}, commit {str(env.get('git_commit'))[:12]}{dirty}"
                     f"{peak_txt}{quick}")
    lines += ["",
              "Times are medians in ms (p20–p80 in the JSON). `x eager` = eager time / that time; "
              "`x compile` = compile time / `ours` time; both from the same run. Roofline = "
              "max(FLOPs / measured GEMM peak, bytes / measured copy bandwidth); `% roofline` is "
              "for the fastest implementation. Expect ±20 % between runs: compare ratios, not "
              "times across files. `~` before a ratio and the last column: a time measured "
              "twice under load or with a wide p20–p80 spread (noisy), so not a clean number.", ""]

    head = ["case", "shape", "mode", "dtype", "batch", "GFLOP"] + [f"{i} ms" for i in impls]
    head += [f"{i} x eager" for i in others if "eager" in impls]
    if "compile" in impls:
        head += [f"{i} x compile" for i in others if i != "compile"]
    head += ["roofline ms", "% roofline", "fastest", "noisy"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < 4 or i >= len(head) - 2 else "--:"
                                for i in range(len(head))) + "|")

    mixed_any = False
    for (case, _shape, mode, dtype, batch), impl_rows in _groups(rows):
        st = _line_stats(impl_rows)
        ok, r0 = st["ok"], st["any"]
        cells = [str(case), _fmt_shape(r0.get("shape")), str(mode), str(dtype or ""),
                 str(batch if batch is not None else ""),
                 f"{st['flops'] / 1e9:.2f}" if st["flops"] else ""]
        for i in impls:
            r = impl_rows.get(i)
            if _ok(r):
                cells.append(fmt_ms(r["median_ms"]))
            elif r is not None and r.get("error"):
                cells.append("fail")
            else:
                cells.append("")
        mark = "†" if st["mixed_runs"] else ""
        mixed_any |= st["mixed_runs"]
        if "eager" in impls:
            for i in others:
                cells.append(ratio_text(ok.get("eager"), ok.get(i), mark))
        if "compile" in impls:
            for i in others:
                if i != "compile":
                    cells.append(ratio_text(ok.get("compile"), ok.get(i), mark))
        roof = st["roofline_ms"]
        cells.append(fmt_ms(roof) if roof else "")
        if roof and st["fastest"]:
            cells.append(f"{100 * roof / ok[st['fastest']]['median_ms']:.0f}")
        else:
            cells.append("")
        cells.append(st["fastest"] or "")
        cells.append(", ".join(f"{i} ({r.get('noise')})" for i, r in impl_rows.items()
                               if r.get("noisy")))
        lines.append("| " + " | ".join(cells) + " |")

    if mixed_any:
        lines += ["", "† the times on this line come from different runs (see run ids in the JSON)."]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Failures:", ""]
        for r in errors:
            msg = str(r["error"]).strip().splitlines()
            lines.append(f"- {r.get('case')} {r.get('mode')} {r.get('impl')} {r.get('dtype')}: "
                         f"{msg[-1] if msg else ''}"[:300])
    compile_rows = [r for r in rows if r.get("compile_s") is not None]
    if compile_rows:
        total = sum(r["compile_s"] for r in compile_rows)
        lines += ["", f"torch.compile warm-up (excluded from the times): {len(compile_rows)} cases, "
                      f"{total:.0f} s in all, per case in the JSON (`compile_s`)."]
    return "\n".join(lines) + "\n"


def render_png(data: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = data.get("rows", [])
    impls = _impls(rows)
    groups = _groups(rows)
    if not groups:
        return None
    # One panel per (mode, dtype, batch); cases along x, one bar per implementation.
    panels: dict[tuple, list] = {}
    for g, impl_rows in groups:
        panels.setdefault((g[2], g[3], g[4]), []).append((g, impl_rows))
    panel_keys = sorted(panels, key=lambda k: (MODE_ORDER.index(k[0]) if k[0] in MODE_ORDER else 9,
                                               str(k[1]), str(k[2])))
    max_cases = max(len(v) for v in panels.values())
    width = min(30.0, max(7.0, 0.9 * max_cases * max(1, len(impls)) / 2 + 2.5))
    fig, axes = plt.subplots(len(panel_keys), 1, figsize=(width, 3.6 * len(panel_keys) + 0.8),
                             squeeze=False)
    colors = {"eager": "#7f7f7f", "compile": "#1f77b4", "ours": "#d62728"}
    palette = iter(["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"])
    for i in impls:
        colors.setdefault(i, next(palette, "#bcbd22"))

    bar_w = 0.8 / max(1, len(impls))
    for ax, pk in zip(axes[:, 0], panel_keys):
        items = panels[pk]
        x = np.arange(len(items))
        all_ms = []
        for j, impl in enumerate(impls):
            med, lo, hi, xs = [], [], [], []
            for k, (_g, impl_rows) in enumerate(items):
                r = impl_rows.get(impl)
                if not _ok(r):
                    continue
                m = r["median_ms"]
                xs.append(x[k] - 0.4 + bar_w * (j + 0.5))
                med.append(m)
                lo.append(max(0.0, m - (r.get("p20_ms") or m)))
                hi.append(max(0.0, (r.get("p80_ms") or m) - m))
            for k, (_g, impl_rows) in enumerate(items):
                r = impl_rows.get(impl)
                if r is not None and r.get("error"):
                    ax.text(x[k] - 0.4 + bar_w * (j + 0.5), 0, "fail", rotation=90, ha="center",
                            va="bottom", fontsize=7, color=colors[impl],
                            transform=ax.get_xaxis_transform())
            if med:
                ax.bar(xs, med, bar_w * 0.92, yerr=[lo, hi], capsize=2, label=impl,
                       color=colors[impl], error_kw={"elinewidth": 0.8})
                all_ms += med
        roof_label = True
        for k, (_g, impl_rows) in enumerate(items):
            st = _line_stats(impl_rows)
            if st["roofline_ms"]:
                ax.hlines(st["roofline_ms"], x[k] - 0.45, x[k] + 0.45, colors="black",
                          linestyles="--", linewidth=1.2, label="roofline" if roof_label else None)
                roof_label = False
                all_ms.append(st["roofline_ms"])
            if st["fastest"] and "eager" in st["ok"] and st["fastest"] != "eager":
                best = st["ok"][st["fastest"]]["median_ms"]
                top = max(max(r["median_ms"], r.get("p80_ms") or 0) for r in st["ok"].values())
                ax.annotate(f"{st['ok']['eager']['median_ms'] / best:.2f}x",
                            (x[k], top),
                            textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        positive = [v for v in all_ms if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([_tick_label(g, impl_rows) for g, impl_rows in items],
                           rotation=30 if len(items) > 4 else 0, ha="right" if len(items) > 4 else "center",
                           rotation_mode="anchor", fontsize=8)
        mode, dtype, batch = pk
        ax.set_title(f"{mode}, {dtype}, batch {batch}", fontsize=10)
        ax.set_ylabel("ms (median, p20–p80)")
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.margins(y=0.12)
        if ax.get_legend_handles_labels()[0]:  # a panel of failed cases has no bars
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    runs = data.get("runs", {})
    last = list(runs.values())[-1] if runs else {}
    quick = " — QUICK smoke run" if (last.get("options") or {}).get("quick") else ""
    where = host_label(last["host"]) if last.get("host") else last.get("device", data.get("device_slug"))
    fig.suptitle(f"{data.get('bench')} on {where} "
                 f"(torch {last.get('torch')}, {str(last.get('date', ''))[:10]}){quick}\n"
                 "labels above bars: speed-up of the fastest vs eager", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tick_label(g, impl_rows) -> str:
    case = str(g[0])
    shape = next(iter(impl_rows.values())).get("shape")
    if isinstance(shape, dict) and "input" in shape:
        return f"{case}\n{_fmt_shape(shape['input'])}"
    return case


def render(json_path, *, png: bool = True) -> tuple[Path, Path | None]:
    """(Re)write ``<bench>.md`` and ``<bench>.png`` beside ``json_path``."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md")
    md.write_text(render_markdown(data))
    out_png = None
    if png:
        out_png = render_png(data, json_path.with_suffix(".png"))
    return md, out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Re-render <bench>.md and <bench>.png from <bench>.json")
    ap.add_argument("json", nargs="+", help="results JSON file(s)")
    ap.add_argument("--no-png", action="store_true")
    args = ap.parse_args(argv)
    for p in args.json:
        md, png = render(p, png=not args.no_png)
        print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
