"""pytest machinery shared by every bench/bench_*.py: options, the ``meter`` fixture, progress
lines, and writing results through bench/results.py (after each case and at session end).

A bench test asks for ``meter`` and calls ``meter.measure(fn, case=..., mode=..., impl=...,
shape=..., flops=..., nbytes=...)`` once; the row (time, roofline, load, ...) goes to
``<folder>/<bench>.json|md|png`` where ``<bench>`` is the file name without ``bench_`` and the
folder is ``--run-dir``, else ``<--results-dir>/<host-slug>/``, else a fresh
``bench/results/runs/<host-slug>-<time>/``. Each case prints one line as it finishes, with the
count of cases and an estimate of the time left; a case measured under load or with a wide spread
is measured again, and marked noisy if it still is. See bench/README.md.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from bench import harness, progress, results

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_MODES = ("fwd", "fwd+bwd")


def pytest_addoption(parser):
    g = parser.getgroup("uniformer benchmarks")
    g.addoption("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    g.addoption("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on GPU)")
    g.addoption("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 8 on GPU)")
    g.addoption("--img-size", type=int, default=None,
                help="image side for classification and video models (default 224; --quick 64)")
    g.addoption("--frames", type=int, default=None, help="video frames (default 8; --quick 4)")
    g.addoption("--dense-size", type=int, default=None,
                help="image side for the dense backbones (default 512; --quick 128)")
    g.addoption("--models", default=None,
                help="comma-separated case names to run, in that order (default: all)")
    g.addoption("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    g.addoption("--impls", default=None,
                help="comma-separated implementations to time (default: every one the bench knows; "
                     "bench_models: eager, compile; op benches add theirs, e.g. ours)")
    g.addoption("--budget", type=float, default=None,
                help="seconds of timed rounds per case (default: CPU 3, GPU 0.5; --quick 0.3)")
    g.addoption("--peaks-budget", type=float, default=None,
                help="seconds of timed rounds for each measured peak, GEMM and copy (default 2; "
                     "--quick 0.5)")
    g.addoption("--cuda-graphs", action="store_true",
                help="CUDA: time op benches by CUDA-graph replay (no launch gaps, but no L2 flush: "
                     "inputs that fit in L2 are timed from cache); default: do_bench, L2 flushed")
    g.addoption("--threads", type=int, default=None,
                help="torch.set_num_threads for CPU runs (default: torch's choice); part of the "
                     "results folder name, cpu-<model>-<N>t")
    g.addoption("--compile-mode", default=None,
                help="torch.compile mode (default: None, i.e. 'default')")
    g.addoption("--quick", action="store_true",
                help="smoke run: small inputs, tiny budget; results are marked QUICK")
    g.addoption("--main", action="store_true",
                help="the main job's selection (make main): the headline cases of each bench")
    g.addoption("--results-dir", default=None,
                help="results root: files go to <results-dir>/<host-slug>/, e.g. bench/results "
                     "to commit them (default: a fresh bench/results/runs/<host-slug>-<time>/)")
    g.addoption("--run-dir", default=None,
                help="folder the files go to directly (make main passes its run folder)")


@dataclass
class Settings:
    device: str
    dtype: str
    batch: int
    img_size: int
    frames: int
    dense_size: int
    models: list[str] | None
    modes: list[str]
    impls: list[str]
    budget_s: float
    compile_mode: str | None
    threads: int | None
    quick: bool
    results_dir: str | None
    run_dir: str | None = None
    main: bool = False
    peaks_budget_s: float = 2.0
    cuda_graphs: bool = False
    warmup: int = 2
    min_rounds: int = 3

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def as_dict(self) -> dict:
        return asdict(self)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _make_settings(config) -> Settings:
    opt = config.getoption
    device = opt("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    quick = bool(opt("--quick"))
    dtype = opt("--dtype") or ("bf16" if on_cuda else "fp32")
    if dtype not in _DTYPES:
        raise pytest.UsageError(f"--dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    modes = _split(opt("--modes"))
    bad = [m for m in modes if m not in _MODES]
    if bad:
        raise pytest.UsageError(f"--modes: expected a subset of {list(_MODES)}, got {bad}")
    main = bool(opt("--main"))
    budget = opt("--budget")
    if budget is None:  # the main job's 10 minutes on 2 cores: 1 s of timed rounds a case
        budget = 0.3 if quick else (0.5 if on_cuda else (1.0 if main else 3.0))
    return Settings(
        device=device,
        dtype=dtype,
        batch=opt("--batch") or (8 if on_cuda else 1),
        img_size=opt("--img-size") or (64 if quick else 224),
        frames=opt("--frames") or (4 if quick else 8),
        dense_size=opt("--dense-size") or (128 if quick else 512),
        models=_split(opt("--models")),
        modes=modes,
        impls=_split(opt("--impls")),
        budget_s=budget,
        compile_mode=opt("--compile-mode"),
        threads=opt("--threads"),
        quick=quick,
        results_dir=opt("--results-dir"),
        run_dir=opt("--run-dir"),
        main=main,
        peaks_budget_s=opt("--peaks-budget") or (0.5 if quick else 2.0),
        cuda_graphs=bool(opt("--cuda-graphs")),
        warmup=1 if quick else 2,
        min_rounds=2 if quick else 3,
    )


@dataclass
class _Session:
    settings: Settings
    rows: dict[str, list[dict]] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    total: int = 0
    kinds: list = field(default_factory=list)  # progress.case_kind of each item, in run order
    eta: progress.Eta = field(default_factory=progress.Eta)
    cache: dict = field(default_factory=dict)
    _peaks: dict | None = None
    _env: dict | None = None
    _out_dir: Path | None = None

    def out_dir(self) -> Path:
        """Where this session's files go (see the module docstring); created on first use."""
        if self._out_dir is None:
            s = self.settings
            if s.run_dir:
                self._out_dir = Path(s.run_dir)
            elif s.results_dir:
                self._out_dir = Path(s.results_dir) / self.env()["device_slug"]
            else:
                self._out_dir = results.new_run_dir(self.env()["device_slug"],
                                                    tag="quick" if s.quick else "")
            self._out_dir.mkdir(parents=True, exist_ok=True)
        return self._out_dir

    def peaks(self) -> dict:
        if self._peaks is None:
            s = self.settings
            load = os.getloadavg()[0]
            if load > 0.75:
                # Measured here: on 2 cores, another busy process makes OpenMP threads wait on
                # descheduled peers, and eager/compiled times grow 10-30x, not 2x.
                _say(f"WARNING: 1-minute load average is {load:.1f} before the first case: another "
                     f"process is using the CPU, and the timings will not be trustworthy")
            _say(f"measuring {s.device} peaks (GEMM, copy) ...")
            self._peaks = harness.measure_peaks(s.device, s.torch_dtype,
                                                budget_s=s.peaks_budget_s)
            _say(f"peaks: {self._peaks['gemm_gflops']:.0f} GFLOP/s ({self._peaks['gemm_dtype']} "
                 f"GEMM), {self._peaks['copy_gbs']:.0f} GB/s copy")
        return self._peaks

    def env(self) -> dict:
        if self._env is None:
            s = self.settings
            self._env = results.collect_env(s.device, s.torch_dtype, self.peaks(), s.as_dict())
        return self._env

    def add(self, bench: str, row: dict) -> None:
        self.rows.setdefault(bench, []).append(row)
        self.write(bench, png=False)

    def write(self, bench: str, png: bool) -> Path | None:
        rows = self.rows.get(bench)
        if not rows:
            return None
        try:
            path = results.write_results(bench, rows, self.env(), png=png, out_dir=self.out_dir())
        except results.HostMismatch as exc:  # never merge hosts: stop before timing more cases
            pytest.exit(f"results: {exc}", returncode=2)
        except Exception:  # never lose a benchmark session to a plotting problem
            _say("results: writing failed:\n" + traceback.format_exc())
            return None
        return path


