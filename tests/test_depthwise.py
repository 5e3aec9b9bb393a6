"""Ops 1 and 2 (depthwise_conv, pos_embed_norm) on every backend this machine runs: the C++ CPU
kernels natively (real UniFormer shapes included), Triton (compiled on a GPU, else in its
interpreter on small shapes), the CUDA kernels on a GPU, and the eager composition; all against a
float64 eager reference, forward and every gradient. The GPU cases carry the ``gpu`` marker; the
CUDA kernels' own file (test_depthwise_cuda.py) adds real shapes, poisoning and bad direct calls."""
import contextlib
import importlib
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import uniformer_kernels as uk
from uniformer_kernels import _extension, backends
from uniformer_kernels.ops import _device_guard
from uniformer_kernels.testing import (assert_rel_close, gpu_marks, run_with_poisoned_malloc,
                                       tolerance, triton_marks, triton_test_device,
                                       triton_test_dtypes)

ENV = backends.ENV_VAR
TRITON_DEVICE = triton_test_device()[0]  # "cuda" (compiled), "cpu" (interpreter) or None

BACKENDS = [
    "eager",
    pytest.param("cpu", marks=pytest.mark.skipif(not _extension.loaded(),
                                                 reason="uniformer_kernels._C not built")),
    pytest.param("triton", marks=triton_marks()),
    pytest.param("cuda", marks=gpu_marks()),
]


def device_of(backend: str) -> str:
    """Where ``backend``'s tests put their tensors; skips when the cuda backend is missing."""
    if backend == "cuda":
        ok, reason = uk.available_backends("cuda")["cuda"]
        if not ok:
            pytest.skip(f"cuda backend unavailable: {reason}")
        return "cuda"
    return TRITON_DEVICE if backend == "triton" else "cpu"


