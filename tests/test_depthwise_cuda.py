"""The CUDA kernels of ops 1 and 2 (csrc/cuda: depthwise_conv, pos_embed_norm) on a GPU: against a
float64 eager reference and against the Triton backend, forward and every gradient, every kernel
size UniFormer uses, odd sizes, few and many channels, both memory formats, sliced inputs, float32 /
float16 / bfloat16; poisoned outputs, deterministic weight gradients, bad direct calls, and a tensor
past 2^31 elements (64-bit indexing).

Every test needs a CUDA GPU and the extension built with its CUDA kernels; without them the whole
file is skipped (CI has no GPU: there the sources are only compile-checked).
"""
import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

import uniformer_kernels as uk
from uniformer_kernels.testing import assert_rel_close, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (spatial size, kernel size): every kernel of DESIGN, odd spatial sizes, sizes below the kernel.
CASES = [
    ((9, 13), (3, 3)), ((7, 9), (5, 5)), ((15, 17), (7, 7)), ((2, 3), (7, 7)),
    ((3, 7, 9), (3, 3, 3)), ((5, 6, 7), (5, 5, 5)), ((4, 7, 9), (1, 5, 5)), ((5, 6, 7), (3, 1, 1)),
    ((3, 9, 7), (3, 5, 1)),  # no specialised kernel: the run-time-size one
]

# (batch, channels, channels-last?, bias?, residual?): channels that are and are not a multiple of
# the vector width (scalar and vectorised kernels), batch 1, both memory formats.
LAYOUTS = [(2, 37, False, True, False), (1, 64, True, False, True), (1, 3, True, True, True)]


@pytest.fixture(autouse=True)
def cuda_backend_available(monkeypatch):
    monkeypatch.delenv(uk.backends.ENV_VAR, raising=False)
    ok, reason = uk.available_backends(DEVICE)["cuda"]
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")


def triton_on_gpu() -> bool:
    return uk.available_backends(DEVICE)["triton"][0]


def kernels():
    """The compiled ops (their CUDA implementations for CUDA tensors)."""
    return torch.ops.uniformer_kernels_C


def channels_last(dims):
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def make_inputs(batch, channels, spatial, kernel, dtype=torch.float32, channels_last_input=False,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=gen).to(DEVICE, dtype)
    if channels_last_input:
        x = x.contiguous(memory_format=channels_last(x.dim()))
    weight = (torch.randn(channels, 1, *kernel, generator=gen) / len(kernel)).to(DEVICE, dtype)
    bias = torch.randn(channels, generator=gen).to(DEVICE, dtype)
    return x, weight, bias


def norm_params(channels, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return ((1 + 0.5 * torch.randn(channels, generator=gen)).to(DEVICE, dtype),
            torch.randn(channels, generator=gen).to(DEVICE, dtype))


def reference_conv(x, weight, bias, residual):
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    y = conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=x.shape[1])
    return y + x if residual else y


def reference_norm(y, norm_weight, norm_bias, norm, eps=1e-6):
    if norm == "affine":
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * norm_weight.view(shape) + norm_bias.view(shape)
    return F.layer_norm(y.movedim(1, -1), (y.shape[1],), norm_weight, norm_bias, eps).movedim(-1, 1)


