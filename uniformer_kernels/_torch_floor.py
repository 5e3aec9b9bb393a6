"""The oldest torch uniformer_kernels supports, checked when the package is built (setup.py runs
this file on its own) and when it is imported. Imports nothing but the standard library."""
from __future__ import annotations

import re

# torch 2.11 (with CUDA 13.0) is the oldest the kernels are built and checked against.
MINIMUM = (2, 11)


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version such as '2.11.0+cu130' or '2.12.0.dev20260101'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(match[1]), int(match[2])


def problem(version: str) -> str | None:
    """Why torch ``version`` is too old for uniformer_kernels and what to do, or None if it is not."""
    if release(version) >= MINIMUM:
        return None
    minimum = ".".join(map(str, MINIMUM))
    return (f"uniformer_kernels needs torch >= {minimum}, found torch {version}: install a newer "
            f"torch (pip install 'torch>={minimum}'), then rebuild uniformer_kernels against it "
            "(pip install --no-build-isolation -e .)")
