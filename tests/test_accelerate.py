"""uk.accelerate and the drop-in modules of uniformer_kernels.nn: whole-model parity against the
float64 reference on every variant (eval outputs; train-mode gradients, BatchNorm statistics and
stochastic depth), the Triton backend, torch.compile, autocast, state_dict compatibility,
idempotence, conversion of trees that are not our classes, and the conversion errors.

The parity, compile and autocast tests run on the CPU and, marked ``gpu``, the same bodies on CUDA
(the automatic backends there: triton); float16/bfloat16 models on CUDA are held to the contract
or, where the eager model in the same dtype cannot reach it, to twice that model's own error."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

import uniformer_models as um
from uniformer_kernels import backends
from uniformer_kernels import nn as uknn
from uniformer_kernels.convert import accelerate
from uniformer_kernels.nn import gemm
from uniformer_kernels.testing import (assert_rel_close, gpu_marks, randomize_state_, rel_error,
                                       tolerance, triton_marks, triton_test_device)
from uniformer_models.layers import DropPath

TOL = tolerance(torch.float32, "model")
# Odd stage sizes, and at least 8 values per channel for the train-mode BatchNorm of the
# classification head: with fewer, batch statistics amplify rounding (the float32 reference's
# own gradient error reaches 6e-5 for UniFormer-B at 4 values per channel, 3e-6 at 8).
IMAGE_INPUT = (2, 3, 80, 72)      # stages 20x18, 10x9, 5x4, 2x2
VIDEO_INPUT = (2, 3, 4, 64, 48)   # T 2, stages 16x12, 8x6, 4x3, 2x1
# name -> (create_model name, kwargs, input shape)
CASES = {name: (name, {}, VIDEO_INPUT if name.endswith("_video") else IMAGE_INPUT)
         for name in um.list_models()}
CASES.update({
    "uniformer_small_video_split": ("uniformer_small_video", {"split": True}, VIDEO_INPUT),
    # stage 3 grid 7x5 in windows of 6: 2x1 windows, the second mostly padding; blocks 4 and 8
    # global
    "dense_small_hybrid": ("uniformer_small", {"features_only": True, "hybrid": True,
                                               "window_size": 6}, (2, 3, 112, 80)),
    # stage 3 grid 9x7 in windows of 4: 3x2 windows, padded right and bottom
    "dense_small_windows": ("uniformer_small", {"features_only": True, "windows": True,
                                                "window_size": 4}, (2, 3, 144, 112)),
    "dense_xxs": ("uniformer_xxs", {"features_only": True}, (2, 3, 112, 80)),
})
BIG = {"uniformer_base", "uniformer_base_ls", "uniformer_large_ls", "uniformer_base_video"}


DEVICES = ["cpu", pytest.param("cuda", marks=gpu_marks())]
TRITON_DEVICE = triton_test_device()[0]  # "cuda" (compiled), "cpu" (interpreter) or None


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 means float32 on a GPU too: cuDNN convs default to TF32 (10-bit mantissa), which
    alone would miss the 1e-4 model contract; the Triton attention uses 3xTF32 (float32 accurate).
    (Set and restored by hand: monkeypatch cannot restore torch.backends.cuda.matmul's flags.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@functools.lru_cache(maxsize=1)
def _built(case: str, seed: int, overrides: tuple) -> nn.Module:
    name, kwargs, _ = CASES[case]
    model = um.create_model(name, num_classes=10, **{**kwargs, **dict(overrides)})
    return randomize_state_(model, seed)


def build(case: str, seed: int = 0, **overrides) -> tuple[nn.Module, torch.Tensor]:
    """A randomised float32 reference model (BN statistics included) of its own, and its input."""
    model = copy.deepcopy(_built(case, seed, tuple(sorted(overrides.items()))))
    shape = CASES[case][2]
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def tiny_model(**kwargs) -> nn.Module:
    """One block per stage at a quarter of S's width: for the slow paths (interpreter, compile)."""
    model = um.UniFormer(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 64), head_dim=16,
                         num_classes=10, **kwargs)
    return randomize_state_(model)


def outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def weighted_loss(out) -> torch.Tensor:
    """sum(out * w) in float64 with fixed pseudo-random weights: every output element matters."""
    total = 0.0
    for i, t in enumerate(outputs(out)):
        w = torch.sin(torch.arange(t.numel(), dtype=torch.float64, device=t.device) * (0.37 + i))
        total = total + (t.reshape(-1).double() * w).sum()
    return total


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def gradients(model: nn.Module, x: torch.Tensor):
    """d loss / d input, d loss / d parameters (concatenated: some are analytically zero, e.g.
    biases feeding a train-mode BatchNorm) and the buffers the step leaves behind."""
    x = x.clone().requires_grad_(True)
    weighted_loss(model(x)).backward()
    return x.grad, flat(p.grad for p in model.parameters()), flat(model.buffers())


# ---- parity ------------------------------------------------------------------------------------

# each case's eval and train checks run back to back and share one build
PARITY = [pytest.param(case, mode, "cpu", marks=[pytest.mark.slow] if case in BIG and mode == "train"
                       else []) for case in CASES for mode in ("eval", "train")]
PARITY += [pytest.param(case, mode, "cuda", marks=gpu_marks())
           for case in CASES for mode in ("eval", "train")]


@pytest.mark.parametrize("case,mode,device", PARITY)
def test_model_matches_float64_reference(case, mode, device):
    """eval: the outputs, with the reference's shapes and strides. train (batch statistics, the
    light models' cls head, large_ls' aux head): input and parameter gradients of a float64
    loss, and the BatchNorm statistics the step leaves behind."""
    model, x = build(case)
    model, x = model.to(device), x.to(device)
    fast = accelerate(copy.deepcopy(model).train(mode == "train"))
    reference = model.double().train(mode == "train")
    if mode == "train":
        expected = gradients(reference, x.double())
        for got, ref, what in zip(gradients(fast, x), expected, ("d input", "d params", "buffers")):
            assert_rel_close(got, ref, TOL, name=f"{case} {what}")
        return
    with torch.no_grad():
        expected = outputs(reference(x.double()))
        got = outputs(fast(x))
    assert len(got) == len(expected)
    for i, (out, ref) in enumerate(zip(got, expected)):
        assert out.dtype == torch.float32
        assert out.stride() == ref.stride(), "the user sees the reference's shapes and formats"
        assert_rel_close(out, ref, TOL, name=f"{case} output {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["dense_small_hybrid", "dense_small_windows"])
def test_dense_backbones_at_512_match_float64_reference(case, device):
    """The real segmentation/detection configuration: 512x512, windows of 14, so stage 3's 32x32
    grid is padded to 3x3 windows of 14 (bias-valued padding tokens in every softmax)."""
    _, kwargs, _ = CASES[case]
    model = randomize_state_(um.create_model("uniformer_small", **{**kwargs, "window_size": 14}))
    model = model.to(device)
    fast = accelerate(copy.deepcopy(model).eval())
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        for i, (out, ref) in enumerate(zip(fast(x), model.double().eval()(x.double()))):
            assert_rel_close(out, ref, TOL, name=f"{case} 512 output {i}")


def test_eval_mode_gradients_go_through_the_folded_batchnorms():
    model, x = build("uniformer_small_plus")
    fast = accelerate(copy.deepcopy(model).eval())
    ref_grads = gradients(model.double().eval(), x.double())
    for got, ref, what in zip(gradients(fast, x), ref_grads, ("d input", "d params")):
        assert_rel_close(got, ref, TOL, name=what)


@pytest.mark.parametrize("case", ["uniformer_small", "uniformer_xxs", "uniformer_small_video_split"])
def test_stochastic_depth_draws_the_reference_masks(case):
    """With a rate of 0.5 every block drops whole samples (video split: whole sequences); from the
    same seed the accelerated model draws the same masks in the same order."""
    model, x = build(case, drop_path_rate=0.5)
    fast = accelerate(copy.deepcopy(model).train())
    torch.manual_seed(3)
    got = gradients(fast, x)
    torch.manual_seed(3)
    ref = gradients(model.double().train(), x.double())
    for g, r, what in zip(got, ref, ("d input", "d params", "buffers")):
        assert_rel_close(g, r, TOL, name=f"{case} {what}")


def test_active_dropout_runs_the_reference_forward():
    """Blocks (and their MLPs) with dropout > 0 in training fall back to the reference forward:
    from the same seed, on the same input, they draw the same masks."""
    blocks = randomize_state_(nn.Sequential(
        um.CBlock(32, drop=0.2), um.SABlock(32, 2, qkv_bias=True, drop=0.2, attn_drop=0.1)))
    fast = accelerate(copy.deepcopy(blocks)).train()
    x = torch.randn(2, 32, 5, 4)
    torch.manual_seed(5)
    got = fast(x)
    torch.manual_seed(5)
    assert_rel_close(got, blocks.train()(x), 1e-6)


@pytest.mark.parametrize("rows", [3, 4096], ids=["mkl", "onednn"])  # both sides of the switch
@pytest.mark.parametrize("grad", [False, True])
def test_token_gemms_match_float64(rows, grad):
    """The GEMM helpers with their epilogues (bias, exact GELU, residual in place or not)."""
    g = torch.Generator().manual_seed(rows)
    x, w, b, res = (torch.randn(shape, generator=g) for shape in
                    ((rows, 96), (128, 96), (128,), (rows, 128)))
    for t in (x, w, b):
        t.requires_grad_(grad)
    exact_h = torch.nn.functional.gelu(x.double() @ w.double().t() + b.double())
    exact = res.double() + x.double() @ w.double().t() + b.double()
    with torch.set_grad_enabled(grad):
        assert_rel_close(gemm.linear(x, w, b, gelu=True), exact_h, 1e-5, name="linear+gelu")
        assert_rel_close(gemm.linear_add(x, w, b, res.clone(), inplace=True), exact, 1e-5,
                         name="linear_add")


# ---- backends, compile, autocast ---------------------------------------------------------------

def test_backend_is_forced_for_every_op_the_model_calls(monkeypatch):
    seen = []
    resolve = backends.resolve_backend

    def spy(device, supported=backends.BACKENDS, op="this op"):
        seen.append((op, backends.current_backend()))
        return resolve(device, supported, op)

    monkeypatch.setattr(backends, "resolve_backend", spy)
    model, x = build("uniformer_small")
    fast = accelerate(copy.deepcopy(model).eval(), backend="eager")
    with torch.no_grad():
        assert_rel_close(fast(x), model.double().eval()(x.double()), TOL)
    assert {op for op, _ in seen} == {"depthwise_conv", "pos_embed_norm", "attention"}
    assert {forced for _, forced in seen} == {"eager"}
    assert backends.current_backend() is None
    accelerate(fast)  # converting again resets the choice
    assert all(m.uk_backend is None for m in fast.modules() if isinstance(m, uknn.CBlock))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        accelerate(tiny_model(), backend="gpu")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_marks())])