def outputs_and_grads(fn, inputs, grad_outputs):
    """fn(*inputs) and the gradients of every input (None inputs pass through, get no gradient)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    with_grad = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outputs, with_grad, grad_outputs)
    return [t.detach() for t in outputs], list(grads)


def run_depthwise(backend, x, weight, bias, residual, grad_y):
    """Outputs [y, grad_x, grad_weight(, grad_bias)] on ``backend`` (float64 reference: 'reference')."""
    if backend == "reference":
        inputs = [None if t is None else t.double() for t in (x, weight, bias)]
        outs, grads = outputs_and_grads(lambda *t: reference_conv(*t, residual), inputs,
                                        grad_y.double())
        return outs + grads
    with uk.backend(backend):
        outs, grads = outputs_and_grads(
            lambda x, w, b: uk.ops.depthwise_conv(x, w, b, residual=residual), (x, weight, bias),
            grad_y)
    return outs + grads


def run_pos_embed_norm(backend, x, weight, bias, norm_weight, norm_bias, norm, grad_y, grad_z):
    """[y, z, grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias]."""
    inputs = (x, weight, bias, norm_weight, norm_bias)
    if backend == "reference":
        def fn(x, w, b, nw, nb):
            y = reference_conv(x, w, b, residual=True)
            return y, reference_norm(y, nw, nb, norm)
        outs, grads = outputs_and_grads(fn, [t.double() for t in inputs],
                                        (grad_y.double(), grad_z.double()))
        return outs + grads
    with uk.backend(backend):
        outs, grads = outputs_and_grads(
            lambda *t: uk.ops.pos_embed_norm(*t, norm=norm, eps=1e-6), inputs, (grad_y, grad_z))
    return outs + grads


DEPTHWISE_NAMES = ("y", "grad_x", "grad_weight", "grad_bias")
POS_EMBED_NAMES = ("y", "z", "grad_x", "grad_weight", "grad_bias", "grad_norm_weight",
                   "grad_norm_bias")


def check_depthwise(x, weight, bias, residual, against_triton=True):
    """cuda vs float64 (contract tolerance) and vs Triton (twice that: both carry rounding error)."""
    tol = tolerance(x.dtype, "conv")
    grad_y = torch.randn_like(x)
    got = run_depthwise("cuda", x, weight, bias, residual, grad_y)
    y = got[0]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=uk.ops._depthwise_common.memory_format_of(x))
    names = DEPTHWISE_NAMES if bias is not None else DEPTHWISE_NAMES[:3]
    for name, out, ref in zip(names, got, run_depthwise("reference", x, weight, bias, residual,
                                                        grad_y)):
        assert out.dtype == x.dtype, name
        assert_rel_close(out, ref, tol, f"{name} vs float64")
    if against_triton and triton_on_gpu():
        for name, out, ref in zip(names, got, run_depthwise("triton", x, weight, bias, residual,
                                                            grad_y)):
            assert_rel_close(out, ref, 2 * tol, f"{name} vs triton")


def check_pos_embed_norm(x, weight, bias, norm):
    tol = tolerance(x.dtype, "norm")
    norm_weight, norm_bias = norm_params(x.shape[1], x.dtype)
    grad_y, grad_z = torch.randn_like(x), torch.randn_like(x)
    args = (x, weight, bias, norm_weight, norm_bias, norm, grad_y, grad_z)
    got = run_pos_embed_norm("cuda", *args)
    fmt = uk.ops._depthwise_common.memory_format_of(x)
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    for name, out, ref in zip(POS_EMBED_NAMES, got, run_pos_embed_norm("reference", *args)):
        assert_rel_close(out, ref, tol, f"{name} vs float64")
    if triton_on_gpu():
        for name, out, ref in zip(POS_EMBED_NAMES, got, run_pos_embed_norm("triton", *args)):
            assert_rel_close(out, ref, 2 * tol, f"{name} vs triton")


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty (ours included: the binding allocates with at::empty) returns NaN-filled
    memory, so an output element or scratch partial sum a kernel forgets to write fails the
    comparison. Uses torch's deterministic mode, whose fill_uninitialized_memory does exactly this;
    it also makes the ops pick the deterministic weight-gradient reduction. More reliable than
    freeing a NaN block and hoping the caching allocator hands the same one back."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(1024, device=DEVICE).isnan().all(), "poisoning is not active"
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        torch.use_deterministic_algorithms(was_deterministic)


# ---- depthwise_conv ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial,kernel", CASES, ids=lambda v: "x".join(map(str, v)))
def test_depthwise_conv_matches_float64_and_triton(spatial, kernel, dtype):
    for seed, (batch, channels, cl, with_bias, residual) in enumerate(LAYOUTS):
        x, weight, bias = make_inputs(batch, channels, spatial, kernel, dtype, cl, seed)
        check_depthwise(x, weight, bias if with_bias else None, residual)


def test_depthwise_conv_float64():
    x, weight, bias = make_inputs(2, 11, (3, 7, 9), (3, 3, 3), torch.float64)
    check_depthwise(x, weight, bias, residual=True, against_triton=False)
    x, weight, bias = make_inputs(2, 16, (9, 13), (5, 5), torch.float64, channels_last_input=True)
    check_depthwise(x, weight, bias, residual=False, against_triton=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depthwise_conv_sliced_inputs(dtype):
    """Non-contiguous views: a channel and spatial slice of a channels-last tensor (so neither
    format is contiguous) and a transposed one."""
    x_big, weight, bias = make_inputs(2, 40, (11, 19), (3, 3), dtype, channels_last_input=True)
    x = x_big[:, 3:40, 1:-1, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    check_depthwise(x, weight[3:40], bias[3:40], residual=True)
    check_depthwise(x_big.transpose(2, 3), weight.transpose(2, 3), bias, residual=False)
    x3, weight3, bias3 = make_inputs(1, 24, (5, 9, 11), (3, 3, 3), dtype, channels_last_input=True)
    check_depthwise(x3[:, :, 1:, :, 2:], weight3, bias3, residual=True)


# UniFormer's shapes (S stages at 224, video S stage 1 at 8x224): the vectorised, specialised
# kernels at realistic sizes, and many row chunks in the weight-gradient reduction.
REAL_SHAPES = [
    ((2, 64, 56, 56), (3, 3)), ((2, 64, 56, 56), (5, 5)), ((2, 128, 28, 28), (5, 5)),
    ((2, 320, 14, 14), (3, 3)), ((2, 512, 7, 7), (3, 3)), ((1, 64, 8, 56, 56), (5, 5, 5)),
    ((1, 64, 8, 56, 56), (3, 3, 3)), ((1, 128, 4, 28, 28), (1, 5, 5)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kernel", REAL_SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_depthwise_conv_on_uniformer_shapes(shape, kernel, dtype):
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], kernel, dtype,
                                  channels_last_input=True)
    check_depthwise(x, weight, bias, residual=kernel[-1] == 3)


# ---- pos_embed_norm ------------------------------------------------------------------------------

# Channel counts: fewer than a warp (several pixels per warp), not a multiple of the vector width
# (scalar kernel), several channel rounds per lane (320, 520), UniFormer's 64 / 512.
POS_EMBED_SHAPES = [
    ((2, 37, 9, 13), True), ((1, 64, 7, 7), False), ((2, 320, 14, 14), True),
    ((1, 520, 5, 9), True), ((1, 20, 3, 5, 7), False), ((1, 64, 4, 9, 7), True),
    ((1, 3, 15, 17), False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["layernorm", "affine"])
@pytest.mark.parametrize("shape,cl", POS_EMBED_SHAPES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else ("channels_last" if v else "contiguous"))
def test_pos_embed_norm_matches_float64_and_triton(shape, cl, norm, dtype):
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], (3,) * (len(shape) - 2), dtype, cl)
    check_pos_embed_norm(x, weight, bias, norm)


@pytest.mark.parametrize("norm", ["layernorm", "affine"])
def test_pos_embed_norm_other_kernel_sizes_and_sliced_input(norm):
    """Kernel sizes without a specialisation (the run-time-size kernel) and a sliced input."""
    x, weight, bias = make_inputs(2, 48, (9, 11), (5, 5), channels_last_input=True)
    check_pos_embed_norm(x, weight, bias, norm)
    x, weight, bias = make_inputs(1, 40, (5, 7, 9), (1, 3, 3), channels_last_input=True)
    check_pos_embed_norm(x[:, 4:, :, 1:], weight[4:], bias[4:], norm)


def test_pos_embed_norm_layernorm_with_a_large_mean():
    """Pixels whose mean (~100) is large against their spread (~2): a one-pass E[y^2] - mean^2
    float32 variance misses the float32 tolerance here by ~15x (checked in a host emulation of the
    kernel); the kernel's two-pass one stays ~3x inside it."""
    x, weight, bias = make_inputs(2, 64, (9, 13), (3, 3), channels_last_input=True)
    check_pos_embed_norm(x, weight, bias + 100, "layernorm")


