"""The C++ CPU kernels' ISA builds (baseline, AVX2, AVX-512; csrc/cpu/cpu_isa.cpp): the choice made
once per process, UNIFORMER_KERNELS_CPU_ISA forcing one, and the CPU op parity tests re-run in a
subprocess under every build this CPU supports (the in-process tests cover the process's own
choice). Builds this CPU lacks skip and say so."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uniformer_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
ENV = "UNIFORMER_KERNELS_CPU_ISA"
ISAS = ["baseline", "avx2", "avx512"]

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="uniformer_kernels._C not built")


def facts():
    return _extension.build_info()


def run_python(args, isa, timeout=900):
    env = {**os.environ, ENV: isa, "OMP_NUM_THREADS": "1"}
    env.pop("UNIFORMER_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_widest_supported_build_is_chosen_unless_forced():
    info = facts()
    assert info["cpu_isas_compiled"][0] == "baseline"
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert info["cpu_isas_compiled"] == ISAS
    supported = info["cpu_isas_supported"]
    assert supported == ISAS[:len(supported)] and set(supported) <= set(info["cpu_isas_compiled"])
    forced = os.environ.get(ENV)
    assert info["cpu_kernel_isa"] == (forced or supported[-1])
    assert info["cpu_kernel_isa_error"] is None


@pytest.mark.parametrize("isa", ISAS)
def test_forcing_a_build_runs_it_and_reports_it(isa):
    if isa not in facts()["cpu_isas_supported"]:
        pytest.skip(f"this CPU lacks {isa} (supports {', '.join(facts()['cpu_isas_supported'])})")
    done = run_python(["-c", "from uniformer_kernels import _extension as e; i = e.build_info(); "
                             "print(i['cpu_kernel_isa'], i['cpu_kernel_isa_error'])"], isa, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [isa, "None"]


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_op_parity_under_each_supported_build(isa):
    """test_depthwise.py's and test_attention.py's cpu cases (float64 references, poisoned outputs,
    odd sizes, tails of every width, real UniFormer shapes) in a process forced to ``isa``."""
    supported = facts()["cpu_isas_supported"]
    if isa not in supported:
        pytest.skip(f"this CPU lacks {isa} (supports {', '.join(supported)}): its kernels are compiled "
                    f"into the extension but their parity tests cannot run here")
    if isa == facts()["cpu_kernel_isa"]:
        pytest.skip(f"{isa} is this process's own build: the in-process cpu tests already run it")
    done = run_python(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu and not gpu",
                       "tests/test_depthwise.py", "tests/test_attention.py"], isa)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"under {ENV}={isa}:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert " passed" in summary, summary


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_bf16_under_each_supported_build(isa):
    """test_depthwise.py's native bfloat16 cases (float64 and eager-bfloat16 references,
    poisoned outputs, every lane kind, rounding) in a process forced to ``isa``: quick enough to
    run unmarked, so the baseline build's bfloat16 loads and stores are checked on every run."""
    supported = facts()["cpu_isas_supported"]
    if isa not in supported:
        pytest.skip(f"this CPU lacks {isa} (supports {', '.join(supported)})")
    if isa == facts()["cpu_kernel_isa"]:
        pytest.skip(f"{isa} is this process's own build: the in-process cpu_bf16 tests already run it")
    done = run_python(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu_bf16",
                       "tests/test_depthwise.py"], isa)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"under {ENV}={isa}:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary


