"""LaunchPlan: one Triton launch as data (kernel, grid, runtime arguments, constexprs, num_warps,
num_stages). The launchers build their plans with the plan functions next to each kernel and
launch exactly those; the ahead-of-time check (bench/gpu_static.py) calls the same plan functions
on meta tensors of the models' shapes and compiles each distinct plan for sm_80 / sm_90, so a
specialisation a launcher can produce cannot escape the check."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LaunchPlan:
    op: str                 # op and pass, e.g. "depthwise.fwd"
    kernel: Any             # the @triton.jit function
    grid: tuple
    args: tuple             # runtime arguments in the kernel's order (tensors, ints, floats, None)
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default

    def options(self) -> dict:
        opts = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        return opts

    def launch(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options())

    def label(self) -> str:
        """``op[K=V,...,w4,s2]``: the compile-time part of the plan (runtime ints excluded)."""
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        parts.append(f"w{self.num_warps}")
        if self.num_stages is not None:
            parts.append(f"s{self.num_stages}")
        return f"{self.op}[{','.join(parts)}]"
