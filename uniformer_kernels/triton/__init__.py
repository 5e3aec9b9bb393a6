"""Triton kernels: GPU by default; CPU tensors under TRITON_INTERPRET=1 (tests)."""
