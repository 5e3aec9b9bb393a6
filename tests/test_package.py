"""Package plumbing: import, environment report, backend forcing and choice, the compiled extension,
and that the package still works when the extension or Triton cannot be imported."""
import importlib.metadata
import json
import os
import subprocess
import sys
import threading

from pathlib import Path

import pytest
import torch

import uniformer_kernels as uk
from uniformer_kernels import _extension, _torch_floor, backends

ROOT = Path(__file__).resolve().parents[1]

ENV = backends.ENV_VAR
INFO_KEYS = {
    "uniformer_kernels", "python", "torch", "torch_cuda", "triton", "triton_missing", "device",
    "device_name", "cpu_capability", "torch_threads", "extension", "extension_missing",
    "forced_backend", "forced_backend_error", "backends",
}
BUILD_INFO_KEYS = {"with_cuda", "cuda_archs", "cuda_missing_reason", "openmp", "omp_max_threads",
                   "compile_time_simd", "compiler", "built_against_torch", "cpu_isas_compiled",
                   "cpu_isas_supported", "cpu_kernel_isa", "cpu_kernel_isa_error"}


def triton_installed():
    return backends._import_triton()[0] is not None


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    """Each test starts from the automatic choice, whatever the environment running the suite."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def run_python(code, env_update=None):
    """Run ``code`` in a fresh interpreter (import-time behaviour); returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "TRITON_INTERPRET")}
    env.update(env_update or {})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# --- import and report -------------------------------------------------------------------------

def test_public_names_and_version_match_installed_metadata():
    for name in ("info", "format_info", "print_info", "backend", "current_backend",
                 "available_backends", "ops", "__version__"):
        assert hasattr(uk, name), name
    assert uk.__version__ == importlib.metadata.version("uniformer-kernels")


def test_info_reports_this_environment():
    report = uk.info()
    assert set(report) == INFO_KEYS
    assert report["torch"] == torch.__version__
    assert report["torch_cuda"] == torch.version.cuda
    assert report["torch_threads"] == torch.get_num_threads()
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (report["triton"] is None) == (report["triton_missing"] is not None)
    assert (report["extension"] is None) == (report["extension_missing"] is not None)
    assert list(report["backends"]) == list(backends.BACKENDS)
    for name, status in report["backends"].items():
        assert isinstance(status["available"], bool), name
        assert status["reason"], f"{name} has no reason"
    assert report["backends"]["eager"]["available"]
    json.dumps(report)  # the --json report must serialize


def test_info_prints_as_the_readable_report_and_stays_a_dict(capsys):
    report = uk.info()
    assert isinstance(report, dict) and isinstance(report, uk.Info)
    assert str(report) == uk.format_info(report)
    assert str(report).startswith(f"uniformer_kernels {uk.__version__}\n")
    assert json.loads(json.dumps(report)) == dict(report)
    assert dict(report, torch="x")["torch"] == "x" and report["torch"] == torch.__version__
    # `python -m uniformer_kernels` prints exactly str(info())
    from uniformer_kernels.__main__ import main
    assert main([]) == 0
    assert capsys.readouterr().out == str(uk.info()) + "\n"
    assert main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(uk.info()))


def test_info_reports_an_invalid_env_var_instead_of_raising(monkeypatch):
    monkeypatch.setenv(ENV, "fastest")
    report = uk.info()
    assert report["forced_backend"] is None
    assert ENV in report["forced_backend_error"] and "'fastest'" in report["forced_backend_error"]
    assert "INVALID" in uk.format_info(report)


def test_format_info_lists_every_backend_with_its_reason_aligned():
    report = uk.info()
    text = uk.format_info(report)
    lines = text.splitlines()
    assert lines[0] == f"uniformer_kernels {uk.__version__}"
    assert torch.__version__ in text
    backend_lines = lines[lines.index(f"backends for {report['device']} tensors") + 1:]
    assert [line.split()[0] for line in backend_lines] == list(backends.BACKENDS)
    for line, (name, status) in zip(backend_lines, report["backends"].items()):
        assert line.split()[1] == ("yes" if status["available"] else "no"), line
        assert line.endswith(status["reason"]), line
    # the reasons start in one column
    assert len({line.index(status["reason"]) for line, status in
                zip(backend_lines, report["backends"].values())}) == 1


def test_format_info_without_extension_and_triton_says_how_to_get_them():
    report = dict(uk.info(), extension=None, extension_missing="no _C; build with: X",
                  triton=None, triton_missing="no triton; pip install triton")
    text = uk.format_info(report)
    assert "extension uniformer_kernels._C: not available\n  no _C; build with: X" in text
    assert "not available: no triton; pip install triton" in text


def test_main_prints_text_and_json_reports():
    text = subprocess.run([sys.executable, "-m", "uniformer_kernels"], capture_output=True,
                          text=True, check=True).stdout
    assert text.startswith("uniformer_kernels ") and "backends for " in text
    out = subprocess.run([sys.executable, "-m", "uniformer_kernels", "--json"], capture_output=True,
                         text=True, check=True).stdout
    report = json.loads(out)
    assert set(report) == INFO_KEYS
    assert report["torch"] == torch.__version__