def test_pos_embed_norm_float64():
    x, weight, bias = make_inputs(1, 24, (3, 7, 9), (3, 3, 3), torch.float64)
    norm_weight, norm_bias = norm_params(24, torch.float64)
    grad_y, grad_z = torch.randn_like(x), torch.randn_like(x)
    for norm in ("layernorm", "affine"):
        args = (x, weight, bias, norm_weight, norm_bias, norm, grad_y, grad_z)
        for name, out, ref in zip(POS_EMBED_NAMES, run_pos_embed_norm("cuda", *args),
                                  run_pos_embed_norm("reference", *args)):
            assert_rel_close(out, ref, 1e-12, name)


# ---- poisoned outputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_output_element_is_left_unwritten(dtype):
    """With every allocation NaN-filled, the internal ops' outputs (y, grad_weight, grad_bias and
    the deterministic reduction's partial sums; y, z, mean, rstd) hold no NaN and match the
    reference, on shapes whose last W tile, channel vector and row chunk are partial."""
    ops = kernels()
    for spatial, kernel in [((1, 9, 13), (1, 3, 3)), ((3, 7, 9), (3, 3, 3)), ((5, 6, 7), (5, 5, 5)),
                            ((3, 9, 7), (3, 5, 1))]:
        for channels in (37, 64):
            x, weight, bias = make_inputs(2, channels, spatial, kernel, dtype)
            x5 = x.permute(0, 2, 3, 4, 1).contiguous()
            w5 = weight.float().flatten(0, 1).permute(1, 2, 3, 0).contiguous()
            b = bias.float()
            grad_y5 = torch.randn_like(x5)
            norm_weight, norm_bias = (t.float() for t in norm_params(channels, dtype))
            with poisoned_allocations():
                y5 = ops.depthwise_conv_forward(x5, w5, b, True)
                grad_w5, grad_b = ops.depthwise_conv_backward_weight(grad_y5, x5, list(kernel), True)
                pe = {norm: ops.pos_embed_norm_forward(x5, w5, b, norm_weight, norm_bias, code, 1e-6)
                      for norm, code in (("layernorm", 0), ("affine", 1))}
            tol = tolerance(dtype, "conv")
            ref = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
            y_ref = reference_conv(*ref, residual=True)
            grad_w_ref, grad_b_ref = torch.autograd.grad(
                y_ref, ref[1:], grad_y5.permute(0, 4, 1, 2, 3).double())
            assert_rel_close(y5.permute(0, 4, 1, 2, 3), y_ref, tol, "y")
            assert_rel_close(grad_w5.permute(3, 0, 1, 2).unsqueeze(1), grad_w_ref, tol, "grad_w")
            assert_rel_close(grad_b, grad_b_ref, tol, "grad_b")
            for norm, (y_pe, z_pe, mean, rstd) in pe.items():
                z_ref = reference_norm(y_ref, norm_weight.double(), norm_bias.double(), norm)
                assert_rel_close(y_pe.permute(0, 4, 1, 2, 3), y_ref, tol, f"{norm} y")
                assert_rel_close(z_pe.permute(0, 4, 1, 2, 3), z_ref, tol, f"{norm} z")
                if norm == "layernorm":
                    pixels = y_ref.detach().movedim(1, -1).reshape(-1, channels)
                    var, mean_ref = torch.var_mean(pixels, dim=1, correction=0)
                    assert_rel_close(mean, mean_ref, tol, "mean")
                    assert_rel_close(rstd, torch.rsqrt(var + 1e-6), tol, "rstd")
                else:
                    assert mean.numel() == 0 and rstd.numel() == 0