def test_forcing_an_unsupported_or_unknown_build_raises_a_clear_error():
    """The choice is refused before any kernel runs: the CPU ops raise ValueError naming the
    variable and what this CPU supports, and the environment report shows the error."""
    supported = facts()["cpu_isas_supported"]
    lacking = [isa for isa in ISAS if isa not in supported]
    script = (
        "import sys, torch, uniformer_kernels as uk\n"
        "from uniformer_kernels import _extension\n"
        "print('REPORT', _extension.build_info()['cpu_kernel_isa_error'])\n"
        "x = torch.randn(1, 8, 5, 5)\n"
        "w = torch.randn(8, 1, 3, 3)\n"
        "with uk.backend('cpu'):\n"
        "    try:\n"
        "        uk.ops.depthwise_conv(x, w, None)\n"
        "    except ValueError as exc:\n"
        "        print('RAISED', str(exc).splitlines()[0])\n"
        "    else:\n"
        "        print('RAN')\n"
    )
    for isa, expected in [*[(isa, "does not support") for isa in lacking], ("avx1024", "must be one of")]:
        done = run_python(["-c", script], isa, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
        assert "RAN" not in done.stdout
        for key in ("REPORT", "RAISED"):
            assert ENV in lines[key] and expected in lines[key] and isa in lines[key], lines
        if expected == "does not support":
            assert f"supported here: {', '.join(supported)}" in lines["RAISED"]
        report = run_python(["-m", "uniformer_kernels"], isa, timeout=120)
        assert report.returncode == 0, report.stderr
        assert ENV in report.stdout


# ---- the AVX-512 build's source with its traits, run on this CPU ---------------------------------
# csrc/cpu_emulation/avx512_traits_harness.cpp compiles depthwise_kernels_impl.h exactly as the
# AVX-512 build does (16-float vectors, 32-register blocking) but for this machine's ISA, so that
# the code paths only that build takes (tails of 8/4/1 lanes after 16, blocks of 16 outputs) are
# checked against float64 here even where AVX-512 cannot run.

import ctypes  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from uniformer_kernels.testing import assert_rel_close, tolerance  # noqa: E402

HARNESS = ROOT / "csrc" / "cpu_emulation" / "avx512_traits_harness.cpp"
CXX = os.environ.get("CXX", "g++")
# Channel counts: below, at and between the tail widths (16 + 8 + 4 + 1), and UniFormer's 56/112.
WIDE_CHANNELS = [1, 3, 8, 13, 16, 29, 56, 61, 112]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    out = tmp_path_factory.mktemp("avx512_traits") / "libuk_avx512_traits.so"
    cmd = [CXX, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
           f"-I{ROOT / 'csrc' / 'cpu'}", str(HARNESS), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    lib = ctypes.CDLL(str(out))
    P, I = ctypes.c_void_p, ctypes.c_int
    sizes = ctypes.POINTER(ctypes.c_int64)
    lib.uk_wide_forward.argtypes = [I, P, P, P, I, P, sizes, P]
    lib.uk_wide_weight_grad.argtypes = [I, P, P, P, P, sizes]
    lib.uk_wide_pos_embed_norm.argtypes = [I, P, P, P, P, P, I, ctypes.c_double, P, P, P, P, sizes]
    lib.uk_wide_forward_bf16.argtypes = [P, P, P, I, P, sizes, P]
    lib.uk_wide_weight_grad_bf16.argtypes = [P, P, P, P, sizes]
    lib.uk_wide_pos_embed_norm_bf16.argtypes = [P, P, P, P, P, I, ctypes.c_double, P, P, P, P, sizes]
    return lib


def shape_arg(x5, kernel):
    return (ctypes.c_int64 * 8)(*x5.shape, *kernel)


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def wide_inputs(shape, kernel, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x5 = torch.randn(*shape, generator=gen).to(dtype)  # (N, D, H, W, C)
    weight = (torch.randn(*kernel, shape[-1], generator=gen) / len(kernel)).to(dtype)  # (KD, KH, KW, C)
    bias = torch.randn(shape[-1], generator=gen).to(dtype)
    return x5, weight, bias


def reference_conv5(x5, weight, bias):
    """float64 conv in the kernels' layouts: (N, D, H, W, C) and (KD, KH, KW, C)."""
    x = x5.double().permute(0, 4, 1, 2, 3)
    w = weight.double().permute(3, 0, 1, 2).unsqueeze(1)
    y = F.conv3d(x, w, bias.double(), padding=[k // 2 for k in weight.shape[:3]], groups=x.shape[1])
    return y.permute(0, 2, 3, 4, 1)


WIDE_CASES = [  # (N, D, H, W) and (KD, KH, KW): W covers blocks of 16/8/4/2/1 and rows narrower than KW
    ((2, 1, 5, 23), (1, 3, 3)), ((1, 1, 4, 56), (1, 5, 5)), ((1, 1, 3, 37), (1, 7, 7)),
    ((1, 3, 4, 9), (3, 3, 3)), ((1, 1, 3, 2), (1, 5, 5)), ((1, 2, 3, 19), (1, 1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels", WIDE_CHANNELS)
def test_avx512_traits_forward_and_weight_grad_match_float64(wide, dtype, channels):
    double = int(dtype == torch.float64)
    for i, (spatial, kernel) in enumerate(WIDE_CASES):
        x5, weight, bias = wide_inputs((*spatial, channels), kernel, dtype, seed=channels * 10 + i)
        sizes = shape_arg(x5, kernel)
        y_ref = reference_conv5(x5, weight, bias)
        for residual in (False, True):
            for buffered in (False, True):
                y = torch.full_like(x5, float("nan"))
                row_buffer = torch.full((spatial[3] * channels,), float("nan"), dtype=dtype) if buffered else None
                wide.uk_wide_forward(double, ptr(x5), ptr(weight), ptr(bias), int(residual), ptr(y), sizes,
                                     ptr(row_buffer))
                want = y_ref + x5.double() if residual else y_ref
                assert_rel_close(y, want, tolerance(dtype, "conv"), f"y {spatial} {kernel} residual={residual}")
        # The weight gradient adds into what is there: start from random values.
        grad_y = torch.randn(x5.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        w64 = weight.double().requires_grad_()
        b64 = bias.double().requires_grad_()
        want_w, want_b = torch.autograd.grad(reference_conv5(x5, w64, b64), (w64, b64), grad_y)
        start_w, start_b = torch.randn_like(weight), torch.randn_like(bias)
        grad_w, grad_b = start_w.clone(), start_b.clone()
        grad_y_in = grad_y.to(dtype)  # held: a temporary's memory would be freed before the call
        wide.uk_wide_weight_grad(double, ptr(grad_y_in), ptr(x5), ptr(grad_w), ptr(grad_b), sizes)
        assert_rel_close(grad_w - start_w, want_w, tolerance(dtype, "conv"), f"grad_w {spatial} {kernel}")
        assert_rel_close(grad_b - start_b, want_b, tolerance(dtype, "conv"), f"grad_b {spatial} {kernel}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("norm", ["layernorm", "affine"])
@pytest.mark.parametrize("channels", WIDE_CHANNELS)
def test_avx512_traits_pos_embed_norm_matches_float64(wide, dtype, norm, channels):
    double, eps = int(dtype == torch.float64), 1e-6
    x5, weight, bias = wide_inputs((2, 1, 5, 17, channels), (1, 3, 3), dtype, seed=channels)
    gen = torch.Generator().manual_seed(channels + 1)
    norm_w, norm_b = torch.randn(channels, generator=gen).to(dtype), torch.randn(channels, generator=gen).to(dtype)
    y, z = torch.full_like(x5, float("nan")), torch.full_like(x5, float("nan"))
    mean, rstd = (torch.full(x5.shape[:-1], float("nan"), dtype=dtype) for _ in range(2))
    wide.uk_wide_pos_embed_norm(double, ptr(x5), ptr(weight), ptr(bias), ptr(norm_w), ptr(norm_b),
                                int(norm == "layernorm"), eps, ptr(y), ptr(z), ptr(mean), ptr(rstd),
                                shape_arg(x5, (1, 3, 3)))
    y_ref = reference_conv5(x5, weight, bias) + x5.double()
    assert_rel_close(y, y_ref, tolerance(dtype, "norm"), "y")
    if norm == "affine":
        z_ref = y_ref * norm_w.double() + norm_b.double()
    else:
        z_ref = F.layer_norm(y_ref, (channels,), norm_w.double(), norm_b.double(), eps)
        mean_ref = y_ref.mean(-1)
        assert_rel_close(mean, mean_ref, tolerance(dtype, "norm"), "mean")
        assert_rel_close(rstd, (y_ref.var(-1, unbiased=False) + eps).rsqrt(), tolerance(dtype, "norm"), "rstd")
    assert_rel_close(z, z_ref, tolerance(dtype, "norm"), "z")


@pytest.mark.parametrize("channels", WIDE_CHANNELS)
def test_avx512_traits_bf16_kernels_match_the_float_kernels(wide, channels):
    """The bfloat16 kernels with 16-lane traits (loads widened and stores rounded on 16, 8 and
    4 lanes and on scalars, streamed rows): the conv bit for bit the float kernel on the widened
    input rounded once, and within the bfloat16 contract of float64; the weight gradient bit for
    bit the float kernel's on widened tensors; pos_embed_norm's z against float64 norms of the
    stored y."""
    for i, (spatial, kernel) in enumerate(WIDE_CASES):
        x5, weight, bias = wide_inputs((*spatial, channels), kernel, torch.float32, seed=channels * 10 + i)
        x16 = x5.to(torch.bfloat16)
        x_widened = x16.float()  # held: a temporary's memory would be freed before the call
        sizes = shape_arg(x5, kernel)
        for residual in (False, True):
            for buffered in (False, True):
                y = torch.full_like(x16, float("nan"))
                row_buffer = torch.full((spatial[3] * channels,), float("nan"), dtype=torch.bfloat16) \
                    if buffered else None
                wide.uk_wide_forward_bf16(ptr(x16), ptr(weight), ptr(bias), int(residual), ptr(y), sizes,
                                          ptr(row_buffer))
                y32 = torch.full_like(x5, float("nan"))
                wide.uk_wide_forward(0, ptr(x_widened), ptr(weight), ptr(bias), int(residual), ptr(y32), sizes,
                                     None)
                assert torch.equal(y, y32.to(torch.bfloat16)), f"{spatial} {kernel} residual={residual}"
                want = reference_conv5(x16, weight, bias) + (x16.double() if residual else 0)
                assert_rel_close(y, want, tolerance(torch.bfloat16, "conv"), f"y {spatial} {kernel}")
        grad_y16 = torch.randn(x5.shape, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
        grad_y_widened = grad_y16.float()  # held, as x_widened
        grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
        wide.uk_wide_weight_grad_bf16(ptr(grad_y16), ptr(x16), ptr(grad_w), ptr(grad_b), sizes)
        want_w, want_b = torch.zeros_like(weight), torch.zeros_like(bias)
        wide.uk_wide_weight_grad(0, ptr(grad_y_widened), ptr(x_widened), ptr(want_w), ptr(want_b), sizes)
        assert torch.equal(grad_w, want_w) and torch.equal(grad_b, want_b), f"weight grad {spatial} {kernel}"
    x5, weight, bias = wide_inputs((2, 1, 5, 17, channels), (1, 3, 3), torch.float32, seed=channels)
    x16 = x5.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(channels + 1)
    norm_w, norm_b = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    for layer_norm in (0, 1):
        y, z = torch.full_like(x16, float("nan")), torch.full_like(x16, float("nan"))
        mean, rstd = (torch.full(x5.shape[:-1], float("nan")) for _ in range(2))
        wide.uk_wide_pos_embed_norm_bf16(ptr(x16), ptr(weight), ptr(bias), ptr(norm_w), ptr(norm_b), layer_norm,
                                         1e-6, ptr(y), ptr(z), ptr(mean), ptr(rstd), shape_arg(x5, (1, 3, 3)))
        y_ref = reference_conv5(x16, weight, bias) + x16.double()
        assert_rel_close(y, y_ref, tolerance(torch.bfloat16, "norm"), "y")
        y_stored = y.double()
        if layer_norm:
            z_ref = F.layer_norm(y_stored, (channels,), norm_w.double(), norm_b.double(), 1e-6)
            assert_rel_close(mean, y_stored.mean(-1), tolerance(torch.float32, "norm"), "mean")
        else:
            z_ref = y_stored * norm_w.double() + norm_b.double()
        assert_rel_close(z, z_ref, tolerance(torch.bfloat16, "norm"), "z")