_SESSION_KEY = pytest.StashKey[_Session]()
_CONFIG = None


def _say(msg: str) -> None:
    """A progress line that shows with or without -s."""
    tr = _CONFIG.pluginmanager.get_plugin("terminalreporter") if _CONFIG is not None else None
    if tr is not None:
        tr.ensure_newline()
        tr.write_line(msg)
    else:
        print(msg, flush=True)


def bench_session(config) -> _Session:
    return config.stash[_SESSION_KEY]


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config
    settings = _make_settings(config)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    config.stash[_SESSION_KEY] = _Session(settings)


def pytest_collection_modifyitems(session, config, items):
    sess = bench_session(config)
    sess.total = len(items)
    sess.index = {item.nodeid: i + 1 for i, item in enumerate(items)}
    sess.kinds = []
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("bench_case") or {}
        sess.kinds.append(progress.case_kind(str(case.get("impl", "")), str(case.get("mode", ""))))


def pytest_report_header(config):
    s = bench_session(config).settings
    return (f"uniformer bench: device={s.device} dtype={s.dtype} batch={s.batch} img={s.img_size} "
            f"frames={s.frames} dense={s.dense_size} budget={s.budget_s}s "
            f"threads={torch.get_num_threads()} quick={s.quick} main={s.main}")