def test_public_ops_under_poisoned_allocations():
    """The whole public path (layout changes, kernels, backward composition) under NaN-filled
    allocations; the float64 reference runs outside, as deterministic mode may refuse some of its
    CUDA ops."""
    x, weight, bias = make_inputs(2, 37, (3, 7, 9), (3, 3, 3), channels_last_input=True)
    norm_weight, norm_bias = norm_params(37, x.dtype)
    grad_y, grad_z = torch.randn_like(x), torch.randn_like(x)
    pe_args = (x, weight, bias, norm_weight, norm_bias, "layernorm", grad_y, grad_z)
    with poisoned_allocations():
        conv = run_depthwise("cuda", x, weight, bias, True, grad_y)
        pos_embed = run_pos_embed_norm("cuda", *pe_args)
    tol = tolerance(x.dtype, "conv")
    for name, out, ref in zip(DEPTHWISE_NAMES, conv,
                              run_depthwise("reference", x, weight, bias, True, grad_y)):
        assert_rel_close(out, ref, tol, name)
    for name, out, ref in zip(POS_EMBED_NAMES, pos_embed, run_pos_embed_norm("reference", *pe_args)):
        assert_rel_close(out, ref, tol, name)


# ---- the weight-gradient reduction ---------------------------------------------------------------

