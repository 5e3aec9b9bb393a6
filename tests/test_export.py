"""Deployment: torch.jit.trace and torch.export of accelerated models (tiny configs, one small
input), our ops kept in the graphs, save/load, and the aten lowering of uk.export.decompositions()."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import uniformer_models as um
import uniformer_kernels as uk
from uniformer_kernels import backends
from uniformer_kernels.testing import assert_rel_close, randomize_state_, tolerance

TOL = tolerance(torch.float32, "model")


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def tiny(kind: str):
    widths = dict(embed_dim=(16, 32, 64, 64), head_dim=16, num_classes=10)
    if kind == "image":
        model, shape = um.UniFormer(depth=(1, 1, 1, 1), **widths), (1, 3, 64, 48)
    elif kind == "dense_hybrid":  # stage 3 grid 5x3 in windows of 2: padded windows
        model = um.UniFormer(depth=(1, 1, 2, 1), features_only=True, hybrid=True, window_size=2,
                             **widths)
        shape = (1, 3, 80, 48)
    elif kind == "video_split":
        model, shape = um.UniFormerVideo(depth=(1, 1, 1, 1), split=True, **widths), (1, 3, 4, 32, 32)
    else:  # light: class-token attention and token pruning
        model, shape = um.UniFormerLight(depth=(1, 1, 2, 1), **widths), (1, 3, 64, 64)
    model = randomize_state_(model).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return model, uk.accelerate(copy.deepcopy(model)), x


def outputs(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check(got, model, x):
    with torch.no_grad():
        expected = outputs(copy.deepcopy(model).double()(x.double()))
    for out, ref in zip(outputs(got), expected, strict=True):
        assert_rel_close(out, ref, TOL)


def graph_ops(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_jit_trace_records_our_ops_and_runs():
    """The tracer records dispatcher calls: the ops (not the direct-call fast path, whose kernels
    would be recorded instead) and torch's GEMMs (not oneDNN's, which it cannot record)."""
    model, fast, x = tiny("image")
    with torch.no_grad():
        traced = torch.jit.trace(fast, x, check_trace=False)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert {"uniformer_kernels::depthwise_conv", "uniformer_kernels::pos_embed_norm",
            "uniformer_kernels::attention"} <= kinds
    assert not any(k.startswith(("mkldnn::", "uniformer_kernels_C::")) for k in kinds), kinds
    with torch.no_grad():
        check(traced(x), model, x)


def test_export_keeps_our_ops_round_trips_and_runs(tmp_path):
    model, fast, x = tiny("image")
    with torch.no_grad():
        ep = torch.export.export(fast, (x,))
    ops = graph_ops(ep)
    assert {"uniformer_kernels.depthwise_conv.default", "uniformer_kernels.pos_embed_norm.default",
            "uniformer_kernels.attention.default"} <= ops
    assert not any("mkldnn" in op for op in ops), ops
    path = tmp_path / "tiny.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    check(loaded.module()(x), model, x)
    lowered = loaded.run_decompositions(uk.export.decompositions())
    assert not any("uniformer_kernels" in op for op in graph_ops(lowered)), graph_ops(lowered)
    check(lowered.module()(x), model, x)
    buffer = io.BytesIO()  # the lowered program saves too, and loads without our ops
    torch.export.save(lowered, buffer)
    buffer.seek(0)
    check(torch.export.load(buffer).module()(x), model, x)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense_hybrid", "video_split", "light"])
def test_decompositions_lower_every_model_variant(kind):
    model, fast, x = tiny(kind)
    with torch.no_grad():
        ep = torch.export.export(fast, (x,))
    lowered = ep.run_decompositions(uk.export.decompositions())
    assert not any("uniformer_kernels" in op for op in graph_ops(lowered))
    check(lowered.module()(x), model, x)


@pytest.mark.parametrize("variant", ["global", "cls", "split", "window", "window_no_bias"])
def test_attention_decomposition_matches_the_op(variant):
    """The functional twin of the attention op against the op itself, every variant, odd sizes."""
    gen = torch.Generator().manual_seed(0)
    heads, channels = 3, 24
    kwargs, args = {}, {}
    if variant in ("global", "cls"):
        qkv = torch.randn(2, 13, 3 * channels, generator=gen)
        kwargs["return_cls_attn"] = variant == "cls"
    elif variant == "split":  # temporal view: (B, HW, T, 3C) over (B, T, HW, 3C) memory
        qkv = torch.randn(2, 3, 7, 3 * channels, generator=gen).transpose(1, 2)
    else:  # grid 5x7 in windows of 3: padded right and bottom
        qkv = torch.randn(2, 35, 3 * channels, generator=gen)
        bias = torch.randn(3 * channels, generator=gen) if variant == "window" else None
        kwargs.update(window_size=3, grid_size=(5, 7), qkv_bias=bias)
        args = dict(window_size=3, grid_h=5, grid_w=7, bias=bias)
    expected = uk.ops.attention(qkv, heads, **kwargs)
    decomposition = uk.export.decompositions()[torch.ops.uniformer_kernels.attention.default]
    out, _, cls_probs = decomposition(qkv, args.get("bias"), heads, (channels // heads) ** -0.5,
                                      args.get("window_size", 0), args.get("grid_h", 0),
                                      args.get("grid_w", 0), variant == "cls")
    if variant == "cls":
        expected, expected_cls = expected
        assert_rel_close(cls_probs[:, :, 1:].mean(1), expected_cls, tolerance(torch.float32, "attention"))
    assert_rel_close(out, expected, tolerance(torch.float32, "attention"))