def skip_unless_dtype_runs(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype not in triton_test_dtypes(TRITON_DEVICE):
        pytest.skip(f"the Triton interpreter mishandles {dtype} (DESIGN: float32/float16 there)")

# (spatial size, kernel size): odd sizes, sizes smaller than the kernel, every kernel of DESIGN.
CASES = [
    ((9, 13), (3, 3)), ((7, 9), (5, 5)), ((15, 17), (7, 7)), ((13, 5), (3, 3)), ((2, 3), (7, 7)),
    ((3, 7, 9), (3, 3, 3)), ((5, 6, 7), (5, 5, 5)), ((4, 7, 9), (1, 5, 5)), ((4, 7, 9), (1, 3, 3)),
    ((5, 6, 7), (3, 1, 1)),
]


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def channels_last(dims):
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def make_inputs(batch, channels, spatial, kernel, dtype=torch.float32, memory_format=None, seed=0,
                device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=gen).to(device, dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    weight = (torch.randn(channels, 1, *kernel, generator=gen) / len(kernel)).to(device, dtype)
    bias = torch.randn(channels, generator=gen).to(device, dtype)
    return x, weight, bias


def reference_conv(x, weight, bias, residual):
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    y = conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=x.shape[1])
    return y + x if residual else y


def reference_norm(y, norm_weight, norm_bias, norm, eps=1e-6):
    if norm == "affine":
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * norm_weight.view(shape) + norm_bias.view(shape)
    return F.layer_norm(y.movedim(1, -1), (y.shape[1],), norm_weight, norm_bias, eps).movedim(-1, 1)


def grads_of(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def check_depthwise(backend, x, weight, bias, residual, kind="conv"):
    """Ours on ``backend`` vs the float64 reference: output, memory format and all three grads."""
    tol = tolerance(x.dtype, kind)
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    with uk.backend(backend):
        y = uk.ops.depthwise_conv(leaves[0], leaves[1], leaves[2] if bias is not None else None,
                                  residual=residual)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = reference_conv(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias is not None else None,
                           residual)
    assert y.shape == x.shape and y.dtype == x.dtype
    expected_format = uk.ops._depthwise_common.memory_format_of(x)
    assert y.is_contiguous(memory_format=expected_format)
    assert_rel_close(y, y_ref, tol, "y")
    grad_y = torch.randn_like(y_ref)
    with uk.backend(backend):
        grads = grads_of(y, leaves, grad_y.to(y.dtype))
    for name, got, want in zip(("grad_x", "grad_weight", "grad_bias"), grads,
                               grads_of(y_ref, ref_leaves, grad_y)):
        assert got.dtype == x.dtype
        assert_rel_close(got, want, tol, name)


# ---- depthwise_conv: parity ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial,kernel", CASES, ids=lambda v: "x".join(map(str, v)))
def test_depthwise_conv_matches_float64(backend, spatial, kernel):
    for index, (batch, channels, fmt) in enumerate([(2, 37, "contiguous"), (1, 8, "channels_last")]):
        memory_format = channels_last(len(spatial) + 2) if fmt == "channels_last" else None
        x, weight, bias = make_inputs(batch, channels, spatial, kernel, memory_format=memory_format,
                                      seed=index, device=device_of(backend))
        check_depthwise(backend, x, weight, bias if index == 0 else None, residual=index == 1)
        check_depthwise(backend, x, weight, bias, residual=index == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_depthwise_conv_single_and_few_channels(backend, channels):
    x, weight, bias = make_inputs(2, channels, (7, 9), (3, 3), device=device_of(backend))
    check_depthwise(backend, x, weight, bias, residual=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_depthwise_conv_16bit(backend, dtype):
    skip_unless_dtype_runs(backend, dtype)
    for spatial, kernel in [((9, 13), (3, 3)), ((3, 7, 9), (3, 3, 3))]:
        x, weight, bias = make_inputs(2, 19, spatial, kernel, dtype=dtype,
                                      memory_format=channels_last(len(spatial) + 2),
                                      device=device_of(backend))
        check_depthwise(backend, x, weight, bias, residual=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_conv_float64(backend):
    x, weight, bias = make_inputs(2, 11, (3, 7, 9), (3, 3, 3), dtype=torch.float64,
                                  device=device_of(backend))
    check_depthwise(backend, x, weight, bias, residual=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_conv_sliced_input(backend):
    """Non-contiguous views: a channel slice of a channels-last tensor and a strided spatial one."""
    x_big, weight, bias = make_inputs(2, 40, (11, 19), (3, 3), memory_format=torch.channels_last,
                                      device=device_of(backend))
    x = x_big[:, 3:40, 1:-1, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    check_depthwise(backend, x, weight[3:40], bias[3:40], residual=True)
    check_depthwise(backend, x_big.transpose(2, 3), weight.transpose(2, 3), bias, residual=False)


def offset_view(shape, memory_format, device, dtype=torch.float32, offset=1):
    """A tensor contiguous in ``memory_format`` whose data starts ``offset`` elements into a
    larger buffer: dense, so no op copies it, but its address breaks 16-byte vector alignment."""
    dims = len(shape)
    order = (0, *range(2, dims), 1) if memory_format != torch.contiguous_format else range(dims)
    stored = [shape[i] for i in order]
    numel = torch.Size(shape).numel()
    buffer = torch.randn(numel + offset, generator=torch.Generator().manual_seed(offset))
    t = buffer.to(device, dtype)[offset:].view(stored).permute(*(list(order).index(i)
                                                                 for i in range(dims)))
    assert t.is_contiguous(memory_format=memory_format) and t.storage_offset() == offset
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_storage_offset_breaking_vector_alignment(backend, dtype):
    """Inputs, weights and biases that are contiguous but start a few elements into their buffer
    (the CUDA kernels must take their scalar path: a 16-byte vector load there would fault or
    read the wrong elements; compiled Triton specialises on 16-byte pointer alignment too), with
    16 channels, which would otherwise vectorise in every dtype. x reaches the
    kernels as a view (its channels-last 5-D form is free); so does a float32 bias."""
    skip_unless_dtype_runs(backend, dtype)
    if backend == "triton" and TRITON_DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("the interpreter has no vector path to fall back from: float32 is enough there")
    device = device_of(backend)
    for shape, kernel in (((2, 16, 5, 7), (3, 3)), ((1, 16, 3, 4, 5), (3, 3, 3))):
        fmt = channels_last(len(shape))
        x = offset_view(shape, fmt, device, dtype)
        weight = offset_view((shape[1], 1, *kernel), torch.contiguous_format, device, dtype, 3)
        bias = offset_view((shape[1],), torch.contiguous_format, device, dtype, 1)
        check_depthwise(backend, x, weight, bias, residual=True)
        check_depthwise(backend, x, weight, None, residual=False)
        check_pos_embed_norm(backend, x, weight, bias, "layernorm")


# The shapes UniFormer runs (stage 1 to 4 of S at 224, video S stage 1 at 8x224), batch 2 where the
# batch reduction matters; the compiled kernels only, the interpreter would take minutes.
REAL_SHAPES = [
    ((2, 64, 56, 56), (3, 3)), ((2, 64, 56, 56), (5, 5)), ((2, 128, 28, 28), (5, 5)),
    ((2, 320, 14, 14), (3, 3)), ((2, 512, 7, 7), (3, 3)), ((1, 64, 8, 56, 56), (5, 5, 5)),
    ((1, 64, 8, 56, 56), (3, 3, 3)), ((1, 128, 4, 28, 28), (1, 5, 5)),
]


@pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")
@pytest.mark.parametrize("shape,kernel", REAL_SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_cpu_kernels_on_uniformer_shapes(shape, kernel):
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], kernel,
                                  memory_format=channels_last(len(shape)))
    check_depthwise("cpu", x, weight, bias, residual=kernel[-1] == 3)


@pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")
def test_cpu_kernels_stream_large_outputs_with_unaligned_rows():
    """Input + output above 8 MiB: rows are computed in a buffer and streamed out with
    non-temporal stores; a row of 183 x 37 values starts at every alignment, so the scalar head
    and tail around the 16-byte stores are exercised."""
    x, weight, bias = make_inputs(2, 37, (181, 183), (3, 5), memory_format=torch.channels_last)
    assert 2 * x.nbytes >= 8 << 20
    check_depthwise("cpu", x, weight, bias, residual=True)


@pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")
def test_cpu_weight_gradient_is_deterministic():
    x, weight, bias = make_inputs(3, 24, (5, 9, 11), (3, 3, 3))
    x.requires_grad_(), weight.requires_grad_()
    grad_y = torch.randn_like(x)
    with uk.backend("cpu"):
        first = grads_of(uk.ops.depthwise_conv(x, weight, bias), (weight,), grad_y)[0]
        second = grads_of(uk.ops.depthwise_conv(x, weight, bias), (weight,), grad_y)[0]
    assert torch.equal(first, second)


# ---- devices: tensors on a GPU other than the current one --------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensors_on_a_device_other_than_the_current_one(backend):
    """With cuda:0 current, both ops forward and backward on cuda:1 tensors: Triton launches on
    the current device unless the op switches to the tensors' (ops/_device_guard.py); the CUDA
    binding has a CUDAGuard. The results land on cuda:1 and match the reference."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    device_of(backend)  # skips when the backend is missing
    if backend == "triton" and TRITON_DEVICE != "cuda":
        pytest.skip("triton runs in the interpreter here")
    with torch.cuda.device(0):
        for spatial, kernel in (((9, 13), (3, 3)), ((3, 7, 9), (5, 5, 5))):
            x, weight, bias = make_inputs(2, 37, spatial, kernel, device="cuda:1",
                                          memory_format=channels_last(len(spatial) + 2))
            check_depthwise(backend, x, weight, bias, residual=True)
            check_pos_embed_norm(backend, x, weight, bias, "layernorm")
        assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("backend", BACKENDS[2:])
def test_kernel_launches_run_on_the_tensors_device(backend, monkeypatch):
    """Every kernel call of both ops, forward and backward, happens inside the device guard with
    the tensors' device current (on one GPU the guard changes nothing, but its code runs; on the
    CPU, under the interpreter, it is a no-op context)."""
    device = device_of(backend)
    kernels = uk.ops._depthwise_common.kernels(backend)
    guarded = []
    real_guard = _device_guard.on_device_of

    @contextlib.contextmanager
    def recording_guard(t):
        with real_guard(t):
            guarded.append(t.device)
            yield
            guarded.pop()

    launches = []

    def spy(name):
        real = getattr(kernels, name)

        def launcher(x5, *args, **kwargs):
            current = torch.cuda.current_device() if x5.is_cuda else None
            launches.append((name, bool(guarded) and guarded[-1] == x5.device,
                             current in (None, x5.device.index)))
            return real(x5, *args, **kwargs)
        return launcher

    monkeypatch.setattr(_device_guard, "on_device_of", recording_guard)
    names = ("depthwise_conv_forward", "depthwise_conv_backward_weight", "pos_embed_norm_forward")
    if backend == "triton":
        for name in names:
            monkeypatch.setattr(kernels, name, spy(name))
    else:  # torch.ops namespaces are read-only: spy on the module attribute the ops look up
        spied = types.SimpleNamespace(**{name: spy(name) for name in names})
        monkeypatch.setattr(uk.ops._depthwise_common, "kernels", lambda b: spied)
    x, weight, bias = make_inputs(2, 8, (5, 7), (3, 3), memory_format=torch.channels_last,
                                  device=device)
    check_depthwise(backend, x, weight, bias, residual=True)
    check_pos_embed_norm(backend, x, weight, bias, "affine")
    assert {name for name, _, _ in launches} == set(names)
    assert all(inside and current for _, inside, current in launches), launches


# ---- pos_embed_norm: parity ---------------------------------------------------------------------

def check_pos_embed_norm(backend, x, weight, bias, norm, kind="norm"):
    tol = tolerance(x.dtype, kind)
    channels = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    norm_weight = (1 + 0.5 * torch.randn(channels, generator=gen)).to(x.device, x.dtype)
    norm_bias = torch.randn(channels, generator=gen).to(x.device, x.dtype)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, norm_weight, norm_bias)]
    with uk.backend(backend):
        y, z = uk.ops.pos_embed_norm(*leaves, norm=norm, eps=1e-6)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = reference_conv(ref[0], ref[1], ref[2], residual=True)
    z_ref = reference_norm(y_ref, ref[3], ref[4], norm)
    fmt = uk.ops._depthwise_common.memory_format_of(x)
    assert y.is_contiguous(memory_format=fmt) and z.is_contiguous(memory_format=fmt)
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(z, z_ref, tol, "z")
    grad_y, grad_z = torch.randn_like(y_ref), torch.randn_like(z_ref)
    with uk.backend(backend):
        grads = grads_of((y, z), leaves, (grad_y.to(x.dtype), grad_z.to(x.dtype)))
    names = ("grad_x", "grad_weight", "grad_bias", "grad_norm_weight", "grad_norm_bias")
    for name, got, want in zip(names, grads, grads_of((y_ref, z_ref), ref, (grad_y, grad_z))):
        assert_rel_close(got, want, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layernorm", "affine"])
@pytest.mark.parametrize("shape,fmt", [((2, 37, 9, 13), "channels_last"), ((1, 20, 3, 5, 7), None),
                                       ((2, 64, 7, 7), None)])
def test_pos_embed_norm_matches_float64(backend, norm, shape, fmt):
    memory_format = channels_last(len(shape)) if fmt else None
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], (3,) * (len(shape) - 2),
                                  memory_format=memory_format, device=device_of(backend))
    check_pos_embed_norm(backend, x, weight, bias, norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_pos_embed_norm_other_dtypes(backend, dtype):
    skip_unless_dtype_runs(backend, dtype)
    for shape, norm in (((2, 24, 9, 7), "layernorm"), ((1, 19, 3, 4, 5), "affine")):
        x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], (3,) * (len(shape) - 2),
                                      dtype=dtype, memory_format=channels_last(len(shape)),
                                      device=device_of(backend))
        check_pos_embed_norm(backend, x, weight, bias, norm)


@pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")
@pytest.mark.parametrize("shape,norm", [((2, 64, 56, 56), "affine"), ((2, 320, 14, 14), "layernorm"),
                                        ((1, 64, 8, 56, 56), "affine")])
def test_cpu_pos_embed_norm_on_uniformer_shapes(shape, norm):
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], (3,) * (len(shape) - 2),
                                  memory_format=channels_last(len(shape)))
    check_pos_embed_norm("cpu", x, weight, bias, norm)


def test_fold_batchnorm_equals_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(12).eval()
    uk.testing.randomize_state_(bn)
    y = torch.randn(2, 12, 5, 5)
    scale, shift = uk.ops.fold_batchnorm(bn)
    assert_rel_close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(y).double(), 1e-6)


# ---- torch.library: opcheck, gradcheck, compile -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_of(backend)
    x, weight, bias = make_inputs(2, 5, (5, 7), (3, 3), memory_format=torch.channels_last,
                                  device=device)
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    norm_weight = torch.randn(5, device=device, requires_grad=True)
    norm_bias = torch.randn(5, device=device, requires_grad=True)
    depthwise = importlib.import_module("uniformer_kernels.ops.depthwise")
    pos_embed_norm = importlib.import_module("uniformer_kernels.ops.pos_embed_norm")
    with uk.backend(backend):
        torch.library.opcheck(depthwise._depthwise_conv, (x, weight, bias, True))
        torch.library.opcheck(depthwise._depthwise_conv, (x.detach(), weight, None, False))
        grad_y = torch.randn_like(x)
        torch.library.opcheck(depthwise._depthwise_conv_backward,
                              (grad_y, x.detach(), weight.detach(), True, False, [True, True, True]))
        for norm in (0, 1):
            torch.library.opcheck(pos_embed_norm._pos_embed_norm,
                                  (x, weight, bias, norm_weight, norm_bias, norm, 1e-6))


# The autograd wiring is shared by every backend; the Triton gradients are checked against float64
# in the parity tests above, and gradcheck in the interpreter takes minutes.
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_gradcheck_float64(backend):
    x, weight, bias = make_inputs(1, 3, (2, 4, 5), (3, 3, 3), dtype=torch.float64)
    norm_weight, norm_bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, weight, bias, norm_weight, norm_bias)]
    with uk.backend(backend):
        # fast_mode checks random projections of the Jacobian: a few calls instead of one per
        # input element, which the interpreter needs.
        assert torch.autograd.gradcheck(
            lambda x, w, b: uk.ops.depthwise_conv(x, w, b, residual=True), inputs[:3],
            fast_mode=True)
        for norm in ("layernorm", "affine"):
            assert torch.autograd.gradcheck(
                lambda *t: uk.ops.pos_embed_norm(*t, norm=norm), inputs, fast_mode=True)


@pytest.mark.parametrize("device,backend", [
    pytest.param("cpu", None, marks=pytest.mark.slow),
    pytest.param("cuda", None, marks=gpu_marks()),  # the automatic choice: triton
    pytest.param("cuda", "cuda", marks=gpu_marks()),
], ids=["cpu", "cuda-automatic", "cuda-forced-cuda"])
def test_compile_fullgraph_forward_and_backward(device, backend):
    """Both ops inside one compiled function, no graph break, one compilation, same results."""
    torch._dynamo.reset()
    if backend is not None:
        device = device_of(backend)
    x, weight, bias = make_inputs(2, 16, (7, 9), (3, 3), memory_format=torch.channels_last,
                                  device=device)
    weight5 = torch.randn(16, 1, 5, 5, device=device) / 5
    norm_weight, norm_bias = torch.randn(16, device=device), torch.randn(16, device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, weight5, norm_weight, norm_bias)]

    def block(x, weight, bias, weight5, norm_weight, norm_bias):
        y, z = uk.ops.pos_embed_norm(x, weight, bias, norm_weight, norm_bias, norm="affine")
        return y + uk.ops.depthwise_conv(z, weight5)

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    forced = uk.backend(backend) if backend is not None else contextlib.nullcontext()
    with torch._dynamo.config.patch(recompile_limit=1), forced:
        out = compiled(*leaves)
        grads = grads_of(out, leaves, torch.ones_like(out))
        eager_out = block(*leaves)
        eager_grads = grads_of(eager_out, leaves, torch.ones_like(eager_out))
    assert_rel_close(out, eager_out.double(), 1e-6)
    for got, want in zip(grads, eager_grads):
        assert_rel_close(got, want.double(), 1e-6)


def test_poisoned_memory_never_leaks_into_results():
    """Every allocation in a child process starts as 0x7f bytes (3.4e38 in float32, NaN in float16)
    via glibc's malloc perturbation, with mmap disabled for sizes below 32 MiB so that torch's
    large buffers come from the perturbed heap too: an output element a kernel forgets to write,
    or a scratch buffer it forgets to zero, shows up as a huge error."""
    backends_here = ["eager"] + (["cpu"] if _extension.loaded() else []) + (
        ["triton"] if TRITON_DEVICE == "cpu" else [])  # malloc poisoning reaches CPU memory only
    script = textwrap.dedent(f"""
        import torch
        import uniformer_kernels as uk
        import torch.nn.functional as F
        from uniformer_kernels.testing import assert_rel_close
        assert (torch.empty(4096).view(torch.int32) == 0x7f7f7f7f).all(), "poison not active"
        torch.manual_seed(0)
        for backend in {backends_here!r}:
            # The interpreter is slow: a smaller 3-D case there.
            cases = [((2, 37, 9, 13), (3, 3)), ((1, 11, 3, 5, 7), (5, 5, 5))]
            if backend == "triton":
                cases = [cases[0], ((1, 5, 3, 4, 5), (3, 3, 3))]
            if backend == "cpu":  # input + output over 8 MiB: rows streamed with non-temporal stores
                cases.append(((2, 37, 181, 183), (3, 3)))
            for shape, k in cases:  # 2-D channels-last, 3-D NCHW (the cpu ops write it via scratch)
                x = torch.randn(shape).contiguous(memory_format=torch.channels_last if len(shape) == 4
                                                  else torch.contiguous_format).requires_grad_()
                w = torch.randn(shape[1], 1, *k).requires_grad_()
                b = torch.randn(shape[1]).requires_grad_()
                nw, nb = torch.randn(shape[1]).requires_grad_(), torch.randn(shape[1]).requires_grad_()
                with uk.backend(backend):
                    y = uk.ops.depthwise_conv(x, w, b, residual=True)
                    gy = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
                    p, z = uk.ops.pos_embed_norm(x, w, b, nw, nb, norm="layernorm")
                    gz = torch.autograd.grad((p, z), (x, w, b, nw, nb), (torch.ones_like(p), z.detach()))
                ref = [t.detach().double().requires_grad_() for t in (x, w, b, nw, nb)]
                conv = F.conv2d if len(shape) == 4 else F.conv3d
                y_ref = ref[0] + conv(ref[0], ref[1], ref[2], padding=k[-1] // 2, groups=shape[1])
                assert_rel_close(y, y_ref, 1e-5, backend + " y")
                for got, want in zip(gy, torch.autograd.grad(y_ref, ref[:3], torch.ones_like(y_ref),
                                                                 retain_graph=True)):
                    assert_rel_close(got, want, 1e-5, backend + " grad")
                z_ref = F.layer_norm(y_ref.movedim(1, -1), (shape[1],), ref[3], ref[4], 1e-6).movedim(-1, 1)
                assert_rel_close(z, z_ref, 1e-5, backend + " z")
                for got, want in zip(gz, torch.autograd.grad((y_ref, z_ref), ref, (torch.ones_like(y_ref), z_ref.detach()))):
                    assert_rel_close(got, want, 1e-5, backend + " pos_embed_norm grad")
        print("checked", {backends_here!r})
    """)
    run_with_poisoned_malloc(script, timeout=600)


# ---- backend choice and bad input ---------------------------------------------------------------

def test_forcing_an_unavailable_backend_raises_before_running():
    x, weight, bias = make_inputs(1, 4, (5, 5), (3, 3))
    with uk.backend("cuda"), pytest.raises(ValueError, match="cuda.*cannot run depthwise_conv"):
        uk.ops.depthwise_conv(x, weight, bias)


def bad_depthwise_calls():
    x, weight, bias = make_inputs(1, 4, (5, 5), (3, 3))
    x3, weight3, _ = make_inputs(1, 4, (3, 5, 5), (3, 3, 3))
    return [
        ("rank", dict(x=x[0], weight=weight), ValueError, "x: expected a 4-D"),
        ("even kernel", dict(x=x, weight=torch.randn(4, 1, 4, 3)), ValueError, "must be odd"),
        ("kernel above 7", dict(x=x, weight=torch.randn(4, 1, 9, 9)), ValueError, "at most 7"),
        ("channel mismatch", dict(x=x, weight=torch.randn(5, 1, 3, 3)), ValueError, "4 channels"),
        ("not depthwise", dict(x=x, weight=torch.randn(4, 2, 3, 3)), ValueError, r"\(4, 1, k, k\)"),
        ("2-D weight for 3-D x", dict(x=x3, weight=weight), ValueError, "weight: expected"),
        ("dtype mix", dict(x=x, weight=weight.double()), TypeError, "weight: dtype torch.float64"),
        ("device mix", dict(x=x, weight=weight.to("meta")), ValueError, "weight: on meta"),
        ("integer x", dict(x=x.to(torch.int32), weight=weight), TypeError, "x: expected float16"),
        ("empty x", dict(x=x[:0], weight=weight), ValueError, "x: empty tensor"),
        ("bias shape", dict(x=x, weight=weight, bias=bias[:3]), ValueError, r"bias: expected shape \(4,\)"),
        ("bias dtype", dict(x=x, weight=weight, bias=bias.half()), TypeError, "bias: dtype"),
        ("not a tensor", dict(x=x.numpy(), weight=weight), TypeError, "x: expected a torch.Tensor"),
        ("residual", dict(x=x, weight=weight, residual=1), TypeError, "residual: expected a bool"),
    ]


@pytest.mark.parametrize("case", bad_depthwise_calls(), ids=lambda c: c[0])
def test_depthwise_conv_rejects_bad_input(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message):
        uk.ops.depthwise_conv(**kwargs)


def bad_pos_embed_norm_calls():
    x, weight, bias = make_inputs(1, 4, (5, 5), (3, 3))
    ok = dict(x=x, weight=weight, bias=bias, norm_weight=torch.ones(4), norm_bias=torch.zeros(4))
    return [
        ("norm name", dict(ok, norm="batchnorm"), ValueError, "norm: expected one of"),
        ("norm_weight shape", dict(ok, norm_weight=torch.ones(5)), ValueError,
         r"norm_weight: expected shape \(4,\)"),
        ("norm_bias dtype", dict(ok, norm_bias=torch.zeros(4, dtype=torch.float64)), TypeError,
         "norm_bias: dtype"),
        ("negative eps", dict(ok, eps=-1.0), ValueError, "eps: expected a non-negative"),
        ("even kernel", dict(ok, weight=torch.randn(4, 1, 2, 2)), ValueError, "must be odd"),
        ("integer x", dict(ok, x=x.long()), TypeError, "x: expected float16"),
    ]


@pytest.mark.parametrize("case", bad_pos_embed_norm_calls(), ids=lambda c: c[0])
def test_pos_embed_norm_rejects_bad_input(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message):
        uk.ops.pos_embed_norm(**kwargs)


# ---- the cpu backend's native bfloat16 ----------------------------------------------------------
# The C++ ops load and store bfloat16 themselves (float weights and accumulation): checked
# against float64, against 2x the error of the eager bfloat16 composition, and, for the conv and
# its backward, bit for bit against the float32 kernels on the widened input rounded once (what
# ops/ ran before).
# Names contain "cpu_bf16": tests/test_cpu_isa.py re-runs them under every ISA build of this CPU.
# Outputs are allocated inside the op, so they are poisoned through PyTorch's deterministic mode,
# which fills every fresh floating tensor with NaN (an unwritten element then fails).

cpu_only = pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")

# (shape, kernel): channels below, at and between the vector tails (1, 3, 13, 37), UniFormer's 64
# and an odd 61; odd spatial sizes, rows narrower than the kernel, 3-D.
BF16_CASES = [
    ((2, 37, 9, 13), (3, 3)), ((1, 64, 7, 9), (5, 5)), ((2, 13, 15, 17), (7, 7)),
    ((1, 3, 2, 3), (7, 7)), ((2, 1, 5, 7), (3, 3)), ((1, 61, 3, 7, 9), (3, 3, 3)),
    ((1, 24, 5, 6, 7), (5, 5, 5)), ((2, 19, 4, 7, 9), (1, 5, 5)),
]


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor created uninitialised (torch.empty, at::empty in C++) starts as NaN."""
    fill, deterministic = torch.utils.deterministic.fill_uninitialized_memory, \
        torch.are_deterministic_algorithms_enabled()
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(3).isnan().all()
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def rel_error_of(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@cpu_only
@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("shape,kernel", BF16_CASES, ids=str)
def test_cpu_bf16_depthwise_conv_forward(shape, kernel, fmt):
    memory_format = channels_last(len(shape)) if fmt == "channels_last" else None
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], kernel, dtype=torch.bfloat16,
                                  memory_format=memory_format, seed=shape[1])
    for residual, b in ((False, bias), (True, bias), (True, None)):
        with uk.backend("cpu"), poisoned_outputs():
            y = uk.ops.depthwise_conv(x, weight, b, residual=residual)
        assert y.dtype == torch.bfloat16
        assert y.is_contiguous(memory_format=uk.ops._depthwise_common.memory_format_of(x))
        y_ref = reference_conv(x.double(), weight.double(), None if b is None else b.double(), residual)
        assert_rel_close(y, y_ref, tolerance(torch.bfloat16, "conv"), f"y residual={residual}")
        eager = reference_conv(x, weight, b, residual)
        assert rel_error_of(y, y_ref) <= 2 * rel_error_of(eager, y_ref)
        widened = torch.ops.uniformer_kernels_C.depthwise_conv_cpu(
            x.float(), weight.float(), None if b is None else b.float(), residual)
        assert torch.equal(y, widened.to(torch.bfloat16)), "differs from the float32 kernel rounded once"


@cpu_only
@pytest.mark.parametrize("norm", ["layernorm", "affine"])
@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", [(2, 37, 9, 13), (1, 64, 7, 5), (2, 3, 5, 2), (1, 61, 3, 5, 7)], ids=str)
def test_cpu_bf16_pos_embed_norm_forward(shape, fmt, norm):
    memory_format = channels_last(len(shape)) if fmt == "channels_last" else None
    kernel = (3,) * (len(shape) - 2)
    x, weight, bias = make_inputs(shape[0], shape[1], shape[2:], kernel, dtype=torch.bfloat16,
                                  memory_format=memory_format, seed=shape[1])
    gen = torch.Generator().manual_seed(2)
    norm_weight = (1 + 0.5 * torch.randn(shape[1], generator=gen)).to(torch.bfloat16)
    norm_bias = torch.randn(shape[1], generator=gen).to(torch.bfloat16)
    norm_id = 0 if norm == "layernorm" else 1
    with poisoned_outputs():
        y, z, mean, rstd = torch.ops.uniformer_kernels_C.pos_embed_norm_cpu(
            x, weight, bias, norm_weight, norm_bias, norm_id, 1e-6)
    with uk.backend("cpu"):
        y_op, z_op = uk.ops.pos_embed_norm(x, weight, bias, norm_weight, norm_bias, norm=norm, eps=1e-6)
    assert torch.equal(y_op, y) and torch.equal(z_op, z)
    fmt_out = uk.ops._depthwise_common.memory_format_of(x)
    assert y.dtype == z.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=fmt_out) and z.is_contiguous(memory_format=fmt_out)
    y_ref = reference_conv(x.double(), weight.double(), bias.double(), residual=True)
    z_ref = reference_norm(y_ref, norm_weight.double(), norm_bias.double(), norm)
    tol = tolerance(torch.bfloat16, "norm")
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(z, z_ref, tol, "z")
    y_eager = reference_conv(x, weight, bias, residual=True)
    z_eager = reference_norm(y_eager, norm_weight, norm_bias, norm)
    assert rel_error_of(y, y_ref) <= 2 * rel_error_of(y_eager, y_ref)
    assert rel_error_of(z, z_ref) <= 2 * rel_error_of(z_eager, z_ref)
    if norm == "layernorm":
        assert mean.dtype == rstd.dtype == torch.float32
        # Statistics of the stored (rounded) y, as LayerNorm on the unfused y would take them.
        y_pixels = y.double().movedim(1, -1).reshape(-1, shape[1])
        var, mean_ref = torch.var_mean(y_pixels, dim=1, correction=0)
        assert_rel_close(mean, mean_ref, tolerance(torch.float32, "norm"), "mean")
        assert_rel_close(rstd, (var + 1e-6).rsqrt(), tolerance(torch.float32, "norm"), "rstd")
    else:
        assert mean.numel() == rstd.numel() == 0


@cpu_only
def test_cpu_bf16_store_rounds_to_nearest_even_as_pytorch_does():
    """The bfloat16 store on float values at a tie (to even, both ways), just off a tie, rounding up
    into the next binade and to infinity, negative, tiny and inf: bit for bit PyTorch's float ->
    bfloat16 conversion; NaN stays NaN (PyTorch's own NaN bits differ between its scalar and
    vector conversions). Each value passes through every lane kind (full vector, narrower tail,
    scalar) of both forwards: a zero input and kernel leave y = bias and the affine z = shift."""
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0x3FFFFFFF, 0x7F7FFFFF, 0xBF808000,
            0x00000001, 0xC0490FDB, 0x7F800000, 0xFF800000, 0x7FC00000, 0x3F800000]
    values = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    channels = values.numel()  # 13: one vector of 8 (AVX2), a tail of 4, one scalar
    x = torch.zeros(1, channels, 1, 3, dtype=torch.bfloat16)
    weight = torch.zeros(channels, 1, 1, 1, dtype=torch.bfloat16)
    ones = torch.ones(channels)
    for shift in range(channels):
        rolled = values.roll(shift)
        want = rolled.to(torch.bfloat16).view(1, -1, 1, 1).expand(1, channels, 1, 3)
        nan = want.isnan()
        with poisoned_outputs():
            # The C++ ops take float biases and norm parameters as they are (ops/ passes x's dtype).
            y = torch.ops.uniformer_kernels_C.depthwise_conv_cpu(x, weight, rolled, False)
            _, z, _, _ = torch.ops.uniformer_kernels_C.pos_embed_norm_cpu(
                x, weight, torch.zeros(channels), ones, rolled, 1, 0.0)
        for name, out in (("y", y), ("z", z)):
            assert torch.equal(out.isnan(), nan), (name, shift, out)
            assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16)), (name, shift, out)


@cpu_only
def test_cpu_bf16_opcheck():
    """The custom ops' fakes and autograd on the native bfloat16 forwards (mean/rstd float32)."""
    x, weight, bias = make_inputs(2, 13, (5, 7), (3, 3), dtype=torch.bfloat16,
                                  memory_format=torch.channels_last)
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    norm_weight = torch.randn(13, dtype=torch.bfloat16, requires_grad=True)
    norm_bias = torch.randn(13, dtype=torch.bfloat16, requires_grad=True)
    depthwise = importlib.import_module("uniformer_kernels.ops.depthwise")
    pos_embed_norm = importlib.import_module("uniformer_kernels.ops.pos_embed_norm")
    with uk.backend("cpu"):
        torch.library.opcheck(depthwise._depthwise_conv, (x, weight, bias, True))
        torch.library.opcheck(depthwise._depthwise_conv, (x.detach(), weight, None, False))
        for norm in (0, 1):
            torch.library.opcheck(pos_embed_norm._pos_embed_norm,
                                  (x, weight, bias, norm_weight, norm_bias, norm, 1e-6))


@cpu_only
@pytest.mark.parametrize("shape,kernel", BF16_CASES, ids=str)
def test_cpu_bf16_depthwise_conv_backward(shape, kernel):
    """The C++ backward on bfloat16 grad_y and x: grad_x the bfloat16 forward of the flipped kernel,
    weight and bias gradients summed in float and rounded once; each bit for bit the float32 kernels
    on the widened tensors, and within the contract of float64."""
    x, weight, _ = make_inputs(shape[0], shape[1], shape[2:], kernel, dtype=torch.bfloat16,
                               memory_format=channels_last(len(shape)), seed=shape[1] + 1)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    backward = torch.ops.uniformer_kernels_C.depthwise_conv_backward_cpu
    for residual in (False, True):
        with poisoned_outputs():
            grads = backward(grad_y, x, weight, residual, [True, True, True])
        widened = backward(grad_y.float(), x.float(), weight.float(), residual, [True, True, True])
        x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
        b64 = torch.zeros(shape[1], dtype=torch.float64, requires_grad=True)
        want = grads_of(reference_conv(x64, w64, b64, residual), (x64, w64, b64), grad_y.double())
        for name, got, wide, ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, widened, want):
            assert got.dtype == torch.bfloat16, name
            assert torch.equal(got, wide.to(torch.bfloat16)), f"{name} residual={residual}"
            assert_rel_close(got, ref, tolerance(torch.bfloat16, "conv"), f"{name} residual={residual}")


@cpu_only
def test_cpu_kernels_refuse_float16():
    """The C++ ops take float32, float64 and bfloat16 (ops/ widens float16): float16 is refused,
    not misread."""
    x = torch.randn(1, 8, 5, 5, dtype=torch.float16)
    weight = torch.randn(8, 1, 3, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        torch.ops.uniformer_kernels_C.depthwise_conv_backward_cpu(x, x, weight, False, [True, True, True])
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        torch.ops.uniformer_kernels_C.depthwise_conv_cpu(x, weight, None, False)