@pytest.mark.parametrize("kernel", [(1, 3, 3), (3, 3, 3), (5, 5, 5), (1, 7, 7), (3, 1, 1),
                                    (3, 5, 1)], ids=lambda k: "x".join(map(str, k)))
def test_deterministic_weight_gradient_is_bitwise_reproducible(kernel):
    ops = kernels()
    gen = torch.Generator().manual_seed(0)
    # Enough rows for many chunks, so the reduction order matters.
    x5 = torch.randn(4, 8, 56, 56, 40, generator=gen).to(DEVICE)
    grad_y5 = torch.randn(4, 8, 56, 56, 40, generator=gen).to(DEVICE)
    first = ops.depthwise_conv_backward_weight(grad_y5, x5, list(kernel), True)
    second = ops.depthwise_conv_backward_weight(grad_y5, x5, list(kernel), True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    atomic = ops.depthwise_conv_backward_weight(grad_y5, x5, list(kernel), False)
    assert_rel_close(atomic[0], first[0].double(), 1e-5, "atomic grad_weight")
    assert_rel_close(atomic[1], first[1].double(), 1e-5, "atomic grad_bias")


def test_public_op_weight_gradient_is_deterministic_in_deterministic_mode():
    x, weight, bias = make_inputs(2, 64, (8, 28, 28), (3, 3, 3), channels_last_input=True)
    grad_y = torch.randn_like(x)
    with poisoned_allocations():
        first = run_depthwise("cuda", x, weight, bias, False, grad_y)
        second = run_depthwise("cuda", x, weight, bias, False, grad_y)
    for name, a, b in zip(DEPTHWISE_NAMES, first, second):
        assert torch.equal(a, b), name


# ---- bad direct calls ----------------------------------------------------------------------------

BAD_CALLS = {
    # name: (call taking fresh valid arguments, part of the error message)
    "non-contiguous x": (lambda a: a.fwd(a.x.transpose(2, 3), a.w, a.b, False), "contiguous"),
    "4-D x": (lambda a: a.fwd(a.x[0], a.w, a.b, False), "5-D"),
    "channel mismatch": (lambda a: a.fwd(a.x, a.w[..., :4], a.b, False), "weight must have shape"),
    "even kernel": (lambda a: a.fwd(a.x, a.w.new_zeros(1, 2, 3, 8), a.b, False), "odd"),
    "kernel above 7": (lambda a: a.fwd(a.x, a.w.new_zeros(1, 9, 9, 8), a.b, False), "odd"),
    "weight dtype": (lambda a: a.fwd(a.x, a.w.double(), a.b, False), "weight must be Float"),
    "half weight for half x": (lambda a: a.fwd(a.x.half(), a.w.half(), None, False),
                               "weight must be Float"),
    "weight on the CPU": (lambda a: a.fwd(a.x, a.w.cpu(), a.b, False), "weight is on cpu"),
    "bias shape": (lambda a: a.fwd(a.x, a.w, a.b[:4], False), "bias must have shape"),
    "integer x": (lambda a: a.fwd(a.x.int(), a.w, a.b, False), "x must be float32"),
    "grad_y shape": (lambda a: a.bwd(a.x[:, :, :4], a.x, [1, 3, 3], True), "grad_y has shape"),
    "grad_y dtype": (lambda a: a.bwd(a.x.double(), a.x, [1, 3, 3], True), "grad_y is Double"),
    "kernel size rank": (lambda a: a.bwd(a.x, a.x, [3, 3], True), r"\[KD, KH, KW\]"),
    "kernel size even": (lambda a: a.bwd(a.x, a.x, [1, 4, 3], False), "odd"),
    "norm code": (lambda a: a.pen(a.x, a.w, a.b, a.ones, a.zeros, 2, 1e-6), "norm must be 0"),
    "norm_weight shape": (lambda a: a.pen(a.x, a.w, a.b, a.ones[:3], a.zeros, 0, 1e-6),
                          "norm_weight must have shape"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_internal_ops_reject_bad_calls(name):
    """The CUDA implementations check what keeps a bad direct call from touching memory out of
    bounds (the public ops check everything earlier, with ValueError / TypeError)."""
    call, message = BAD_CALLS[name]
    ops = kernels()
    valid = types.SimpleNamespace(
        x=torch.randn(1, 1, 5, 7, 8, device=DEVICE), w=torch.randn(1, 3, 3, 8, device=DEVICE),
        b=torch.randn(8, device=DEVICE), ones=torch.ones(8, device=DEVICE),
        zeros=torch.zeros(8, device=DEVICE), fwd=ops.depthwise_conv_forward,
        bwd=ops.depthwise_conv_backward_weight, pen=ops.pos_embed_norm_forward)
    with pytest.raises(RuntimeError, match=message):
        call(valid)


# ---- 64-bit indexing -----------------------------------------------------------------------------

def free_gpu_bytes():
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def test_tensor_past_2_to_the_31_elements():
    """(N, C, D, H, W) = (1, 1040, 2, 1024, 1024) bfloat16, channels-last: 2.18e9 elements, so the
    offsets of the last rows pass 2^31 and the kernels must index in 64 bits. The reference is
    computed on slabs at both ends; the gradient of y is nonzero only in the last rows, so the
    weight gradient reads only x past 2^31 and its reference needs only that slab."""
    n, c, d, h, w = 1, 1040, 2, 1024, 1024
    assert n * c * d * h * w > 2**31
    if free_gpu_bytes() < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.empty(n, d, h, w, c, device=DEVICE, dtype=torch.bfloat16).normal_(generator=gen)
    x = x.permute(0, 4, 1, 2, 3)  # (N, C, D, H, W) view, channels_last_3d
    weight = (torch.randn(c, 1, 3, 3, 3, device=DEVICE, generator=gen) / 3).bfloat16()
    bias = torch.randn(c, device=DEVICE, generator=gen).bfloat16()
    tol = tolerance(torch.bfloat16, "conv")
    w64, b64 = weight.double(), bias.double()
    rows = 8  # rows of H checked at each end

    with uk.backend("cuda"), torch.no_grad():
        y = uk.ops.depthwise_conv(x, weight, bias)
    top = F.conv3d(F.pad(x[:, :, :, :rows + 1].double(), (0, 0, 1, 0)), w64, b64,
                   padding=(1, 0, 1), groups=c)[:, :, :, :rows]
    assert_rel_close(y[:, :, :, :rows], top, tol, "y, first rows")
    bottom = F.conv3d(F.pad(x[:, :, :, -rows - 1:].double(), (0, 0, 0, 1)), w64, b64,
                      padding=(1, 0, 1), groups=c)
    assert_rel_close(y[:, :, :, -rows:], bottom, tol, "y, last rows")
    del y, top, bottom

    grad_y = torch.zeros_like(x)
    grad_y[:, :, :, -rows:] = torch.randn(n, c, d, rows, w, device=DEVICE, generator=gen).bfloat16()
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    with uk.backend("cuda"):
        y = uk.ops.depthwise_conv(*leaves)
        grad_x, grad_weight, grad_bias = torch.autograd.grad(y, leaves, grad_y)
    del y
    x_slab = x[:, :, :, -rows - 1:].double().requires_grad_()
    ref = [x_slab, w64.requires_grad_(), b64.requires_grad_()]
    y_slab = F.conv3d(F.pad(x_slab, (0, 0, 0, 1)), ref[1], ref[2], padding=(1, 0, 1), groups=c)
    grads_ref = torch.autograd.grad(y_slab, ref, grad_y[:, :, :, -rows:].double())
    assert_rel_close(grad_x[:, :, :, -rows - 1:], grads_ref[0], tol, "grad_x, last rows")
    assert grad_x[:, :, :, :h - rows - 1].abs().amax().item() == 0, "grad_x outside the last rows"
    assert_rel_close(grad_weight, grads_ref[1], tol, "grad_weight")
    assert_rel_close(grad_bias, grads_ref[2], tol, "grad_bias")
