"""Progress lines of a bench session: ``[k/n] <case line> ~M s left``.

The estimate of time left is learnt from the cases already done, per kind of case: a
``torch.compile`` case costs a compile warm-up on top of its timing, and a training step costs
about three forwards, so "compile, fwd+bwd" cases are averaged apart from "eager, fwd" ones. A kind
not seen yet is estimated by the mean over all cases done so far.
"""
from __future__ import annotations

from collections import defaultdict


def case_kind(impl: str, mode: str) -> tuple[bool, str]:
    """What a case costs depends mostly on whether it compiles and on its mode."""
    return ("compile" in impl, mode)


class Eta:
    """Learns seconds per case kind; estimates the seconds the remaining cases need."""

    def __init__(self):
        self._sum: dict[tuple, float] = defaultdict(float)
        self._count: dict[tuple, int] = defaultdict(int)

    def add(self, kind: tuple, seconds: float) -> None:
        self._sum[kind] += seconds
        self._count[kind] += 1

    def done(self) -> int:
        return sum(self._count.values())

    def estimate(self, kind: tuple) -> float | None:
        if self._count.get(kind):
            return self._sum[kind] / self._count[kind]
        n = self.done()
        return sum(self._sum.values()) / n if n else None

    def remaining(self, kinds_left) -> float | None:
        """Seconds for the cases of ``kinds_left`` (one kind per case); None before any case."""
        if not self.done():
            return None
        return sum(self.estimate(k) for k in kinds_left)


def format_left(seconds: float | None) -> str:
    """``~40 s left``, ``~7 min left``; empty when nothing is known yet or nothing is left."""
    if seconds is None:
        return ""
    if seconds < 1:
        return "" if seconds <= 0 else "~1 s left"
    if seconds < 120:
        return f"~{seconds:.0f} s left"
    return f"~{seconds / 60:.0f} min left"


def line(k: int, n: int, text: str, seconds_left: float | None) -> str:
    """``[3/24] uniformer_small fwd eager: ... ~5 min left`` (no estimate after the last case)."""
    left = format_left(seconds_left) if k < n else ""
    return f"[{k}/{n}] {text}" + (f"  {left}" if left else "")