def test_triton_backend_forced(backend):
    """Every op forced to Triton (compiled on a GPU, else the interpreter)."""
    model = tiny_model(features_only=True, hybrid=True, window_size=2).eval().to(TRITON_DEVICE)
    fast = accelerate(copy.deepcopy(model), backend=backend)
    x = torch.randn(2, 3, 48, 40).to(TRITON_DEVICE)
    with torch.no_grad():
        for out, ref in zip(fast(x), model.double()(x.double())):
            assert_rel_close(out, ref, TOL)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_marks() + (
    [pytest.mark.slow] if TRITON_DEVICE == "cpu" else []))])
def test_triton_backend_forced_trains(backend):
    model = tiny_model().train().to(TRITON_DEVICE)
    fast = accelerate(copy.deepcopy(model), backend=backend)
    x = torch.randn(2, 3, 64, 64).to(TRITON_DEVICE)  # stage 4 2x2: see IMAGE_INPUT
    for got, ref in zip(gradients(fast, x), gradients(model.double(), x.double())):
        assert_rel_close(got, ref, TOL)


def tiny_light_model() -> nn.Module:
    """A light model with token pruning in stages 3 and 4, one or two blocks per stage."""
    return randomize_state_(um.UniFormerLight(depth=(1, 1, 2, 1), embed_dim=(16, 32, 64, 64),
                                              head_dim=16, num_classes=10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["dense_hybrid", "light"])
def test_compile_fullgraph_traces_without_graph_breaks(kind, mode, device):
    """Dynamo and AOT autograd through every block: aot_eager on the CPU (no inductor C++ build
    here), inductor on CUDA (its generated kernels around ours)."""
    torch._dynamo.reset()
    if kind == "light":
        model, x = tiny_light_model(), torch.randn(2, 3, 64, 64)
    else:
        model, x = tiny_model(features_only=True, hybrid=True, window_size=2), torch.randn(2, 3, 48, 40)
    model, x = model.train(mode == "train").to(device), x.to(device)
    compiled = torch.compile(accelerate(copy.deepcopy(model)), fullgraph=True,
                             backend="inductor" if device == "cuda" else "aot_eager")
    if mode == "eval":
        with torch.no_grad():
            for out, ref in zip(outputs(compiled(x)), outputs(model.double()(x.double()))):
                assert_rel_close(out, ref, TOL)
    else:
        for got, ref in zip(gradients(compiled, x), gradients(model.double(), x.double())):
            assert_rel_close(got, ref, TOL)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=gpu_marks())])
