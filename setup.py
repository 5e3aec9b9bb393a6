"""Build uniformer_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

Install after torch, against that torch (the extension's ABI is the installed torch's):

    pip install --no-build-isolation -e .      # development
    pip install --no-build-isolation .         # regular install

Environment:
    FORCE_CUDA            1: build the CUDA kernels or fail saying why (so a GPU image cannot end up
                          CPU-only by accident); 0: skip them; unset: build them when this torch has
                          CUDA and nvcc is found, and if that compile fails, warn loudly (first errors,
                          log path) and build the CPU-only extension instead.
    TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default "8.0;9.0": A100, H100).
    MAX_JOBS              parallel compile jobs (default: cores, fewer when memory is short).

Why an extension has no CUDA kernels is compiled into it: `python -m uniformer_kernels` reports it.
Needs torch >= 2.11 (uniformer_kernels/_torch_floor.py), refused here with a clear message.

Metadata lives in pyproject.toml; this file only adds what needs code: the extension and the
mapping of the reference models folder `models/` to the import package `uniformer_models`.
"""
import contextlib
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from setuptools import find_packages, setup
from setuptools.errors import CCompilerError
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# A translation unit that includes the torch headers takes ~1-2 GiB to compile (nvcc more).
GIB_PER_JOB = 2

# The package's own check of the torch floor, run as a file: the package cannot be imported unbuilt.
torch_too_old = runpy.run_path(str(ROOT / "uniformer_kernels" / "_torch_floor.py"))["problem"]
if torch_too_old(torch.__version__):
    raise SystemExit(f"error: {torch_too_old(torch.__version__)}")


def sources(folder, *patterns):
    """Source files under csrc/<folder>, relative to this file as setuptools wants them."""
    found = sorted({p for pattern in patterns for p in (ROOT / "csrc" / folder).glob(pattern)})
    return [str(p.relative_to(ROOT)) for p in found]


def available_memory_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_max_jobs():
    """Compile jobs that neither oversubscribe the cores nor run a small machine out of memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = cores or 1
    memory = available_memory_bytes()
    if memory is not None:
        jobs = min(jobs, memory // (GIB_PER_JOB * 1024**3))
    return max(1, jobs)


def cuda_build():
    """(build the CUDA kernels?, why not: "" when they are built) from this torch, nvcc, the sources
    present and FORCE_CUDA."""
    force = os.environ.get("FORCE_CUDA", "")
    if force not in ("", "0", "1"):
        raise SystemExit(f"FORCE_CUDA must be 0 or 1, got {force!r}")
    if force == "0":
        return False, "FORCE_CUDA=0 at build time (rebuild without it to get them)"
    if not sources("cuda", "*.cu"):
        return False, "no CUDA sources in csrc/cuda"
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build (install a CUDA torch, then rebuild)"
    elif cpp_extension.CUDA_HOME is None:
        problem = "nvcc not found at build time (put it on PATH or set CUDA_HOME, then rebuild)"
    elif not Path(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h").is_file():
        # torch guesses CUDA_HOME from nvcc's location, which a wrapper script on PATH misleads.
        problem = (f"CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime.h; "
                   "set CUDA_HOME to the CUDA toolkit (e.g. /usr/local/cuda)")
    else:
        return True, ""
    if force == "1":
        raise SystemExit(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    return False, problem


def compiler_supports_openmp():
    """Whether the C++ compiler torch will use compiles and links -fopenmp (Apple clang does not).

    Without OpenMP, at::parallel_for in our kernels compiles to a serial loop, so this is checked
    rather than assumed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp.cpp")
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = [cpp_extension.get_cxx_compiler(), "-fopenmp", str(src), "-o", str(Path(tmp, "omp"))]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


