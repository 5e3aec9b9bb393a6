"""Shared test set-up.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. ``triton.jit`` decides
between compiling and interpreting when a kernel is defined, so the variable must be set before any
kernel module is imported: here, before the tests import anything of ours. With a GPU it stays
unset and the Triton tests run the compiled kernels on CUDA tensors instead.
``uniformer_kernels.testing.triton_test_device()`` is the one place the tests ask which of the two
applies. Tests force the triton backend explicitly (the automatic choice never picks the
interpreter).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