def test_compile_with_inductor_matches(device):
    torch._dynamo.reset()
    model = tiny_model().eval().to(device)
    compiled = torch.compile(accelerate(copy.deepcopy(model)), fullgraph=True)
    x = torch.randn(2, 3, 32, 32).to(device)
    with torch.no_grad():
        assert_rel_close(compiled(x), model.double()(x.double()), TOL)


SIXTEEN_BIT_CASES = ["uniformer_small", "uniformer_xxs", "uniformer_small_video_split",
                     "dense_small_hybrid"]


def sixteen_bit_params(cpu_cases, cuda_cases=SIXTEEN_BIT_CASES):
    """(case, dtype, device): ``cpu_cases`` ((case, dtype, marks)) on the CPU, where 16-bit GEMMs
    are emulated on CPUs without AVX512-BF16/FP16 (slow); every 16-bit case on CUDA."""
    def name(case, dtype, device):
        return f"{case.replace('uniformer_', '')}-{str(dtype).replace('torch.', '')}-{device}"
    params = [pytest.param(case, dtype, "cpu", marks=marks, id=name(case, dtype, "cpu"))
              for case, dtype, marks in cpu_cases]
    params += [pytest.param(case, dtype, "cuda", marks=gpu_marks(), id=name(case, dtype, "cuda"))
               for case in cuda_cases for dtype in (torch.bfloat16, torch.float16)]
    return params


@pytest.mark.parametrize("case,dtype,device", sixteen_bit_params([
    ("uniformer_small", torch.bfloat16, []), ("uniformer_xxs", torch.bfloat16, []),
    ("uniformer_small_video_split", torch.bfloat16, [pytest.mark.slow]),
    ("uniformer_xxs", torch.float16, [pytest.mark.slow])]))
def test_autocast_training_is_as_accurate_as_the_reference(case, dtype, device):
    """Mixed precision (the light models too): forward and backward run, and the error against
    float64 is at most twice the reference's own under the same autocast."""
    model, x = build(case)
    model, x = model.to(device), x.to(device)
    fast = accelerate(copy.deepcopy(model).train())
    exact = gradients(copy.deepcopy(model).double().train(), x.double())
    results = {}
    for label, net in (("fast", fast), ("reference", model.train())):
        with torch.autocast(device, dtype=dtype):
            results[label] = gradients(net, x)
    for i, what in enumerate(("d input", "d params")):
        fast_err = rel_error(results["fast"][i], exact[i])
        ref_err = rel_error(results["reference"][i], exact[i])
        assert fast_err <= 2 * ref_err + 1e-6, f"{what}: {fast_err:.2e} vs reference {ref_err:.2e}"


# Token pruning (light models) keeps the tokens with the largest running class-attention score, and
# 16-bit rounding flips near-ties: measured on the CPU (xxs, bfloat16, random weights), the eager
# bfloat16 model keeps one different token per pruning block and lands 0.18 off float64, against
# 0.02 with pruning off, and the accelerated model does the same (0.18 and 0.02). A flipped token is
# a different but valid computation, not rounding, so the light models' numerics are compared here
# with pruning off (every block through the full-token path); autocast training above covers the
# pruning path against the reference's own 16-bit error.
@pytest.mark.parametrize("case,dtype,device", sixteen_bit_params(
    [("uniformer_small", torch.bfloat16, []), ("uniformer_xxs", torch.bfloat16, [])]))