# --- forcing a backend ---------------------------------------------------------------------------

def test_backend_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError, match="triton, cuda, cpu, eager"):
        with uk.backend("cudnn"):
            pass
    assert uk.current_backend() is None


def test_backend_nests_and_restores():
    assert uk.current_backend() is None
    with uk.backend("cpu"):
        assert uk.current_backend() == "cpu"
        with uk.backend("eager"):
            assert uk.current_backend() == "eager"
        assert uk.current_backend() == "cpu"
    assert uk.current_backend() is None


def test_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with uk.backend("cpu"):
            with uk.backend("eager"):
                raise KeyError("inside")
    assert uk.current_backend() is None


def test_backend_forced_in_another_thread_does_not_leak():
    entered, release = threading.Event(), threading.Event()
    seen = []

    def worker():
        with uk.backend("eager"):
            seen.append(uk.current_backend())
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert entered.wait(10)
        assert uk.current_backend() is None
    finally:
        release.set()
        thread.join()
    assert seen == ["eager"]


def test_env_var_forces_a_backend_and_the_context_manager_wins(monkeypatch):
    monkeypatch.setenv(ENV, "eager")
    assert uk.current_backend() == "eager"
    with uk.backend("cpu"):
        assert uk.current_backend() == "cpu"
    assert uk.current_backend() == "eager"
    monkeypatch.setenv(ENV, "")
    assert uk.current_backend() is None


def test_invalid_env_var_raises_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "Eager ")
    with pytest.raises(ValueError, match=ENV) as err:
        uk.current_backend()
    assert "'Eager '" in str(err.value) and "triton, cuda, cpu, eager" in str(err.value)
    with pytest.raises(ValueError, match=ENV):
        backends.resolve_backend("cpu", ("eager",))


# --- choosing a backend for CPU tensors ---------------------------------------------------------

def test_eager_is_always_available():
    assert uk.available_backends("cpu")["eager"][0]
    assert backends.resolve_backend("cpu", ("eager",)) == "eager"


def test_cuda_backend_is_unavailable_for_cpu_tensors():
    ok, reason = uk.available_backends("cpu")["cuda"]
    assert not ok and "CUDA tensors" in reason


def test_automatic_choice_on_cpu_prefers_the_compiled_cpu_kernels():
    expected = "cpu" if _extension.loaded() else "eager"
    assert backends.resolve_backend("cpu") == expected
    assert backends.resolve_backend("cpu", ("triton", "eager")) == "eager"  # no TRITON_INTERPRET


@pytest.mark.skipif(not triton_installed(), reason="triton not installed")
def test_triton_interpreter_serves_cpu_tensors_only_when_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = uk.available_backends("cpu")["triton"]
    assert ok and "interpreter" in reason
    assert backends.resolve_backend("cpu", ("triton", "eager")) == "eager"
    with uk.backend("triton"):
        assert backends.resolve_backend("cpu", ("triton", "eager")) == "triton"
    assert backends.resolve_backend("cpu", ("cpu", "eager")) == ("cpu" if _extension.loaded()
                                                                  else "eager")


def test_forcing_triton_on_cpu_without_interpreter_raises_with_the_reason():
    reason = uk.available_backends("cpu")["triton"][1]
    expected = "TRITON_INTERPRET=1" if triton_installed() else "pip install triton"
    assert expected in reason
    with uk.backend("triton"):
        with pytest.raises(ValueError, match="forced by uniformer_kernels.backend") as err:
            backends.resolve_backend("cpu", ("triton", "eager"), op="depthwise_conv")
    assert reason in str(err.value) and "depthwise_conv" in str(err.value)


def test_forcing_a_backend_the_op_lacks_raises(monkeypatch):
    monkeypatch.setenv(ENV, "cpu")
    with pytest.raises(ValueError, match=f"forced by environment variable {ENV}.*has: triton, eager"):
        backends.resolve_backend("cpu", ("triton", "eager"))


def test_forcing_an_available_backend_returns_it():
    with uk.backend("eager"):
        assert backends.resolve_backend("cpu") == "eager"


def test_resolve_backend_rejects_unknown_supported_names():
    with pytest.raises(ValueError, match="'opencl'"):
        backends.resolve_backend("cpu", ("opencl", "eager"))


def test_no_available_backend_raises_with_every_reason():
    with pytest.raises(RuntimeError, match="cuda: the cuda backend serves CUDA tensors"):
        backends.resolve_backend("cpu", ("cuda",))


# --- the compiled extension ----------------------------------------------------------------------

@pytest.fixture
def build_info():
    if not _extension.loaded():
        pytest.fail(f"the compiled extension is part of the package: {_extension.load_error()}")
    return _extension.build_info()


