"""The device guard around Triton launches.

A Triton kernel launches on the *current* CUDA device and its stream, not on the device of the
tensors it is given; a call on cuda:1 tensors while cuda:0 is current would run on the wrong GPU.
The ops enter ``on_device_of(x)`` around every Triton launcher call. The CUDA binding
(csrc/cuda/depthwise_binding.cpp) has its own c10::cuda::CUDAGuard; CPU tensors (the Triton
interpreter) need no guard.
"""
from __future__ import annotations

import contextlib

import torch


def on_device_of(t: torch.Tensor):
    """A context making ``t``'s CUDA device current (a no-op for other devices)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