def test_16bit_model_matches_float64_reference(case, dtype, device):
    """A model converted to float16/bfloat16 (weights and input), eval: its outputs against the
    float64 reference within the dtype's contract, or, where the eager model in the same dtype
    cannot reach it (errors add up over the blocks), within twice that model's own error."""
    model, x = build(case)
    model, x = model.to(device).eval(), x.to(device)
    pruning_blocks = [m for m in model.modules() if getattr(m, "prune_ratio", 1) != 1]
    assert (case == "uniformer_xxs") == bool(pruning_blocks)
    for block in pruning_blocks:
        block.prune_ratio = 1.0
    fast = accelerate(copy.deepcopy(model).to(dtype))
    with torch.no_grad():
        exact = outputs(copy.deepcopy(model).double()(x.double()))
        got = outputs(fast(x.to(dtype)))
        eager = outputs(model.to(dtype)(x.to(dtype)))
    for i, (out, ref, same_dtype) in enumerate(zip(got, exact, eager)):
        assert out.dtype == dtype
        err, eager_err = rel_error(out, ref), rel_error(same_dtype, ref)
        bound = max(tolerance(dtype, "model"), 2 * eager_err)
        assert err <= bound, f"{case} output {i}: {err:.2e} > {bound:.2e} (eager {eager_err:.2e})"


# ---- what conversion does and does not change --------------------------------------------------

def test_blocks_and_stems_are_converted_and_activations_stay_channels_last():
    model, x = build("uniformer_small_plus")
    fast = accelerate(model.eval())
    kinds = {type(m) for m in fast.modules()}
    assert {uknn.CBlock, uknn.SABlock, uknn.head_embedding, uknn.middle_embedding, uknn.CMlp,
            uknn.Mlp} <= kinds
    formats = []
    for m in list(fast.blocks1) + list(fast.blocks3) + [fast.patch_embed1, fast.patch_embed3]:
        m.register_forward_hook(
            lambda mod, args, out: formats.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        fast(x)
    assert formats and all(formats)


def test_state_dict_keys_values_and_strict_loading_are_unchanged():
    model, x = build("uniformer_xxs")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = accelerate(copy.deepcopy(model))
    after = fast.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # checkpoints load strictly both ways, and a loaded state takes effect (folding is per call)
    other = randomize_state_(copy.deepcopy(model), seed=7)
    fast.load_state_dict(other.state_dict(), strict=True)
    model.load_state_dict(fast.state_dict(), strict=True)
    with torch.no_grad():
        assert_rel_close(fast.eval()(x), other.double().eval()(x.double()), TOL)


@pytest.mark.parametrize("name", ["uniformer_xxs", "uniformer_small_video"])
def test_stem_weights_cached_channels_last_follow_every_change(name):
    """The stems convolve channels-last maps with a channels-last copy of their (folded) weight,
    cached without autograd: a load_state_dict, an in-place update of a weight or of a BatchNorm
    statistic takes effect on the next call; the parameters keep their layout (FSDP2 needs it)."""
    model, x = build(name)
    fast = accelerate(copy.deepcopy(model).eval())
    model.eval()
    stem_convs = [c for m in fast.modules()
                  if isinstance(m, (uknn.PatchEmbed, uknn.head_embedding, uknn.middle_embedding))
                  for c in m.modules() if isinstance(c, (nn.Conv2d, nn.Conv3d))]
    assert stem_convs
    with torch.no_grad():
        assert_rel_close(fast(x), model.double()(x.double()), TOL)
        assert all("_uk_channels_last_weight" in c.__dict__ for c in stem_convs)
        cached = stem_convs[0].__dict__["_uk_channels_last_weight"][1]
        fmt = torch.channels_last if cached.dim() == 4 else torch.channels_last_3d
        assert cached.is_contiguous(memory_format=fmt)
        assert all(c.weight.is_contiguous() for c in stem_convs)
        # a new state, then in-place updates of a stem weight and of a running statistic
        other = randomize_state_(copy.deepcopy(model), seed=3)
        fast.load_state_dict(other.state_dict(), strict=True)
        assert_rel_close(fast(x), other.double()(x.double()), TOL)
        stem_convs[-1].weight.mul_(1.5)
        other_stems = [c for n, c in other.named_modules() if isinstance(c, (nn.Conv2d, nn.Conv3d))
                       and ("patch_embed" in n or "embedding" in n)]
        other_stems[-1].weight.mul_(1.5)
        for bn_fast, bn_other in zip((m for m in fast.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)),
                                     (m for m in other.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))):
            bn_fast.running_var.mul_(2.0)
            bn_other.running_var.mul_(2.0)
        assert_rel_close(fast(x), other.double()(x.double()), TOL)
    # with autograd the weight itself is used: its gradient arrives
    fast(x).float().sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in stem_convs)


