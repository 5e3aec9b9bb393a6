"""``python -m uniformer_kernels [--json]``: the environment report (versions, device, compiled
extension, backends and why each is or is not available). Paste it into bug reports."""
from __future__ import annotations

import argparse
import json

from . import info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uniformer_kernels",
        description="Report the environment uniformer_kernels runs in and which backends it can use.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = info()
    print(json.dumps(report, indent=2) if args.json else report)  # str(report) is the text
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
