"""The parity helpers must fail when they should: every later parity test relies on them."""
import math

import pytest
import torch

import uniformer_models as um
from uniformer_kernels import backends
from uniformer_kernels.testing import (ELEMENT_FACTOR, assert_rel_close, gpu_marks, max_rel_error,
                                       randomize_state_, rel_error, tolerance, triton_test_device,
                                       triton_test_dtypes)


def test_rel_error_value():
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(ref, ref) == 0.0
    assert math.isclose(rel_error(torch.tensor([3.0, 4.5]), ref), 0.1)
    assert math.isclose(max_rel_error(torch.tensor([3.0, 4.5]), ref), 0.125)
    assert max_rel_error(ref, ref) == 0.0


def test_nan_never_passes():
    ref = torch.randn(10)
    out = ref.clone()
    out[3] = float("nan")
    assert rel_error(out, ref) == float("inf") and max_rel_error(out, ref) == float("inf")
    with pytest.raises(AssertionError, match=r"non-finite elements, first at \(3,\)"):
        assert_rel_close(out, ref, tol=1.0)


def test_failure_message_locates_the_worst_element():
    ref = torch.zeros(4, 5, dtype=torch.float64) + 1.0
    out = ref.clone()
    out[2, 3] = 1.5
    with pytest.raises(AssertionError, match=r"at \(2, 3\): got 1\.5, expected 1"):
        assert_rel_close(out, ref, tol=1e-5, name="y")
    # norm-wise 0.5 / sqrt(20) ~ 0.11 passes 0.12, the worst element (0.5 of max|ref| 1) does
    # not pass 4 x 0.12
    assert ELEMENT_FACTOR == 4
    with pytest.raises(AssertionError, match=r"worst element 5\.000e-01 of max\|ref\| > tolerance 4\.8e-01"):
        assert_rel_close(out, ref, tol=0.12)
    assert_rel_close(out, ref, tol=0.12, elem_tol=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_few_wrong_elements_of_a_large_tensor_fail(dtype):
    """8 wrong O(1) values in a 2x64x56x56 map hide in the norm (relative error ~5e-3, inside
    bfloat16's 1e-2) but not in the worst element. The output is the reference rounded to
    ``dtype``, so the check still passes a correct result in that dtype."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 64, 56, 56, generator=gen, dtype=torch.float64)
    out = ref.to(dtype)
    tol = tolerance(dtype, "conv")
    assert_rel_close(out, ref, tol)
    flat = out.view(-1)
    wrong = torch.randperm(flat.numel(), generator=gen)[:8]
    flat[wrong] += 1.0
    assert rel_error(out, ref) < tolerance(torch.bfloat16, "conv")  # the norm alone lets it pass
    with pytest.raises(AssertionError, match="worst element"):
        assert_rel_close(out, ref, tolerance(torch.bfloat16, "conv"))
    with pytest.raises(AssertionError):
        assert_rel_close(out, ref, tol)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        assert_rel_close(torch.zeros(2, 3), torch.zeros(3, 2), tol=1.0)


def test_tolerances_follow_the_contract():
    assert tolerance(torch.float32, "conv") == 1e-5
    assert tolerance(torch.float32, "attention") == 1e-4
    assert tolerance(torch.float16, "conv") == 2e-3
    assert tolerance(torch.bfloat16, "attention") == 1e-2


def test_randomize_state_changes_every_floating_tensor():
    model = um.create_model("uniformer_xxs")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randomize_state_(model, seed=1)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert not torch.equal(value, before[key]), key
    var = model.blocks1[0].norm1.running_var
    assert (var >= 0.5).all() and (var <= 1.5).all()
    again = randomize_state_(um.create_model("uniformer_xxs"), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))


def test_triton_tests_run_compiled_on_a_gpu_else_in_the_interpreter():
    """The one decision every Triton test follows: CUDA when present (conftest leaves the
    interpreter off there), else CPU tensors in the interpreter (conftest turns it on)."""
    device, reason = triton_test_device()
    if backends._import_triton()[0] is None:
        assert device is None and "pip install triton" in reason
    elif torch.cuda.is_available():
        assert device == "cuda", reason
        assert torch.bfloat16 in triton_test_dtypes(device)
    else:
        assert device == "cpu", reason
        assert torch.bfloat16 not in triton_test_dtypes(device)  # the interpreter's bf16 dots
    assert set(triton_test_dtypes("cuda")) == {torch.float32, torch.float16, torch.bfloat16,
                                                torch.float64}


def test_gpu_marks_say_what_is_missing():
    marks = gpu_marks(min_devices=2)
    assert marks[0].name == "gpu"
    skip = marks[1]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert skip.args == (count < 2,) and f"found {count}" in skip.kwargs["reason"]
