"""Real UniFormer op shapes, read off the reference models with forward hooks (never typed by hand).

For each configuration below, one forward runs on the meta device (no data, so batch 8 at 512x512
costs nothing; if an op lacked a meta kernel it would fall back to CPU at batch 1 and scale the
batch dimension) with hooks on

* depthwise convs (``nn.Conv2d``/``nn.Conv3d`` with ``groups == in_channels == out_channels``):
  ``kind`` ``pos_embed`` (3x3 / 3x3x3, added to its input) or ``local`` (the CBlock's ``attn``,
  5x5 / 5x5x5), with the enclosing block and its norm (BatchNorm for CBlock, LayerNorm otherwise),
* attention (modules with a packed ``qkv`` Linear and ``num_heads``): B, N, C, heads, head_dim and
  the variant: ``global``, ``window`` (window_size), ``temporal``/``spatial`` (video split),
  ``global_cls`` (light models: class token, N shrinks as tokens are pruned),
* MLPs (``Mlp`` on tokens, ``CMlp`` as 1x1 convs): tokens, C, hidden,

and identical shapes are counted (``count`` = occurrences in one forward).

    from bench.shapes import collect_shapes, CONFIGS
    rows = collect_shapes("S-224")          # list of dicts, one per unique (op, kind, shape)

CLI: ``python -m bench.shapes [CONFIG ...] [--batch N] [--json]`` prints markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["CONFIGS", "DENSE_CASES", "collect_shapes", "import_models", "build_model", "model_input"]


def import_models():
    """``import uniformer_models``; from a source checkout without ``pip install``, load it from
    ``<repo>/models`` under that name (the benches must run from a fresh clone)."""
    try:
        return importlib.import_module("uniformer_models")
    except ImportError:
        init = REPO_ROOT / "models" / "__init__.py"
        if not init.exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "uniformer_models", init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["uniformer_models"] = module
        spec.loader.exec_module(module)
        return module


# name -> model, create_model kwargs, input (frames or None, size), default batch
CONFIGS: dict[str, dict[str, Any]] = {
    "S-224": dict(model="uniformer_small", kwargs={}, frames=None, size=224, batch=8),
    "B-224": dict(model="uniformer_base", kwargs={}, frames=None, size=224, batch=8),
    "XXS-224": dict(model="uniformer_xxs", kwargs={}, frames=None, size=224, batch=8),
    "video-S-8x224": dict(model="uniformer_small_video", kwargs={}, frames=8, size=224, batch=8),
    "video-S-split-8x224": dict(model="uniformer_small_video", kwargs={"split": True}, frames=8,
                                size=224, batch=8),
    "dense-S-hybrid-512": dict(model="uniformer_small",
                               kwargs={"features_only": True, "hybrid": True, "window_size": 14},
                               frames=None, size=512, batch=8),
    "dense-XXS-512": dict(model="uniformer_xxs", kwargs={"features_only": True}, frames=None,
                          size=512, batch=8),
}


# The dense backbones the parity summary and the model benchmarks run: case -> (model, kwargs).
DENSE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "dense_small_hybrid": ("uniformer_small",
                           {"features_only": True, "hybrid": True, "window_size": 14}),
    "dense_small_windows": ("uniformer_small",
                            {"features_only": True, "windows": True, "window_size": 14}),
    "dense_xxs": ("uniformer_xxs", {"features_only": True}),
}


def build_model(name: str, **kwargs) -> nn.Module:
    """``um.create_model`` with dropout and stochastic depth at zero (benchmarks time the
    deterministic computation; these are identity at inference anyway)."""
    um = import_models()
    model = um.create_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def model_input(batch: int, size: int, frames: int | None = None, *, device="cpu",
                dtype=torch.float32) -> torch.Tensor:
    shape = (batch, 3, size, size) if frames is None else (batch, 3, frames, size, size)
    if torch.device(device).type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.randn(shape, device=device, dtype=dtype)


def _is_depthwise(m: nn.Module) -> bool:
    return (isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.groups > 1
            and m.groups == m.in_channels == m.out_channels)


def _is_attention(m: nn.Module) -> bool:
    return isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")


def _is_mlp(m: nn.Module) -> bool:
    return hasattr(m, "fc1") and hasattr(m, "fc2") and not _is_attention(m)


_BLOCK_NORM = {"CBlock": "batchnorm"}  # every other block normalises tokens with LayerNorm


def _attention_kind(block_cls: str, attr: str) -> str:
    if block_cls == "SABlock_Windows":
        return "window"
    if block_cls == "SplitSABlock":
        return "temporal" if attr == "t_attn" else "spatial"
    if block_cls == "EvoSABlock":
        return "global_cls"
    return "global"


def _hooks(model: nn.Module, records: list):
    modules = dict(model.named_modules())
    handles = []
    for name, m in model.named_modules():
        parent_name, _, attr = name.rpartition(".")
        parent = modules.get(parent_name)
        block = type(parent).__name__ if parent is not None else ""
        if _is_depthwise(m):
            kind = {"pos_embed": "pos_embed", "attn": "local"}.get(attr, "dwconv")

            def hook(mod, args, out, kind=kind, block=block):
                x = args[0]
                records.append(dict(
                    op="dwconv", kind=kind, block=block, norm=_BLOCK_NORM.get(block, "layernorm"),
                    shape=list(x.shape), kernel=list(mod.kernel_size), padding=list(mod.padding),
                    residual=kind == "pos_embed"))
        elif _is_attention(m):
            kind = _attention_kind(block, attr)

            def hook(mod, args, out, kind=kind, block=block, parent=parent):
                B, N, C = args[0].shape
                rec = dict(op="attention", kind=kind, block=block, B=B, N=N, C=C,
                           heads=mod.num_heads, head_dim=C // mod.num_heads)
                if kind == "window":
                    rec["window"] = parent.window_size
                records.append(rec)
        elif _is_mlp(m):
            kind = "cmlp" if not isinstance(m.fc1, nn.Linear) else "mlp"

            def hook(mod, args, out, kind=kind, block=block):
                x = args[0]
                if kind == "mlp":
                    tokens, C = x.numel() // x.shape[-1], x.shape[-1]
                    hidden = mod.fc1.out_features
                else:
                    tokens, C = x.numel() // x.shape[1], x.shape[1]
                    hidden = mod.fc1.out_channels
                records.append(dict(op="mlp", kind=kind, block=block, shape=list(x.shape),
                                    tokens=tokens, C=C, hidden=hidden))
        else:
            continue
        handles.append(m.register_forward_hook(hook))
    return handles


def _scale_batch(rec: dict, factor: int) -> dict:
    rec = dict(rec)
    if "shape" in rec:
        rec["shape"] = [rec["shape"][0] * factor] + rec["shape"][1:]
    for key in ("B", "tokens"):
        if key in rec:
            rec[key] *= factor
    return rec


@functools.lru_cache(maxsize=None)
def _collect(config_name: str, batch: int) -> tuple:
    if config_name not in CONFIGS:
        raise ValueError(f"config_name: unknown {config_name!r}; known: {', '.join(CONFIGS)}")
    cfg = CONFIGS[config_name]
    model = build_model(cfg["model"], **cfg["kwargs"]).eval()
    records: list[dict] = []
    handles: list = []
    try:  # meta: no data, no time; every op of the reference models has a meta kernel today
        model = model.to("meta")
        handles = _hooks(model, records)
        with torch.no_grad():
            model(model_input(batch, cfg["size"], cfg["frames"], device="meta"))
        source = "meta"
    except (NotImplementedError, RuntimeError):
        for h in handles:
            h.remove()
        records.clear()
        model = build_model(cfg["model"], **cfg["kwargs"]).eval()
        handles = _hooks(model, records)
        with torch.no_grad():
            model(model_input(1, cfg["size"], cfg["frames"]))
        records = [_scale_batch(r, batch) for r in records]
        source = "cpu-batch1-scaled"
    for h in handles:
        h.remove()

    counts = Counter(json.dumps(r, sort_keys=True) for r in records)
    order = list(dict.fromkeys(json.dumps(r, sort_keys=True) for r in records))
    out = []
    for key in order:
        rec = json.loads(key)
        rec.update(config=config_name, count=counts[key], source=source)
        out.append(rec)
    return tuple(json.dumps(r) for r in out)


def collect_shapes(config_name: str, batch: int | None = None, op: str | None = None) -> list[dict]:
    """Unique op shapes of one forward of ``CONFIGS[config_name]`` with their multiplicity.

    ``batch`` overrides the configuration's batch; ``op`` filters (``dwconv``, ``attention``,
    ``mlp``). Each dict has ``op, kind, block, count, config, source`` and the op's sizes.
    """
    if config_name not in CONFIGS:
        raise ValueError(f"config_name: unknown {config_name!r}; known: {', '.join(CONFIGS)}")
    batch = batch or CONFIGS[config_name]["batch"]
    rows = [json.loads(r) for r in _collect(config_name, int(batch))]
    return [r for r in rows if op is None or r["op"] == op]


def _fmt(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, list) else str(v)


def to_markdown(config_name: str, rows: list[dict]) -> str:
    cfg = CONFIGS[config_name]
    inp = ([cfg["frames"]] if cfg["frames"] else []) + [cfg["size"], cfg["size"]]
    batch = rows[0]["shape"][0] if rows and "shape" in rows[0] else cfg["batch"]
    kwargs = ", ".join(f"{k}={v}" for k, v in cfg["kwargs"].items())
    lines = [f"### {config_name}: {cfg['model']}({kwargs}), input {batch}x3x{_fmt(inp)}", ""]
    dw = [r for r in rows if r["op"] == "dwconv"]
    if dw:
        lines += ["| depthwise conv | block (norm) | input | kernel | count |", "|---|---|---|---|--:|"]
        lines += [f"| {r['kind']} | {r['block']} ({r['norm']}) | {_fmt(r['shape'])} | "
                  f"{_fmt(r['kernel'])} | {r['count']} |" for r in dw]
        lines.append("")
    at = [r for r in rows if r["op"] == "attention"]
    if at:
        lines += ["| attention | block | B | N | C | heads | head_dim | window | count |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        lines += [f"| {r['kind']} | {r['block']} | {r['B']} | {r['N']} | {r['C']} | {r['heads']} | "
                  f"{r['head_dim']} | {r.get('window', '')} | {r['count']} |" for r in at]
        lines.append("")
    ml = [r for r in rows if r["op"] == "mlp"]
    if ml:
        lines += ["| mlp | block | input | tokens | C | hidden | count |", "|---|---|---|--:|--:|--:|--:|"]
        lines += [f"| {r['kind']} | {r['block']} | {_fmt(r['shape'])} | {r['tokens']} | {r['C']} | "
                  f"{r['hidden']} | {r['count']} |" for r in ml]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print the UniFormer op shapes read off the models.")
    ap.add_argument("configs", nargs="*", help=f"default: all of {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=None, help="override each config's batch")
    ap.add_argument("--json", action="store_true", help="JSON instead of markdown")
    args = ap.parse_args(argv)
    names = args.configs or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    if args.json:
        print(json.dumps({n: collect_shapes(n, args.batch) for n in names}, indent=1))
        return 0
    print("# UniFormer op shapes (from forward hooks on the reference models)\n")
    for n in names:
        print(to_markdown(n, collect_shapes(n, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