def test_accelerate_modifies_no_parameter():
    model, x = build("uniformer_small_plus")
    fast = accelerate(model.eval())
    snapshot = {n: (p.detach().clone(), p._version) for n, p in fast.named_parameters()}
    buffers = {n: b.clone() for n, b in fast.named_buffers()}
    with torch.no_grad():
        fast(x)
    for name, p in fast.named_parameters():
        assert p._version == snapshot[name][1] and torch.equal(p, snapshot[name][0]), name
    assert all(torch.equal(b, buffers[n]) for n, b in fast.named_buffers())


def test_accelerate_is_idempotent_and_returns_the_model():
    model, x = build("uniformer_small_video_split")
    fast = accelerate(model.eval())
    assert fast is model
    classes = [type(m) for m in fast.modules()]
    with torch.no_grad():
        first = fast(x)
        assert accelerate(fast) is fast
        assert [type(m) for m in fast.modules()] == classes
        torch.testing.assert_close(fast(x), first, rtol=0, atol=0)


def test_drop_in_modules_can_be_built_directly():
    block = randomize_state_(uknn.CBlock(32, layer_scale=0.5)).eval()
    reference = um.CBlock(32, layer_scale=0.5).eval()
    reference.load_state_dict(block.state_dict(), strict=True)
    assert isinstance(block, um.CBlock)
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        assert_rel_close(block(x), reference.double()(x.double()), TOL)


# ---- trees from other code (matched by structure) ----------------------------------------------

class OfficialCBlock(nn.Module):
    """The official image code's CBlock, written out: same attributes, no ``ls`` flag."""

    def __init__(self, dim):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = um.CMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OfficialSABlock(nn.Module):
    """The official SABlock with the global layer-scale flag on: gammas, no ``ls`` attribute."""

    def __init__(self, dim, heads):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = um.Attention(dim, heads, qkv_bias=True)
        self.drop_path = DropPath(0.0)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = um.Mlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(torch.ones(dim))
        self.gamma_2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)


class OfficialPatchEmbed(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.img_size, self.patch_size = (224, 224), (2, 2)
        self.proj = nn.Conv2d(cin, cout, 2, stride=2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x):
        x = self.proj(x)
        B, C, H, W = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()


def test_trees_from_other_code_convert_by_structure():
    tree = randomize_state_(nn.Sequential(
        OfficialPatchEmbed(3, 32), OfficialCBlock(32), OfficialSABlock(32, 2))).train()
    fast = accelerate(copy.deepcopy(tree))
    assert [type(m) for m in fast] == [uknn.PatchEmbed, uknn.CBlock, uknn.SABlock]
    assert fast[1].uk_reference_class is OfficialCBlock
    x = torch.randn(2, 3, 18, 14)
    for got, ref in zip(gradients(fast, x), gradients(tree.double(), x.double())):
        assert_rel_close(got, ref, TOL)
    with torch.no_grad():
        assert_rel_close(fast.eval()(x), tree.eval()(x.double()), TOL)


class LayerNormCBlock(OfficialCBlock):
    def __init__(self, dim):
        super().__init__(dim)
        self.norm1 = nn.LayerNorm(dim)


class GlobalsAttention(um.Attention):
    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.trade_off = 0.5


class NoMixerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.mlp = um.Mlp(dim, dim)


@pytest.mark.parametrize("block,match", [
    (LayerNormCBlock(32), r"'1' \(.*LayerNormCBlock\).*norm1 is not an affine BatchNorm"),
    (nn.Sequential(NoMixerBlock(32)), r"'1\.0' \(.*NoMixerBlock\).*no conv1 \(CBlock\) or attn"),
], ids=["layernorm-cblock", "no-mixer"])
def test_unconvertible_module_is_named_and_nothing_changes(block, match):
    tree = nn.Sequential(OfficialCBlock(32), block)
    with pytest.raises(ValueError, match=match):
        accelerate(tree)
    assert type(tree[0]) is OfficialCBlock  # checked before anything was converted


def test_official_light_attention_inside_a_block_is_refused():
    block = OfficialSABlock(32, 2)
    block.attn = GlobalsAttention(32, 2)
    with pytest.raises(ValueError, match="updates module-level token scores"):
        accelerate(block)
