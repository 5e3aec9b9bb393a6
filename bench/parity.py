"""Parity summary of the main job: how far each computation is from a float64 eager reference.

Per variant (and dense backbone), in eval (forward outputs) and train (gradient of a loss w.r.t.
input and weights), the float32 error against the same randomised model in float64 of
- the reference model itself (eager float32: the yardstick), and
- the same model through ``uk.accelerate`` (the fused blocks on the automatic backend).
The numerical contract asks the accelerated model to stay within 1e-4 relative in float32; the
op-level parity (every op x backend) is in the test suite.

    python -m bench.parity [--quick] [--models a,b] [--img-size 128] [--results-dir DIR | --run-dir DIR]

Writes ``parity.json`` and ``parity.md`` into ``--run-dir``, else ``<--results-dir>/<host-slug>/``,
else a fresh ``bench/results/runs/<host-slug>-<time>/``, and prints one line per model.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from bench.results import check_same_host, collect_env, device_slug, host_label, new_run_dir
from bench.shapes import DENSE_CASES, build_model, import_models, model_input
from uniformer_kernels import accelerate, ops
from uniformer_kernels.testing import randomize_state_, rel_error, tolerance

QUICK_CASES = "uniformer_small,uniformer_xxs,uniformer_small_video,dense_small_hybrid"


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _loss(out) -> torch.Tensor:
    """sum(out * w) with fixed pseudo-random weights w, so every output element's gradient matters.
    w is computed in float64 and then rounded: a float32 arange of a million elements would put
    ~2 % errors into sin() and make the two precisions minimise different losses."""
    total = 0.0
    for i, t in enumerate(_outputs(out)):
        w = torch.sin(torch.arange(t.numel(), dtype=torch.float64, device=t.device) * (0.37 + i))
        total = total + (t.reshape(-1) * w.to(t.dtype)).sum()
    return total


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def model_parity(name: str, kwargs: dict, size: int, frames: int | None, batch: int,
                 device: torch.device) -> dict:
    """float32 vs float64 of the same randomised model, for the reference in float32 and the
    accelerated float32 model: eval outputs, train gradients. Keys ``<impl>_<what>_rel_err``."""
    torch.manual_seed(0)  # the input too: reruns give the same numbers
    ref = randomize_state_(build_model(name, **kwargs), seed=0).double().to(device)
    models = {"ref": copy.deepcopy(ref).float()}
    models["ours"] = accelerate(copy.deepcopy(models["ref"]))
    x64 = model_input(batch, size, frames, dtype=torch.float64, device=device)
    with torch.no_grad():
        out64 = _outputs(ref.eval()(x64))
        errs = {f"{impl}_fwd_rel_err": max(rel_error(a, b) for a, b in
                                           zip(_outputs(m.eval()(x64.float())), out64))
                for impl, m in models.items()}

    grads = {}
    for impl, model, x in (("fp64", ref, x64), *((i, m, x64.float()) for i, m in models.items())):
        model.train()
        x = x.clone().requires_grad_(True)
        _loss(model(x)).backward()
        grads[impl] = (x.grad, [p.grad for p in model.parameters() if p.grad is not None])
    # Parameter gradients are compared as one concatenated vector: some (biases that feed a
    # train-mode BatchNorm through linear layers only) are analytically zero, and a per-tensor
    # relative error of rounding noise over ~1e-16 says nothing.
    for impl in models:
        errs[f"{impl}_input_grad_rel_err"] = rel_error(grads[impl][0], grads["fp64"][0])
        errs[f"{impl}_param_grad_rel_err"] = rel_error(_flat(grads[impl][1]), _flat(grads["fp64"][1]))
    return errs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated subset (default: all)")
    # small inputs: this checks numerics, not scale (the benchmarks use the real sizes)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--dense-size", type=int, default=256,
                        help="dense backbones; 256 already pads stage 3 (16x16) to 2x2 windows")
    parser.add_argument("--frames", type=int, default=4)
    # batch 1 would make train-mode classification blind: the last BatchNorm then normalises each
    # channel over space alone, so the pooled features, logits and loss no longer depend on x
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="results root: files go to <dir>/<host-slug>/ (bench/results to "
                             "commit them); default: a fresh bench/results/runs/<host-slug>-<time>/")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="folder the files go to directly (make main's run folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one model of each kind at tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.img_size, args.dense_size, args.frames = 64, 128, 2
        args.models = args.models or QUICK_CASES
    device = torch.device(args.device)
    # float32 means float32: TF32 convs/matmuls (cuDNN's default) would read as a 1e-3 "error"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    um = import_models()
    cases = {name: (name, {}) for name in um.list_models()} | DENSE_CASES
    if args.models:
        wanted = args.models.split(",")
        unknown = [w for w in wanted if w not in cases]
        if unknown:
            parser.error(f"--models: unknown {unknown}; known: {', '.join(cases)}")
        cases = {k: cases[k] for k in wanted}

    fused = sorted(n for n in getattr(ops, "__all__", []))
    print(f"== parity on {device}: float32 vs float64, reference eager and uk.accelerate "
          f"(fused ops: {', '.join(fused)}) ==")
    tol = tolerance(torch.float32, "model")
    print(f"   contract for the accelerated model: <= {tol:.0e} relative")
    rows = []
    for i, (case, (name, kwargs)) in enumerate(cases.items(), 1):
        size = args.dense_size if kwargs.get("features_only") else args.img_size
        frames = args.frames if "video" in name else None
        start = time.perf_counter()
        errs = model_parity(name, kwargs, size, frames, args.batch, device)
        ours = [v for k, v in errs.items() if k.startswith("ours")]
        row = {"case": case, "input": [args.batch, 3] + ([frames] if frames else []) + [size, size],
               **errs, "tolerance": tol, "ok": max(ours) <= tol}
        rows.append(row)
        print(f"  [{i}/{len(cases)}] {case:22s} " + "  ".join(
            f"{what} ref {errs[f'ref_{key}_rel_err']:.1e} ours {errs[f'ours_{key}_rel_err']:.1e}"
            for what, key in (("fwd", "fwd"), ("d_input", "input_grad"), ("d_params", "param_grad")))
            + f"  {'ok' if row['ok'] else 'ABOVE TOLERANCE'}  ({time.perf_counter() - start:.1f} s)",
            flush=True)

    if args.run_dir is not None:
        out_dir = args.run_dir
    elif args.results_dir is not None:
        out_dir = args.results_dir / device_slug(device)
    else:
        out_dir = new_run_dir(device_slug(device), tag="quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = collect_env(device, torch.float32)
    if (out_dir / "parity.json").exists():  # never replace another host's table
        old = json.loads((out_dir / "parity.json").read_text()).get("env") or {}
        check_same_host({"runs": {old.get("run_id"): old}}, env, out_dir / "parity.json")
    (out_dir / "parity.json").write_text(json.dumps(
        {"env": env, "fused_ops": fused, "models": rows}, indent=1))
    lines = ["# Parity: float32 vs float64 eager, reference and `uk.accelerate`", "",
             f"Measured on {host_label(env.get('host'))}, torch {env.get('torch')}, commit "
             f"{str(env.get('git_commit'))[:12]}. Fused ops: {', '.join(fused)}.", "",
             "Relative error ||fp32 - fp64|| / ||fp64|| against the same randomised model in "
             "float64 eager, for the reference model in float32 (ref) and the accelerated float32 "
             "model (ours): eval outputs; train-mode gradients of a fixed weighted sum of the "
             "outputs w.r.t. the input and w.r.t. all parameters (concatenated). The last column "
             f"holds the accelerated model to the contract ({tol:.0e}).", "",
             "| case | input | fwd ref | fwd ours | d input ref | d input ours | d params ref "
             "| d params ours | ours within 1e-4 |",
             "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    lines += [f"| {r['case']} | {'x'.join(map(str, r['input']))} | " + " | ".join(
              f"{r[f'{impl}_{key}_rel_err']:.1e}" for key in ("fwd", "input_grad", "param_grad")
              for impl in ("ref", "ours")) + f" | {'yes' if r['ok'] else 'NO'} |" for r in rows]
    (out_dir / "parity.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'parity.md'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