@contextlib.contextmanager
def output_to(path):
    """Send this process's stdout and stderr, the compilers' included, to the file ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "wb") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def first_errors(log_text, count=6):
    """The first compiler error lines of a build log (its last lines if none reads `error:`)."""
    lines = log_text.splitlines()
    errors = [line.strip() for line in lines if re.search(r"\berror\b:", line, re.IGNORECASE)]
    return (errors or [line.strip() for line in lines[-count:]])[:count]


def warn_loudly(lines):
    """A block that stands out in a build log; setup_env.sh shows the lines tagged like this."""
    bar = "[uniformer_kernels] " + "*" * 78
    print("\n".join([bar, *(f"[uniformer_kernels] {line}" for line in lines), bar]),
          file=sys.stderr, flush=True)


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension plus the per-build facts that build_info() reports, and the CPU-only
    fallback when the CUDA kernels fail to compile (unless FORCE_CUDA=1).

    The facts go into a generated header rather than -D flags: torch's ninja path writes -D values
    into a shell command unquoted while its fallback path does not go through a shell, so a string
    macro cannot be quoted in a way that survives both.
    """

    def build_extensions(self):
        if not WITH_CUDA or os.environ.get("FORCE_CUDA") == "1":
            self.build_with(WITH_CUDA, CUDA_REASON)
            return
        # Kept after the build (pip deletes its temporary build folders): the warning names it.
        fd, log_path = tempfile.mkstemp(prefix="uniformer_kernels-cuda-build-", suffix=".log")
        os.close(fd)
        compile_methods = (self.compiler.compile, self.compiler._compile)
        try:
            with output_to(log_path):
                self.build_with(True, "")
        except (CCompilerError, RuntimeError, subprocess.CalledProcessError) as exc:
            errors = first_errors(Path(log_path).read_text(errors="replace"))
            warn_loudly([
                "WARNING: the CUDA kernels failed to compile; building the CPU-only extension instead.",
                f"  {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "  First errors:", *(f"    {line}" for line in errors),
                f"  Full log: {log_path}",
                "  The package works without them (Triton and eager backends on GPUs). To get them, fix",
                "  the cause (e.g. nvcc's CUDA major version differs from torch's) and rebuild with",
                "  FORCE_CUDA=1, which stops on a CUDA failure instead; FORCE_CUDA=0 skips them quietly.",
            ])
            # torch wraps the compiler's compile methods on every build_extensions call.
            self.compiler.compile, self.compiler._compile = compile_methods
            for ext in self.extensions:
                make_cpu_only(ext)
            self.build_with(False, f"the CUDA kernels failed to compile ({errors[0] if errors else exc}); "
                                   f"build log: {log_path}")
        else:
            print(Path(log_path).read_text(errors="replace"), end="", flush=True)
            os.remove(log_path)

    def build_with(self, with_cuda, cuda_missing_reason):
        """Write the build facts, add this machine's flags, and compile with torch's BuildExtension."""
        archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
        header = "\n".join([
            "// Generated by setup.py: facts about this build, for build_info().",
            "#pragma once",
            f"#define UK_WITH_CUDA {int(with_cuda)}",
            # json.dumps quotes and escapes the way a C string literal needs.
            f"#define UK_CUDA_ARCHS {json.dumps(archs)}",
            f"#define UK_CUDA_MISSING_REASON {json.dumps(cuda_missing_reason)}",
            f"#define UK_TORCH_VERSION {json.dumps(torch.__version__)}",
            "",
        ])
        config_dir = Path(self.build_temp).resolve() / "uk_generated"
        config_dir.mkdir(parents=True, exist_ok=True)
        path = config_dir / "uk_build_config.h"
        # Rewriting an unchanged header would make ninja recompile the files that include it.
        if not path.is_file() or path.read_text() != header:
            path.write_text(header)

        openmp = compiler_supports_openmp()
        for ext in self.extensions:
            if str(config_dir) not in ext.include_dirs:  # a fallback build reuses the extension
                ext.include_dirs.append(str(config_dir))
            if openmp:
                ext.extra_compile_args["cxx"].append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
            cuda = f"on, archs {archs}" if with_cuda else f"off: {cuda_missing_reason}"
            print(f"[uniformer_kernels] building {ext.name} from {len(ext.sources)} files; "
                  f"CUDA {cuda}; OpenMP {'on' if openmp else 'off'}; MAX_JOBS {os.environ['MAX_JOBS']}")
        super().build_extensions()


def cpu_extension():
    return cpp_extension.CppExtension(
        "uniformer_kernels._C",
        sources("cpu", "*.cpp"),
        extra_compile_args={"cxx": ["-O3"]},
    )


def cuda_extension():
    # csrc/cuda: plain CUDA C++ kernels (*.cu) plus thin binding files (*.cpp) that include torch;
    # not its subfolders (host-side test code may live there). The CUDA files come first so that a
    # compile error there stops ninja before it compiles the C++ CPU files.
    return cpp_extension.CUDAExtension(
        "uniformer_kernels._C",
        sources("cuda", "*.cu", "*.cpp") + sources("cpu", "*.cpp"),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )


def make_cpu_only(ext):
    """Turn the CUDA extension into the CPU-only one in place (setuptools keeps state on it).

    Its include and library folders stay: the C++ files then compile with the same command as in
    the CUDA attempt, so ninja reuses their objects (they include no CUDA header either way).
    """
    cpu = cpu_extension()
    ext.sources, ext.libraries = cpu.sources, cpu.libraries
    ext.extra_compile_args, ext.extra_link_args = cpu.extra_compile_args, cpu.extra_link_args


os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
WITH_CUDA, CUDA_REASON = cuda_build()
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
extension = cuda_extension() if WITH_CUDA else cpu_extension()

packages = find_packages(include=["uniformer_kernels", "uniformer_kernels.*"])
package_dir = {}
# The reference models live in models/ but install as `uniformer_models`: a top-level package
# named `models` would clash with users' own. Subpackages, if any appear, follow the mapping.
if (ROOT / "models" / "__init__.py").is_file():
    package_dir["uniformer_models"] = "models"
    packages += ["uniformer_models"]
    packages += [f"uniformer_models.{sub}" for sub in find_packages(str(ROOT / "models"))]

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