def test_build_info_reports_this_build(build_info):
    assert set(build_info) == BUILD_INFO_KEYS
    assert build_info["built_against_torch"] == torch.__version__
    assert build_info["compile_time_simd"] in {"avx512", "avx2", "avx", "neon", "sse", "none"}
    assert build_info["compiler"] and build_info["compiler"] != "unknown"
    assert isinstance(build_info["openmp"], bool)
    if torch.version.cuda is None:
        assert build_info["with_cuda"] is False
        assert "CPU-only build" in build_info["cuda_missing_reason"]
    if not build_info["with_cuda"]:
        assert build_info["cuda_archs"] == ""
        assert build_info["cuda_missing_reason"]
    else:
        assert build_info["cuda_archs"]
        assert build_info["cuda_missing_reason"] == ""
    if sys.platform.startswith("linux"):
        assert build_info["openmp"], "gcc/clang on Linux support -fopenmp: setup.py lost the flag"


def test_cuda_backend_says_why_the_extension_has_no_cuda_kernels(monkeypatch):
    if not _extension.loaded():
        pytest.fail(f"the compiled extension is part of the package: {_extension.load_error()}")
    monkeypatch.setattr(_extension, "WITH_CUDA", False)
    monkeypatch.setattr(_extension, "CUDA_MISSING_REASON", "the CUDA kernels failed to compile (x)")
    ok, reason = backends._cuda_status(torch.device("cuda"))
    assert not ok and "failed to compile (x)" in reason and "FORCE_CUDA=1" in reason


def test_build_info_threads_follow_torch_set_num_threads(build_info):
    assert build_info["omp_max_threads"] == torch.get_num_threads() >= 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _extension.build_info()["omp_max_threads"] == 1
    finally:
        torch.set_num_threads(before)


# --- degraded installs ---------------------------------------------------------------------------

# Blocks the imports of the compiled extension and of Triton, as if neither were installed.
MISSING_C_AND_TRITON = """
import json, sys
sys.modules["uniformer_kernels._C"] = None
sys.modules["triton"] = None
import uniformer_kernels as uk
from uniformer_kernels import backends
report = uk.info()
print(json.dumps({
    "report": report,
    "text": uk.format_info(report),
    "cpu_choice": backends.resolve_backend("cpu", ("triton", "cpu", "eager")),
}))
"""


def test_package_works_without_extension_and_triton():
    result = json.loads(run_python(MISSING_C_AND_TRITON))
    report = result["report"]
    assert report["extension"] is None
    assert "pip install --no-build-isolation -e ." in report["extension_missing"]
    assert report["triton"] is None and "pip install triton" in report["triton_missing"]
    cpu = report["backends"]["cpu"]
    assert not cpu["available"] and cpu["reason"] == report["extension_missing"]
    assert not report["backends"]["triton"]["available"]
    assert report["backends"]["eager"]["available"]
    assert result["cpu_choice"] == "eager"
    assert "extension uniformer_kernels._C: not available" in result["text"]


def test_forcing_cpu_without_extension_names_the_build_command():
    code = MISSING_C_AND_TRITON.split("import uniformer_kernels")[0] + (
        "from uniformer_kernels import backends\n"
        "try:\n"
        "    backends.resolve_backend('cpu', ('cpu', 'eager'))\n"
        "except ValueError as exc:\n"
        "    print(exc)\n")
    out = run_python(code, {ENV: "cpu"})
    assert "forced by environment variable" in out and "pip install --no-build-isolation -e ." in out


# --- the torch floor -----------------------------------------------------------------------------

@pytest.mark.parametrize("version,too_old", [
    ("2.10.1", True), ("2.9.0+cu128", True), ("1.13.1", True), ("2.10.0.dev20251201", True),
    ("2.11.0", False), ("2.11.0+cu130", False), ("2.12.0.dev20260101", False), ("3.0.0", False),
])
def test_torch_floor_reads_release_versions(version, too_old):
    problem = _torch_floor.problem(version)
    assert (problem is not None) == too_old
    if too_old:
        assert "torch >= 2.11" in problem and version in problem and "pip install" in problem


def test_torch_floor_rejects_unreadable_versions():
    with pytest.raises(ValueError, match="'unknown'"):
        _torch_floor.problem("unknown")


def test_this_torch_meets_the_floor():
    assert _torch_floor.problem(torch.__version__) is None


# torch.__version__ replaced before uniformer_kernels (or setup.py) reads it.
WITH_TORCH_VERSION = "import runpy, sys, torch\ntorch.__version__ = {version!r}\n"


@pytest.mark.parametrize("version", ["2.10.2", "2.11.0"])
def test_import_refuses_an_older_torch(version):
    code = WITH_TORCH_VERSION.format(version=version) + (
        "try:\n"
        "    import uniformer_kernels\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
        "else:\n"
        "    print('imported')\n")
    out = run_python(code)
    if version == "2.10.2":
        assert out.startswith("ImportError: uniformer_kernels needs torch >= 2.11, found torch 2.10.2")
    else:
        assert out == "imported\n"


@pytest.mark.parametrize("version", ["2.10.2", "2.11.0"])
def test_setup_refuses_an_older_torch(version):
    code = WITH_TORCH_VERSION.format(version=version) + (
        "sys.argv = ['setup.py', '--name']\n"
        "runpy.run_path('setup.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    if version == "2.10.2":
        assert proc.returncode != 0
        assert "error: uniformer_kernels needs torch >= 2.11, found torch 2.10.2" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "uniformer-kernels"
