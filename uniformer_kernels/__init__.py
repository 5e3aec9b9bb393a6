"""Fused kernels for the UniFormer family, each checked against an eager PyTorch reference.

    import uniformer_kernels as uk
    uk.accelerate(model)            # UniFormer's blocks switched to the fused ones, in place
    print(uk.info())                # versions, device, compiled extension, backends and why
    with uk.backend("eager"): ...   # force a backend (or set UNIFORMER_KERNELS_BACKEND)

``python -m uniformer_kernels`` prints the same report. The package imports without its compiled
extension or Triton; the report then says what is missing and how to get it.
"""
from __future__ import annotations

import platform

import torch

from . import _torch_floor

# Checked before anything loads the compiled extension, which an older torch could not load.
_torch_too_old = _torch_floor.problem(torch.__version__)
if _torch_too_old:
    raise ImportError(_torch_too_old)

from . import _extension, backends, export, nn, ops
from .backends import available_backends, backend, current_backend
from .convert import accelerate

__version__ = "0.1.0"

__all__ = [
    "__version__", "accelerate", "info", "Info", "format_info", "print_info",
    "backend", "current_backend", "available_backends", "backends", "export", "nn", "ops",
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return _cpu_name()


class Info(dict):
    """What ``info()`` returns: a plain dict of the report (indexing, ``json.dumps``, ``dict(...)``
    work as on any dict) whose ``str`` is the readable text of ``format_info``, so
    ``print(uk.info())`` prints what ``python -m uniformer_kernels`` does."""

    def __str__(self) -> str:
        return format_info(self)


def info() -> Info:
    """The environment as this package sees it, as an ``Info`` (a dict; ``str`` gives the readable
    report); JSON-serializable.

    Keys: uniformer_kernels, python, torch, torch_cuda, triton (version or None) and
    triton_missing (why, or None), device (default device the backends are reported for),
    device_name, cpu_capability (ATen's dispatch level), torch_threads, extension (build_info()
    of the compiled extension or None) and extension_missing (why, or None), forced_backend and
    forced_backend_error (an invalid UNIFORMER_KERNELS_BACKEND is reported, not raised),
    backends ({name: {"available": bool, "reason": str}}).
    """
    device = backends._device(None)
    triton, triton_missing = backends._import_triton()
    try:
        forced, forced_error = current_backend(), None
    except ValueError as exc:
        forced, forced_error = None, str(exc)
    return Info({
        "uniformer_kernels": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, "
                  f"{platform.system()} {platform.machine()})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__ if triton is not None else None,
        "triton_missing": triton_missing or None,
        "device": str(device),
        "device_name": _device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "extension": _extension.build_info(),
        "extension_missing": _extension.load_error(),
        "forced_backend": forced,
        "forced_backend_error": forced_error,
        "backends": {name: {"available": ok, "reason": reason}
                     for name, (ok, reason) in available_backends(device).items()},
    })


def _aligned(rows: list[tuple[str, object]], indent: str = "  ") -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"{indent}{label:<{width}}  {value}".rstrip() for label, value in rows]


def format_info(report: dict | None = None) -> str:
    """``info()`` (or a report it returned) as aligned text, one section per topic."""
    r = info() if report is None else report
    forced = r["forced_backend"] or "none (automatic choice)"
    if r["forced_backend_error"]:
        forced = f"INVALID: {r['forced_backend_error']}"
    lines = [f"uniformer_kernels {r['uniformer_kernels']}"]
    lines += _aligned([
        ("python", r["python"]),
        ("torch", f"{r['torch']} (CUDA {r['torch_cuda'] or 'none'})"),
        ("triton", r["triton"] or f"not available: {r['triton_missing']}"),
        ("device", f"{r['device']}: {r['device_name']}"),
        ("cpu capability", r["cpu_capability"]),
        ("torch threads", r["torch_threads"]),
        ("forced backend", forced),
    ])
    if r["extension"] is not None:
        lines.append("extension uniformer_kernels._C")
        lines += _aligned([(key, "none" if value == "" else ", ".join(value) if isinstance(value, list) else value)
                           for key, value in r["extension"].items()])
    else:
        lines.append("extension uniformer_kernels._C: not available")
        lines.append(f"  {r['extension_missing']}")
    lines.append(f"backends for {r['device']} tensors")
    lines += _aligned([(name, f"{'yes' if b['available'] else 'no':<3}  {b['reason']}")
                       for name, b in r["backends"].items()])
    return "\n".join(lines)


def print_info() -> None:
    print(format_info())
