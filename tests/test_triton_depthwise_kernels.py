"""The Triton depthwise-conv launchers (uniformer_kernels/triton/depthwise.py) called directly,
against float64 eager references: conv forward (and dx through it), weight/bias gradients, and
positional encoding + norm. With a GPU they run compiled on CUDA tensors (marked ``gpu``); without
one on CPU tensors in Triton's interpreter (slow), so the shapes are tiny but odd. Every buffer a launcher allocates with torch.empty is poisoned
with NaN, so an element a kernel fails to write fails the comparison.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from uniformer_kernels.testing import assert_rel_close, tolerance, triton_test_device

DEVICE, _WHY_NOT = triton_test_device()  # "cuda" (compiled), "cpu" (interpreter) or None
if DEVICE is None:
    pytest.skip(f"the Triton kernels cannot run here: {_WHY_NOT}", allow_module_level=True)
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

from uniformer_kernels.triton import depthwise as dw  # noqa: E402
FP64_TOL = 1e-12  # float64 in, float64 accumulation


class _PoisonedTorch:
    """``torch`` with empty/empty_like returning NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(math.nan)

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(math.nan)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(dw, "torch", _PoisonedTorch())


@pytest.fixture(autouse=True)
def fresh_inputs():
    """Fresh random inputs each run (DESIGN.md); a failing test's report shows the seed."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"torch.manual_seed({seed})")
    torch.manual_seed(seed)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_tol(dtype, kind):
    return FP64_TOL if dtype == torch.float64 else tolerance(dtype, kind)


def make_conv(shape, kernel_size, dtype, bias=True):
    """x (N, D, H, W, C) in dtype; weight (KD, KH, KW, C) and bias (C,) in the accumulation dtype."""
    c = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    acc = acc_dtype(dtype)
    w = torch.randn(*kernel_size, c, dtype=acc, device=DEVICE) / math.prod(kernel_size) ** 0.5
    b = torch.randn(c, dtype=acc, device=DEVICE) if bias else None
    return x, w, b


def to_ncdhw(t):
    return t.double().permute(0, 4, 1, 2, 3)


def ref_conv(x, w, b, residual):
    """float64 channels-last y of the depthwise conv (+ x) through F.conv3d."""
    kernel = w.double().permute(3, 0, 1, 2).unsqueeze(1)
    y = F.conv3d(to_ncdhw(x), kernel, None if b is None else b.double(),
                 padding=[k // 2 for k in w.shape[:3]], groups=x.shape[-1])
    if residual:
        y = y + to_ncdhw(x)
    return y.permute(0, 2, 3, 4, 1)


def case_id(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


# (N, D, H, W, C), kernel size, residual, bias: odd sizes, W below the kernel width, D below the
# kernel depth; each shape with two of the three residual/bias combinations
FORWARD_CASES = [
    ((1, 1, 7, 9, 37), (1, 3, 3), False, True),
    ((1, 1, 7, 9, 37), (1, 3, 3), True, False),
    ((2, 1, 7, 9, 3), (1, 5, 5), True, True),
    ((2, 1, 7, 9, 3), (1, 5, 5), False, True),
    ((1, 1, 13, 5, 64), (1, 7, 7), True, False),
    ((1, 1, 13, 5, 64), (1, 7, 7), True, True),
    ((1, 3, 5, 7, 37), (3, 3, 3), False, True),
    ((1, 3, 5, 7, 37), (3, 3, 3), True, True),
    ((2, 3, 5, 5, 1), (3, 1, 1), True, False),
    ((2, 3, 5, 5, 1), (3, 1, 1), False, True),
    ((1, 3, 3, 5, 3), (5, 5, 5), True, True),
    ((1, 1, 3, 19, 80), (1, 3, 3), True, True),  # two W tiles by two channel blocks
]


@pytest.mark.parametrize("shape,kernel_size,residual,with_bias", FORWARD_CASES, ids=case_id)
def test_forward_float32(shape, kernel_size, residual, with_bias):
    x, w, b = make_conv(shape, kernel_size, torch.float32, with_bias)
    y = dw.depthwise_conv_forward(x, w, b, residual)
    assert y.dtype == x.dtype and y.is_contiguous()
    assert_rel_close(y, ref_conv(x, w, b, residual), tolerance(torch.float32, "conv"), "y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=case_id)
@pytest.mark.parametrize("shape,kernel_size", [((1, 1, 7, 9, 37), (1, 3, 3)),
                                               ((1, 3, 5, 7, 37), (3, 3, 3))], ids=case_id)
def test_forward_float16_float64(shape, kernel_size, dtype):
    x, w, b = make_conv(shape, kernel_size, dtype)
    y = dw.depthwise_conv_forward(x, w, b, True)
    assert y.dtype == dtype
    assert_rel_close(y, ref_conv(x, w, b, True), out_tol(dtype, "conv"), "y")


def conv_grads(grad_y, x, w, residual):
    """float64 reference dx, dw (KD, KH, KW, C) and db through autograd on F.conv3d."""
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device, requires_grad=True)
    ref_conv(x64, w64, b64, residual).backward(grad_y.double())
    return x64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("shape,kernel_size,residual", [((2, 1, 7, 9, 3), (1, 5, 5), False),
                                                        ((1, 3, 5, 7, 3), (3, 3, 3), True)],
                         ids=case_id)
def test_input_grad_is_forward_with_flipped_weight(shape, kernel_size, residual):
    x, w, _ = make_conv(shape, kernel_size, torch.float32, bias=False)
    grad_y = torch.randn_like(x)
    dx = dw.depthwise_conv_forward(grad_y, w.flip(0, 1, 2).contiguous(), None, residual)
    ref_dx = conv_grads(grad_y, x, w, residual)[0]
    assert_rel_close(dx, ref_dx, tolerance(torch.float32, "conv"), "dx")


WEIGHT_GRAD_CASES = [  # (N, D, H, W, C), kernel size, dtype, deterministic
    ((2, 1, 7, 9, 37), (1, 3, 3), torch.float32, True),  # several row chunks
    ((2, 1, 7, 9, 37), (1, 3, 3), torch.float32, False),
    ((1, 1, 9, 5, 64), (1, 7, 7), torch.float32, False),
    ((1, 3, 5, 7, 3), (3, 3, 3), torch.float32, True),
    ((2, 3, 5, 5, 1), (3, 1, 1), torch.float32, False),
    ((1, 1, 7, 9, 37), (1, 5, 5), torch.float16, True),
    ((1, 2, 3, 5, 37), (3, 3, 3), torch.float64, False),
    ((1, 1, 3, 19, 80), (1, 3, 3), torch.float32, True),  # two W tiles by two channel blocks
]


@pytest.mark.parametrize("shape,kernel_size,dtype,deterministic", WEIGHT_GRAD_CASES, ids=case_id)
def test_weight_grad(shape, kernel_size, dtype, deterministic):
    x, w, _ = make_conv(shape, kernel_size, dtype, bias=False)
    grad_y = torch.randn_like(x)
    grad_w, grad_b = dw.depthwise_conv_backward_weight(grad_y, x, kernel_size, deterministic)
    _, ref_w, ref_b = conv_grads(grad_y, x, w, False)
    acc = acc_dtype(dtype)
    assert grad_w.dtype == grad_b.dtype == acc
    assert grad_w.shape == (*kernel_size, shape[-1]) and grad_b.shape == (shape[-1],)
    # sums of exactly representable products in the accumulation dtype: its tolerance
    assert_rel_close(grad_w, ref_w, out_tol(acc, "conv"), "grad_weight")
    assert_rel_close(grad_b, ref_b, out_tol(acc, "conv"), "grad_bias")


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [True, False])
def test_weight_grad_5x5x5(deterministic):
    test_weight_grad((1, 3, 3, 5, 3), (5, 5, 5), torch.float32, deterministic)


def test_deterministic_weight_grad_is_bitwise_reproducible():
    x = torch.randn(2, 1, 9, 5, 37, device=DEVICE)  # 18 rows: several row chunks
    grad_y = torch.randn_like(x)
    first = dw.depthwise_conv_backward_weight(grad_y, x, (1, 3, 3), True)
    second = dw.depthwise_conv_backward_weight(grad_y, x, (1, 3, 3), True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def ref_pos_embed_norm(x, w, b, norm_weight, norm_bias, norm, eps):
    y = ref_conv(x, w, b, True)
    if norm == 1:
        return y, y * norm_weight.double() + norm_bias.double(), None, None
    mean = y.mean(-1)
    rstd = (y.var(-1, unbiased=False) + eps).rsqrt()
    z = F.layer_norm(y, y.shape[-1:], norm_weight.double(), norm_bias.double(), eps)
    return y, z, mean.flatten(), rstd.flatten()


POS_EMBED_CASES = [  # (N, D, H, W, C), kernel size, dtype, norm
    ((2, 1, 7, 9, 37), (1, 3, 3), torch.float32, 0),
    ((2, 1, 7, 9, 37), (1, 3, 3), torch.float32, 1),
    ((1, 3, 3, 5, 64), (3, 3, 3), torch.float32, 0),
    ((1, 1, 5, 3, 1), (1, 3, 3), torch.float32, 0),
    ((1, 1, 3, 5, 1000), (1, 3, 3), torch.float32, 0),  # wide C: one pixel spans 1024 lanes
    ((1, 1, 3, 19, 80), (1, 3, 3), torch.float32, 0),  # two W tiles
    ((1, 1, 7, 9, 37), (1, 3, 3), torch.float16, 0),
    ((1, 1, 7, 9, 37), (1, 3, 3), torch.float16, 1),
    ((1, 2, 3, 5, 37), (3, 3, 3), torch.float64, 0),
]


@pytest.mark.parametrize("shape,kernel_size,dtype,norm", POS_EMBED_CASES, ids=case_id)
def test_pos_embed_norm(shape, kernel_size, dtype, norm):
    eps = 1e-6
    x, w, b = make_conv(shape, kernel_size, dtype)
    c, acc = shape[-1], acc_dtype(dtype)
    norm_weight = torch.rand(c, dtype=acc, device=DEVICE) + 0.5
    norm_bias = torch.randn(c, dtype=acc, device=DEVICE) * 0.1
    y, z, mean, rstd = dw.pos_embed_norm_forward(x, w, b, norm_weight, norm_bias, norm, eps)
    ref_y, ref_z, ref_mean, ref_rstd = ref_pos_embed_norm(x, w, b, norm_weight, norm_bias, norm, eps)
    assert y.dtype == z.dtype == dtype and mean.dtype == rstd.dtype == acc
    assert_rel_close(y, ref_y, out_tol(dtype, "conv"), "y")
    assert_rel_close(z, ref_z, out_tol(dtype, "norm"), "z")
    if norm == 0:
        assert_rel_close(mean, ref_mean, out_tol(acc, "norm"), "mean")
        assert_rel_close(rstd, ref_rstd, out_tol(acc, "norm"), "rstd")
    else:
        assert mean.shape == rstd.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 is checked on a GPU only (the interpreter "
                    "mishandles it)")
@pytest.mark.parametrize("shape,kernel_size", [((2, 1, 56, 56, 64), (1, 3, 3)),
                                               ((2, 1, 28, 28, 56), (1, 5, 5)),
                                               ((1, 4, 14, 14, 320), (3, 3, 3))], ids=case_id)
def test_bfloat16_and_uniformer_shapes_on_gpu(shape, kernel_size):
    tol = tolerance(torch.bfloat16, "conv")
    x, w, b = make_conv(shape, kernel_size, torch.bfloat16)
    assert_rel_close(dw.depthwise_conv_forward(x, w, b, True), ref_conv(x, w, b, True), tol, "y")
    grad_y = torch.randn_like(x)
    _, ref_w, ref_b = conv_grads(grad_y, x, w, False)
    for deterministic in (True, False):
        grad_w, grad_b = dw.depthwise_conv_backward_weight(grad_y, x, kernel_size, deterministic)
        assert_rel_close(grad_w, ref_w, tolerance(torch.float32, "conv"), "grad_weight")
        assert_rel_close(grad_b, ref_b, tolerance(torch.float32, "conv"), "grad_bias")
    norm_weight = torch.rand(shape[-1], device=DEVICE) + 0.5
    norm_bias = torch.randn(shape[-1], device=DEVICE) * 0.1
    y, z, _, _ = dw.pos_embed_norm_forward(x, w, b, norm_weight, norm_bias, 0, 1e-6)
    ref_y, ref_z, _, _ = ref_pos_embed_norm(x, w, b, norm_weight, norm_bias, 0, 1e-6)
    assert_rel_close(y, ref_y, tol, "y")
    assert_rel_close(z, ref_z, tolerance(torch.bfloat16, "norm"), "z")


def test_empty_batch():
    x, w, b = make_conv((0, 1, 3, 5, 4), (1, 3, 3), torch.float32)
    assert dw.depthwise_conv_forward(x, w, b, True).shape == x.shape
    grad_w, grad_b = dw.depthwise_conv_backward_weight(x, x, (1, 3, 3), True)
    assert torch.equal(grad_w, torch.zeros_like(w)) and torch.equal(grad_b, torch.zeros_like(b))


def test_bad_arguments_raise_before_launch():
    x, w, b = make_conv((1, 1, 3, 5, 4), (1, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="kernel sizes"):
        dw.depthwise_conv_forward(x, torch.randn(1, 2, 3, 4, device=DEVICE), None, False)
    with pytest.raises(ValueError, match="weight"):
        dw.depthwise_conv_forward(x, w.double(), None, False)
    with pytest.raises(ValueError, match="contiguous"):
        dw.depthwise_conv_forward(x.transpose(2, 3), w, None, False)
    with pytest.raises(ValueError, match="grad_y"):
        dw.depthwise_conv_backward_weight(x[:, :, :2].contiguous(), x, (1, 3, 3), True)
    with pytest.raises(ValueError, match="norm"):
        dw.pos_embed_norm_forward(x, w, b, b, b, 2, 1e-6)