def pytest_report_teststatus(report, config):
    """No progress dots for passed cases: each case prints its own line."""
    if report.when == "call" and report.passed:
        return "passed", "", "PASSED"
    if report.when in ("setup", "teardown") and report.passed:
        return "", "", ""
    return None


def pytest_sessionfinish(session, exitstatus):
    sess = bench_session(session.config)
    for bench in list(sess.rows):
        sess.write(bench, png=True)
    if sess.rows:
        noisy = sum(bool(r.get("noisy")) for rows in sess.rows.values() for r in rows)
        _say(f"results: {sess.out_dir()} ({', '.join(f'{b}.json/.md/.png' for b in sess.rows)})"
             + (f"; {noisy} noisy case(s), marked ~ in the tables" if noisy else ""))


def _bench_name(request) -> str:
    stem = Path(str(request.node.fspath)).stem
    return stem[len("bench_"):] if stem.startswith("bench_") else stem


class Meter:
    """Times one case of a bench test and records it (see module docstring)."""

    def __init__(self, request, sess: _Session):
        self._request = request
        self._sess = sess
        self.settings = sess.settings
        self.bench = _bench_name(request)
        self._t0 = time.perf_counter()

    @property
    def device(self) -> torch.device:
        return torch.device(self.settings.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.settings.torch_dtype

    @property
    def peaks(self) -> dict:
        return self._sess.peaks()

    def cached(self, key, compute):
        """Session-wide memo (e.g. FLOPs shared by the eager and compile cases of one shape)."""
        if key not in self._sess.cache:
            self._sess.cache[key] = compute()
        return self._sess.cache[key]

    def say(self, msg: str) -> None:
        _say(msg)

    def _progress(self, text: str, kind: tuple) -> str:
        """The case's line with ``[k/n]`` and the time left, learnt from the cases so far."""
        sess = self._sess
        k = sess.index.get(self._request.node.nodeid, 0)
        sess.eta.add(kind, time.perf_counter() - self._t0)
        left = sess.eta.remaining(sess.kinds[k:]) if k else None
        return progress.line(k, sess.total, text, left)

    def _benchmark_fixture(self, case, mode, impl):
        if self.settings.on_cuda:
            return None
        if not self._request.config.pluginmanager.hasplugin("benchmark"):
            return None
        fixture = self._request.getfixturevalue("benchmark")
        fixture.group = f"{case} {mode}"
        fixture.extra_info.update(case=case, mode=mode, impl=impl)
        return fixture

    def _row(self, *, case, mode, impl, shape, batch, **extra) -> dict:
        row = dict(bench=self.bench, case=case, shape=shape, mode=mode, impl=impl,
                   device=self._sess.env()["device_slug"], dtype=self.settings.dtype,
                   batch=self.settings.batch if batch is None else batch,
                   quick=self.settings.quick)
        row.update(extra)
        return row

    def _time(self, fn, *, case, mode, impl, cuda_graph, grad_to_none, again=False):
        s = self.settings
        probe = harness.LoadProbe(threads=torch.get_num_threads())
        # pytest-benchmark's fixture takes one run per test: a second try is timed plainly
        fixture = None if again else self._benchmark_fixture(case, mode, impl)
        t = harness.time_callable(
            fn, device=s.device, warmup=s.warmup, budget_s=s.budget_s, min_rounds=s.min_rounds,
            benchmark=fixture, cuda_graph=cuda_graph, grad_to_none=grad_to_none)
        load = probe.stop()
        return t, load, harness.noise_reasons(t, load)

    def measure(self, fn, *, case: str, mode: str, impl: str, shape=None, flops=None,
                nbytes=None, batch=None, compile_s=None, cuda_graph=False, grad_to_none=None,
                extra: dict | None = None) -> dict:
        """Time ``fn``; a timing under load or with a wide spread is taken once more, and if the
        second is noisy too, the better of the two (narrower spread) is kept, marked noisy."""
        peaks = self.peaks
        kw = dict(case=case, mode=mode, impl=impl, cuda_graph=cuda_graph, grad_to_none=grad_to_none)
        t, load, noise = self._time(fn, **kw)
        first_noise = None
        if noise:
            first_noise = ", ".join(noise)
            t2, load2, noise2 = self._time(fn, **kw, again=True)
            spread = lambda tm: (tm.p80_ms - tm.p20_ms) / tm.median_ms if tm.median_ms else 1e9
            if not noise2 or spread(t2) <= spread(t):
                t, load, noise = t2, load2, noise2
        roof = harness.roofline_ms(peaks, flops=flops, nbytes=nbytes)
        row = self._row(case=case, mode=mode, impl=impl, shape=shape, batch=batch,
                        median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, rounds=t.rounds,
                        timer=t.timer, flops=flops, bytes=nbytes, roofline_ms=roof,
                        compile_s=compile_s, load=load, remeasured=first_noise,
                        noisy=bool(noise), noise=", ".join(noise) or None, **(extra or {}))
        self._sess.add(self.bench, row)
        _say(self._progress(case_line(row), progress.case_kind(impl, mode)))
        return row

    def fail(self, error: BaseException | str, *, case: str, mode: str, impl: str, shape=None,
             batch=None, compile_s=None) -> dict:
        """Record a case that could not be measured (compile error, OOM...) so the table says so."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        row = self._row(case=case, mode=mode, impl=impl, shape=shape, batch=batch, median_ms=None,
                        error=text[-2000:], compile_s=compile_s)
        self._sess.add(self.bench, row)
        _say(self._progress(f"{case} {mode} {impl}: FAILED {text.strip().splitlines()[-1][:200]}",
                            progress.case_kind(impl, mode)))
        return row


def case_line(row: dict) -> str:
    """One case as it finished: ``S fwd eager: 157 ms (p20 155, p80 180, 19 rounds, 56 % of
    roofline, peak 10 MiB, compiled in 7 s)``, and ``NOISY (load 35 %)`` when it is."""
    fmt = results.fmt_ms
    msg = (f"{row['case']} {row['mode']} {row['impl']}: {fmt(row['median_ms'])} ms "
           f"(p20 {fmt(row['p20_ms'])}, p80 {fmt(row['p80_ms'])}, {row['rounds']} rounds")
    if row.get("roofline_ms"):
        msg += f", {100 * row['roofline_ms'] / row['median_ms']:.0f} % of roofline"
    if row.get("peak_mib") is not None:
        msg += f", peak {row['peak_mib']:.0f} MiB"
    if row.get("compile_s") is not None:
        msg += f", compiled in {row['compile_s']:.0f} s"
    msg += ")"
    if row.get("noisy"):
        msg += f" NOISY ({row['noise']}, measured twice)"
    elif row.get("remeasured"):
        msg += f" (remeasured: first try {row['remeasured']})"
    return msg


def pytest_generate_tests(metafunc):
    """A bench module that defines ``bench_params(settings) -> list[dict]`` (each with an ``id``)
    gets its tests parametrized over them through the ``bench_case`` argument."""
    if "bench_case" in metafunc.fixturenames:
        make = getattr(metafunc.module, "bench_params", None)
        if make is None:
            raise pytest.UsageError(f"{metafunc.module.__name__}: uses bench_case but defines no "
                                    "bench_params(settings)")
        params = make(bench_session(metafunc.config).settings)
        metafunc.parametrize("bench_case", params, ids=[p["id"] for p in params])


@pytest.fixture
def meter(request):
    m = Meter(request, bench_session(request.config))
    yield m
    harness.free_memory(m.settings.device)
