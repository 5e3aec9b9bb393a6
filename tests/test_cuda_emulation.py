"""The CUDA kernels of csrc/cuda executed on the CPU, without a GPU.

The real depthwise_conv.cu and pos_embed_norm.cu are compiled by g++ against the host emulation in
csrc/cuda_emulation (a block's threads are fibers; __syncthreads and warp shuffles are real
rendezvous) and loaded with ctypes. Their launch functions run against float64 eager PyTorch on odd
shapes, every kernel size the dispatch specialises plus the run-time-size kernel, in float32 /
float16 / bfloat16 / float64, with NaN-poisoned outputs inside NaN guard bands (an unwritten
element, an out-of-bounds read or write all fail), the 64-bit index path forced on small shapes,
misaligned buffers, and shuffled block and thread schedules. The first tests check the emulator
itself, so that a broken emulator cannot make the kernel tests pass vacuously.
"""
import ctypes
import hashlib
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from uniformer_kernels.testing import assert_rel_close, tolerance

pytestmark = pytest.mark.cuda_emulation

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
EMULATION_DIR = REPO / "csrc" / "cuda_emulation"
KERNEL_SOURCES = [CUDA_DIR / "depthwise_conv.cu", CUDA_DIR / "pos_embed_norm.cu"]
EMULATION_SOURCES = [EMULATION_DIR / name for name in ("emulation.cpp", "c_api.cpp", "selftest.cu")]
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"]
# GCC thinks pos_embed_norm's affine-only scale / shift may be read uninitialised (they are not);
# the nvcc check (scripts/check_cuda_sources.sh) holds these files to its own warnings.
KERNEL_SOURCE_FLAGS = ["-Wno-uninitialized"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
DTYPES = list(DTYPE_CODES)
VEC_WIDTH = {dtype: 16 // dtype.itemsize for dtype in DTYPES}  # kVecWidth in depthwise_tile.cuh
CUDA_SUCCESS, CUDA_ERROR_INVALID_VALUE = 0, 1
CUDA_ERROR_INVALID_CONFIGURATION, CUDA_ERROR_LAUNCH_FAILURE = 9, 719
# Blocks and threads in a shuffled order (see cuda_emulation.h); 0 would be the natural order.
SCHEDULE_SEED = 20261204


# ---- building and loading the emulated library ---------------------------------------------------

def library_inputs():
    headers = [*CUDA_DIR.glob("*.h"), *CUDA_DIR.glob("*.cuh"), *EMULATION_DIR.rglob("*.h")]
    return sorted(KERNEL_SOURCES + EMULATION_SOURCES + headers)


def build_key() -> str:
    """Hash of the compiler, the flags and every source and header: a change rebuilds."""
    key = hashlib.sha256()
    key.update(subprocess.run([CXX, "--version"], capture_output=True, check=True).stdout)
    key.update(" ".join(FLAGS + KERNEL_SOURCE_FLAGS).encode())
    for path in library_inputs():
        key.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return key.hexdigest()[:20]


def build_library(cache_dir: Path) -> Path:
    library = cache_dir / f"libuk_cuda_emulation_{build_key()}.so"
    if library.exists():
        return library
    includes = [f"-I{EMULATION_DIR / 'include'}", f"-I{CUDA_DIR}"]
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        def compile_one(source: Path) -> Path:
            obj = Path(work) / (source.name + ".o")
            extra = KERNEL_SOURCE_FLAGS if source in KERNEL_SOURCES else []
            cmd = [CXX, *FLAGS, *extra, *includes, "-x", "c++", "-c", str(source), "-o", str(obj)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}\nfailed:\n{done.stderr}")
            return obj

        sources = KERNEL_SOURCES + EMULATION_SOURCES
        with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            objects = list(pool.map(compile_one, sources))
        partial = Path(work) / library.name
        subprocess.run([CXX, "-shared", "-o", str(partial), *map(str, objects)], check=True)
        os.replace(partial, library)  # atomic: a concurrent session sees all of it or nothing
    for stale in cache_dir.glob("libuk_cuda_emulation_*.so"):
        if stale != library:
            stale.unlink(missing_ok=True)  # a process that has one loaded keeps its copy
    return library


class Emulation:
    """The emulated library through ctypes: the launch functions of csrc/cuda and the emulator's
    controls. Pointers are passed as integers (tensor.data_ptr())."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        sizes, kernel = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int)
        signatures = {
            "uk_emu_depthwise_conv_forward": (I, [I, P, P, P, I, P, sizes, kernel]),
            "uk_emu_depthwise_conv_backward_weight_workspace_elems": (I64, [sizes, kernel]),
            "uk_emu_depthwise_conv_backward_weight_deterministic":
                (I, [I, P, P, P, P, P, sizes, kernel]),
            "uk_emu_depthwise_conv_backward_weight_atomic": (I, [I, P, P, P, P, sizes, kernel]),
            "uk_emu_pos_embed_norm_max_channels": (I64, [I]),
            "uk_emu_pos_embed_norm":
                (I, [I, P, P, P, P, P, I, ctypes.c_double, P, P, P, P, sizes, kernel]),
            "uk_emu_set_schedule_seed": (None, [ctypes.c_uint64]),
            "uk_emu_set_force_int64_index": (None, [I]),
            "uk_emu_last_fault": (ctypes.c_char_p, []),
            "uk_emu_launch_count": (I, []),
            "uk_emu_launch_record": (ctypes.c_char_p, [I]),
            "uk_emu_clear_launch_log": (None, []),
            "uk_emu_selftest_tree_sum": (I, [P, P, I, I, I, I]),
            "uk_emu_selftest_shuffle_float": (I, [P, P, P, I, I, I]),
            "uk_emu_selftest_shuffle_double": (I, [P, P, P, I, I, I]),
            "uk_emu_selftest_indices": (I, [P, P, P, P]),
            "uk_emu_selftest_broken": (I, [I, P]),
            "uk_emu_selftest_launch_config": (I, [P, P, ctypes.c_size_t, I]),
            "uk_emu_float_to_half": (None, [P, P, I64]),
            "uk_emu_half_to_float": (None, [P, P, I64]),
            "uk_emu_float_to_bfloat16": (None, [P, P, I64]),
            "uk_emu_bfloat16_to_float": (None, [P, P, I64]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name.removeprefix("uk_emu_"), fn)

    def fault(self) -> str:
        return self.last_fault().decode()

    def launches(self) -> list[str]:
        return [self.launch_record(i).decode() for i in range(self.launch_count())]

    def check(self, status: int, what: str) -> None:
        assert status == CUDA_SUCCESS, f"{what}: cudaError {status}; emulator: {self.fault()}"


@pytest.fixture(scope="session")
def emulation(request, tmp_path_factory) -> Emulation:
    cache = request.config.cache
    cache_dir = cache.mkdir("cuda_emulation") if cache else tmp_path_factory.mktemp("emu")
    return Emulation(build_library(Path(cache_dir)))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The float64 references are tiny: one thread is fastest, and two stall badly in OpenMP when
    other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def emu(emulation):
    """The library with a shuffled schedule, 32-bit indices unless forced, an empty launch log."""
    emulation.set_schedule_seed(SCHEDULE_SEED)
    emulation.set_force_int64_index(0)
    emulation.clear_launch_log()
    yield emulation
    emulation.set_force_int64_index(0)


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def c_array(ctype, values):
    return (ctype * len(values))(*values)


# ---- the emulator itself -------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic_shared", [False, True], ids=["static", "dynamic"])
def test_barrier_orders_shared_memory(emu, dynamic_shared):
    """A tree sum in shared memory is right with __syncthreads and wrong without: so the barrier
    really holds threads back, and the test kernel really depends on it."""
    blocks, n = 3, 256
    values = torch.randint(-1000, 1000, (blocks, n), dtype=torch.int32,
                           generator=torch.Generator().manual_seed(0))
    for seed in (0, SCHEDULE_SEED):
        emu.set_schedule_seed(seed)
        for barrier in (True, False):
            out = torch.full((blocks,), -1, dtype=torch.int32)
            emu.check(emu.selftest_tree_sum(ptr(values), ptr(out), blocks, n, barrier,
                                            dynamic_shared), "tree sum")
            if barrier:
                assert torch.equal(out, values.sum(1, dtype=torch.int32)), (seed, out)
            else:
                assert not torch.equal(out, values.sum(1, dtype=torch.int32)), (seed, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_shuffles_exchange_lanes(emu, dtype):
    threads = 64  # two warps: lanes never cross a warp
    shuffle = emu.selftest_shuffle_float if dtype == torch.float32 else emu.selftest_shuffle_double
    values = torch.randint(-1000, 1000, (threads,)).to(dtype)
    lane = torch.arange(threads)
    for width in (32, 8):
        for lane_mask in (1, 2, 4, 8, 16, 31):
            out, total = torch.full_like(values, torch.nan), torch.full_like(values, torch.nan)
            emu.check(shuffle(ptr(values), ptr(out), ptr(total), threads, lane_mask, width), "shfl")
            source = lane ^ lane_mask
            # A source lane in a later segment of `width` lanes gives back the lane's own value.
            source = torch.where(source % 32 // width > lane % 32 // width, lane, source)
            assert torch.equal(out, values[source]), (width, lane_mask)
            assert torch.equal(total, values.view(2, 32).sum(1).repeat_interleave(32))


def test_indices_cover_the_grid(emu):
    grid, block = (3, 2, 2), (8, 4, 3)
    total = 12 * 96
    out = torch.full((total,), -1, dtype=torch.int64)
    count = torch.zeros(1, dtype=torch.int32)
    emu.check(emu.selftest_indices(ptr(out), ptr(count), c_array(ctypes.c_uint, grid),
                                   c_array(ctypes.c_uint, block)), "indices")
    assert torch.equal(out, torch.arange(total)) and count.item() == total
    assert emu.launches()[-1].startswith("grid=(3,2,2) block=(8,4,3) shared=0")


@pytest.mark.parametrize("which,message", [
    (0, "__syncthreads after thread (0,0,0) of block (0,0,0) exited"),
    (1, "shuffle waits for lane 5, which exited"),
    (2, "deadlock in block (0,0,0): 16 threads wait at __syncthreads, 16 at a warp shuffle"),
    (3, "shuffle mask names lanes the block does not have"),
], ids=["exit-before-barrier", "exit-before-shuffle", "barrier-vs-shuffle", "partial-warp"])
def test_broken_kernels_fail_the_launch(emu, which, message):
    emu.set_schedule_seed(0)
    scratch = torch.zeros(256)
    assert emu.selftest_broken(which, ptr(scratch)) == CUDA_ERROR_LAUNCH_FAILURE
    assert message in emu.fault()


def test_launch_configuration_limits(emu):
    def launch(grid, block, shared=0, opt_in=-1):
        return emu.selftest_launch_config(c_array(ctypes.c_uint, grid),
                                          c_array(ctypes.c_uint, block), shared, opt_in)

    one = (1, 1, 1)
    assert launch(one, (1024, 1, 1)) == CUDA_SUCCESS
    assert launch(one, (1025, 1, 1)) == CUDA_ERROR_INVALID_CONFIGURATION
    assert launch(one, (1, 1, 65)) == CUDA_ERROR_INVALID_CONFIGURATION
    assert launch((1, 65536, 1), (1, 1, 1)) == CUDA_ERROR_INVALID_CONFIGURATION
    assert launch((0, 1, 1), (1, 1, 1)) == CUDA_ERROR_INVALID_CONFIGURATION
    assert launch(one, one, 48 * 1024) == CUDA_SUCCESS
    assert launch(one, one, 48 * 1024 + 1) == CUDA_ERROR_INVALID_VALUE  # beyond 48 KiB: opt in
    assert launch(one, one, 100 * 1024, opt_in=100 * 1024) == CUDA_SUCCESS
    assert launch(one, one, 0, opt_in=227 * 1024 + 1) == CUDA_ERROR_INVALID_VALUE


def special_floats() -> torch.Tensor:
    """Random floats over every exponent, plus ties, the edges of both 16-bit ranges, inf, NaN."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**32, (200_000,), generator=gen, dtype=torch.int64)
    randoms = bits.to(torch.int32).view(torch.float32)
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 2**-25, 3 * 2**-25,
                         2**-24, 2**-14 - 2**-25, 65504.0, 65519.99, 65520.0, 3.3895e38, 1e-40,
                         0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    return torch.cat([randoms, ties, -ties])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_conversions_round_to_nearest_even(emu, dtype):
    """Bit for bit as torch's conversions (round to nearest, ties to even, as cvt.rn), both ways."""
    to_16, from_16 = ((emu.float_to_half, emu.half_to_float) if dtype == torch.float16 else
                      (emu.float_to_bfloat16, emu.bfloat16_to_float))
    floats = special_floats()
    bits = torch.empty(floats.shape, dtype=torch.int16)
    to_16(ptr(floats), ptr(bits), floats.numel())
    expected = floats.to(dtype)
    nan = expected.isnan()
    assert torch.equal(bits.view(dtype).isnan(), nan)
    assert torch.equal(bits[~nan], expected.view(torch.int16)[~nan])
    every_pattern = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    back = torch.empty(every_pattern.shape, dtype=torch.float32)
    from_16(ptr(every_pattern), ptr(back), every_pattern.numel())
    expected = every_pattern.view(dtype).float()
    assert torch.equal(back.isnan(), expected.isnan())
    assert torch.equal(back[~expected.isnan()], expected[~expected.isnan()])


# ---- buffers and references ----------------------------------------------------------------------

GUARD = 16  # NaN elements on each side of every buffer a kernel sees; 16 keeps 16-byte alignment


class Guarded:
    """`values` in the middle of a NaN-filled buffer, `misalign` elements past a 16-byte
    boundary: a kernel that reads out of bounds picks up NaN, one that writes there changes a
    guard."""

    def __init__(self, values: torch.Tensor, misalign: int = 0):
        numel = values.numel()
        self.buffer = torch.full((numel + 2 * GUARD + misalign,), float("nan"), dtype=values.dtype)
        self.start = GUARD + misalign
        self.view = self.buffer[self.start:self.start + numel].view(values.shape)
        self.view.copy_(values)
        assert (self.view.data_ptr() % 16 == 0) == (misalign * values.element_size() % 16 == 0)

    @classmethod
    def poisoned(cls, shape, dtype, misalign: int = 0):
        return cls(torch.full(shape, float("nan"), dtype=dtype), misalign)

    @property
    def ptr(self) -> int:
        return self.view.data_ptr()

    def check_guards(self, name: str) -> None:
        guards = torch.cat([self.buffer[:self.start], self.buffer[self.start + self.view.numel():]])
        assert guards.isnan().all(), f"{name}: a kernel wrote outside the buffer"


def accum_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tol(dtype, kind):
    # DESIGN's contract has no float64 row: the kernels accumulate float64 in float64.
    return 1e-12 if dtype == torch.float64 else tolerance(dtype, kind)


def to_kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> the kernels' contiguous (N, D, H, W, C); 2D gets D = 1."""
    t = t if t.dim() == 5 else t.unsqueeze(2)
    return t.permute(0, 2, 3, 4, 1).contiguous()


def from_kernel_layout(t: torch.Tensor, dims: int) -> torch.Tensor:
    t = t.permute(0, 4, 1, 2, 3)
    return t.squeeze(2) if dims == 4 else t


def weight_to_kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """(C, 1, *kernel) -> (KD, KH, KW, C)."""
    w = w[:, 0] if w.dim() == 5 else w[:, 0].unsqueeze(1)
    return w.permute(1, 2, 3, 0).contiguous()


def conv_reference(x, weight, bias):
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    return conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=x.shape[1])


def shape_args(x_kernel: torch.Tensor, kernel_size):
    k = tuple(kernel_size) if len(kernel_size) == 3 else (1, *kernel_size)
    return c_array(ctypes.c_int64, x_kernel.shape), c_array(ctypes.c_int, k)


def make_inputs(batch, channels, spatial, kernel, dtype, seed):
    """x (dtype) and float64 weight / bias with the values the kernels get (weights in the
    accumulation dtype), so the reference sees exactly the kernels' inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(channels, 1, *kernel, generator=gen, dtype=torch.float64) / len(kernel)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    acc = accum_dtype(dtype)
    return x, weight.to(acc).double(), bias.to(acc).double()


# (spatial size, kernel size): every size the dispatch specialises (1x3x3, 1x5x5, 1x7x7, 3x3x3,
# 5x5x5, 3x1x1; 2D convs are 1xKxK), odd spatial sizes, sizes below the kernel, and two without a
# specialisation (the run-time-size kernels).
CASES = [
    ((9, 13), (3, 3)), ((7, 9), (5, 5)), ((11, 9), (7, 7)), ((2, 3), (7, 7)),
    ((3, 7, 9), (3, 3, 3)), ((5, 6, 7), (5, 5, 5)), ((4, 7, 9), (1, 5, 5)), ((5, 6, 7), (3, 1, 1)),
    ((3, 9, 7), (3, 5, 1)), ((7, 5), (1, 3)),
]
CASE_IDS = ["x".join(map(str, s)) + "-k" + "x".join(map(str, k)) for s, k in CASES]
# (batch, channels, bias?, residual?): channels that are a multiple of every vector width (16), of
# float64's only (6), of none (37, more than one warp of scalar lanes); batch 1.
LAYOUTS = [(2, 37, True, False), (1, 16, False, True), (1, 6, True, True)]


def run_forward(emu, dtype, x_kernel, weight, bias, residual, kernel_size, misaligned=()):
    """The forward launch on guarded buffers (those named in `misaligned`, of x / weight / bias /
    y, one element off 16 bytes); returns y (kernel layout)."""
    acc = accum_dtype(dtype)
    x = Guarded(x_kernel, int("x" in misaligned))
    w = Guarded(weight_to_kernel_layout(weight).to(acc), int("weight" in misaligned))
    b = None if bias is None else Guarded(bias.to(acc), int("bias" in misaligned))
    y = Guarded.poisoned(x_kernel.shape, dtype, int("y" in misaligned))
    sizes, k = shape_args(x_kernel, kernel_size)
    emu.check(emu.depthwise_conv_forward(DTYPE_CODES[dtype], x.ptr, w.ptr, b and b.ptr, residual,
                                         y.ptr, sizes, k), "depthwise forward")
    for name, buf in (("x", x), ("weight", w), ("bias", b), ("y", y)):
        if buf is not None:
            buf.check_guards(name)
    return y.view


def run_backward_weight(emu, dtype, grad_y_kernel, x_kernel, kernel_size, deterministic,
                        workspace_fill=float("nan")):
    """grad_weight (KD, KH, KW, C) and grad_bias from the deterministic or the atomic launch."""
    acc = accum_dtype(dtype)
    sizes, k = shape_args(x_kernel, kernel_size)
    grad_y, x = Guarded(grad_y_kernel), Guarded(x_kernel)
    grad_w = Guarded.poisoned((*tuple(k), x_kernel.shape[-1]), acc)
    grad_b = Guarded.poisoned((x_kernel.shape[-1],), acc)
    if deterministic:
        workspace = Guarded(torch.full((emu.depthwise_conv_backward_weight_workspace_elems(
            sizes, k),), workspace_fill, dtype=acc))
        status = emu.depthwise_conv_backward_weight_deterministic(
            DTYPE_CODES[dtype], grad_y.ptr, x.ptr, workspace.ptr, grad_w.ptr, grad_b.ptr, sizes, k)
        workspace.check_guards("workspace")
    else:
        status = emu.depthwise_conv_backward_weight_atomic(
            DTYPE_CODES[dtype], grad_y.ptr, x.ptr, grad_w.ptr, grad_b.ptr, sizes, k)
    emu.check(status, "depthwise weight gradient")
    grad_w.check_guards("grad_weight")
    grad_b.check_guards("grad_bias")
    return grad_w.view, grad_b.view


def weight_grad_to_torch_layout(grad_w: torch.Tensor, dims: int) -> torch.Tensor:
    """(KD, KH, KW, C) -> (C, 1, *kernel)."""
    g = grad_w.permute(3, 0, 1, 2).unsqueeze(1)
    return g.squeeze(2) if dims == 4 else g


# ---- depthwise_conv ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial,kernel", CASES, ids=CASE_IDS)
def test_depthwise_forward_and_input_gradient(emu, spatial, kernel, dtype):
    """y = bias + conv(x) (+ x), and grad_x as the same launch on grad_y with the weight flipped,
    against float64 autograd."""
    for seed, layout in enumerate(LAYOUTS):
        batch, channels, with_bias, residual = layout
        x, weight, bias = make_inputs(batch, channels, spatial, kernel, dtype, seed)
        bias = bias if with_bias else None
        dims = x.dim()
        x64 = x.double().requires_grad_()
        conv = conv_reference(x64, weight, bias)
        y = run_forward(emu, dtype, to_kernel_layout(x), weight, bias, residual, kernel)
        assert_rel_close(from_kernel_layout(y, dims), conv + x64 if residual else conv,
                         tol(dtype, "conv"), f"y {layout}")

        grad_y = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        (grad_x_ref,) = torch.autograd.grad(conv, x64, grad_y.double())
        flipped = weight.flip(list(range(2, dims)))
        grad_x = run_forward(emu, dtype, to_kernel_layout(grad_y), flipped, None, False, kernel)
        assert_rel_close(from_kernel_layout(grad_x, dims), grad_x_ref, tol(dtype, "conv"),
                         f"grad_x {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial,kernel", CASES, ids=CASE_IDS)
def test_depthwise_weight_gradient(emu, spatial, kernel, dtype):
    """grad_weight and grad_bias, deterministic and atomic, against float64 autograd."""
    for seed, (batch, channels, _, _) in enumerate(LAYOUTS):
        x, weight, bias = make_inputs(batch, channels, spatial, kernel, dtype, seed)
        grad_y = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        w64, b64 = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        grad_w_ref, grad_b_ref = torch.autograd.grad(conv_reference(x.double(), w64, b64),
                                                     (w64, b64), grad_y.double())
        for deterministic in (True, False):
            grad_w, grad_b = run_backward_weight(emu, dtype, to_kernel_layout(grad_y),
                                                 to_kernel_layout(x), kernel, deterministic)
            what = f"{(batch, channels)} {'deterministic' if deterministic else 'atomic'}"
            assert_rel_close(weight_grad_to_torch_layout(grad_w, x.dim()), grad_w_ref,
                             tol(dtype, "conv"), f"grad_weight {what}")
            assert_rel_close(grad_b, grad_b_ref, tol(dtype, "conv"), f"grad_bias {what}")


def test_deterministic_weight_gradient_is_bitwise_reproducible(emu):
    """Bitwise equal under different block and thread schedules and workspace contents; the atomic
    variant is not (which shows the schedules really differ)."""
    x, _, _ = make_inputs(2, 40, (5, 9, 11), (3, 3, 3), torch.float32, seed=0)
    grad_y = torch.randn(x.shape, dtype=torch.float64).float()
    args = (to_kernel_layout(grad_y), to_kernel_layout(x), (3, 3, 3))
    results = {True: [], False: []}
    for seed, fill in ((1, float("nan")), (2, 1e30), (3, -7.0)):
        emu.set_schedule_seed(seed)
        for deterministic in (True, False):
            results[deterministic].append(run_backward_weight(emu, torch.float32, *args,
                                                              deterministic, workspace_fill=fill))
    first_w, first_b = results[True][0]
    for grad_w, grad_b in results[True][1:]:
        assert torch.equal(grad_w, first_w) and torch.equal(grad_b, first_b)
    assert any(not torch.equal(w, results[False][0][0]) for w, _ in results[False][1:])


# ---- pos_embed_norm ------------------------------------------------------------------------------

EPS = 1e-6
# (batch, channels): 144 is a multiple of every vector width and takes several rounds of a group's
# lanes in float32 / float64; 37 is scalar and needs two rounds of 32 lanes.
POS_EMBED_LAYOUTS = [(2, 37), (1, 144), (1, 6)]
POS_EMBED_BUFFERS = ("x", "weight", "bias", "norm_weight", "norm_bias", "y", "z")


def norm_params(channels, dtype, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    acc = accum_dtype(dtype)
    return ((1 + 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64)).to(acc).double(),
            torch.randn(channels, generator=gen, dtype=torch.float64).to(acc).double())


def run_pos_embed_norm(emu, dtype, x, weight, bias, norm_weight, norm_bias, layer_norm,
                       kernel_size, misaligned=()):
    """The launch on guarded buffers (those named in `misaligned` one element off 16 bytes);
    returns y, z (kernel layout), mean, rstd."""
    acc = accum_dtype(dtype)
    x_kernel = to_kernel_layout(x)
    off = {name: int(name in misaligned) for name in POS_EMBED_BUFFERS}
    buffers = {
        "x": Guarded(x_kernel, off["x"]),
        "weight": Guarded(weight_to_kernel_layout(weight).to(acc), off["weight"]),
        "bias": Guarded(bias.to(acc), off["bias"]),
        "norm_weight": Guarded(norm_weight.to(acc), off["norm_weight"]),
        "norm_bias": Guarded(norm_bias.to(acc), off["norm_bias"]),
        "y": Guarded.poisoned(x_kernel.shape, dtype, off["y"]),
        "z": Guarded.poisoned(x_kernel.shape, dtype, off["z"]),
        "mean": Guarded.poisoned((x_kernel[..., 0].numel(),), acc),
        "rstd": Guarded.poisoned((x_kernel[..., 0].numel(),), acc),
    }
    b = {name: buf.ptr for name, buf in buffers.items()}
    sizes, k = shape_args(x_kernel, kernel_size)
    emu.check(emu.pos_embed_norm(DTYPE_CODES[dtype], b["x"], b["weight"], b["bias"],
                                 b["norm_weight"], b["norm_bias"], layer_norm, EPS, b["y"], b["z"],
                                 b["mean"], b["rstd"], sizes, k), "pos_embed_norm")
    for name, buf in buffers.items():
        buf.check_guards(name)
    return [buffers[name].view for name in ("y", "z", "mean", "rstd")]


def pos_embed_norm_reference(x, weight, bias, norm_weight, norm_bias, layer_norm):
    """y, z, mean, rstd in float64 (mean / rstd of the LayerNorm, per pixel)."""
    y = x.double() + conv_reference(x.double(), weight, bias)
    y_last = y.movedim(1, -1)
    if layer_norm:
        z = F.layer_norm(y_last, (y.shape[1],), norm_weight, norm_bias, EPS).movedim(-1, 1)
    else:
        per_channel = (1, -1) + (1,) * (y.dim() - 2)
        z = y * norm_weight.view(per_channel) + norm_bias.view(per_channel)
    mean = y_last.mean(-1).reshape(-1)
    rstd = (y_last.var(-1, unbiased=False) + EPS).rsqrt().reshape(-1)
    return y, z, mean, rstd


def check_pos_embed_norm(emu, dtype, batch, channels, spatial, kernel, layer_norm, seed,
                         misaligned=()):
    x, weight, bias = make_inputs(batch, channels, spatial, kernel, dtype, seed)
    norm_weight, norm_bias = norm_params(channels, dtype, seed)
    args = (x, weight, bias, norm_weight, norm_bias, layer_norm)
    y, z, mean, rstd = run_pos_embed_norm(emu, dtype, *args, kernel, misaligned)
    y_ref, z_ref, mean_ref, rstd_ref = pos_embed_norm_reference(*args)
    what = f"{(batch, channels)} {'layernorm' if layer_norm else 'affine'}"
    assert_rel_close(from_kernel_layout(y, x.dim()), y_ref, tol(dtype, "conv"), f"y {what}")
    assert_rel_close(from_kernel_layout(z, x.dim()), z_ref, tol(dtype, "norm"), f"z {what}")
    if layer_norm:  # from y before it is rounded to dtype: accumulation-dtype accuracy
        assert_rel_close(mean, mean_ref, tol(accum_dtype(dtype), "norm"), f"mean {what}")
        assert_rel_close(rstd, rstd_ref, tol(accum_dtype(dtype), "norm"), f"rstd {what}")
    else:
        assert mean.isnan().all() and rstd.isnan().all(), "the affine norm wrote mean / rstd"


@pytest.mark.parametrize("layer_norm", [True, False], ids=["layernorm", "affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial,kernel", CASES, ids=CASE_IDS)
def test_pos_embed_norm(emu, spatial, kernel, dtype, layer_norm):
    for seed, (batch, channels) in enumerate(POS_EMBED_LAYOUTS):
        check_pos_embed_norm(emu, dtype, batch, channels, spatial, kernel, layer_norm, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_layer_norm_channel_limit(emu, dtype):
    """pos_embed_norm_max_channels is exact: that many channels run (their stash fills the emulated
    sm_90's 227 KiB of opted-in shared memory), one vector more is refused."""
    max_channels = emu.pos_embed_norm_max_channels(DTYPE_CODES[dtype])
    vec = VEC_WIDTH[dtype]
    assert max_channels > 0 and max_channels % vec == 0
    check_pos_embed_norm(emu, dtype, 1, max_channels, (1, 2), (3, 3), True, seed=0)
    shared = int(emu.launches()[-1].split(" shared=")[1].split()[0])
    assert 227 * 1024 - 32 * 2 * vec * accum_dtype(dtype).itemsize < shared <= 227 * 1024
    x = torch.zeros(1, 1, 1, 1, max_channels + vec, dtype=dtype)
    w, b = torch.zeros(1, 1, 1, max_channels + vec), torch.zeros(max_channels + vec)
    sizes, k = shape_args(x, (3, 3))
    status = emu.pos_embed_norm(DTYPE_CODES[dtype], ptr(x), ptr(w), ptr(b), ptr(b), ptr(b), 1, EPS,
                                ptr(x), ptr(x), ptr(b), ptr(b), sizes, k)
    assert status == CUDA_ERROR_INVALID_VALUE


# ---- index width and alignment -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_64_bit_index_path(emu, dtype):
    """needs_int64_index forced true (the emulation's test hook): every kernel takes its int64_t
    instantiation on small shapes and still matches float64."""
    emu.set_force_int64_index(1)
    for spatial, kernel in (((9, 13), (3, 3)), ((3, 7, 9), (3, 3, 3))):
        for seed, (batch, channels, _, _) in enumerate(LAYOUTS[:2]):
            x, weight, bias = make_inputs(batch, channels, spatial, kernel, dtype, seed)
            y = run_forward(emu, dtype, to_kernel_layout(x), weight, bias, True, kernel)
            ref = conv_reference(x.double(), weight, bias) + x.double()
            assert_rel_close(from_kernel_layout(y, x.dim()), ref, tol(dtype, "conv"), "y")
            grad_y = torch.randn(x.shape, dtype=torch.float64).to(dtype)
            w64, b64 = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            refs = torch.autograd.grad(conv_reference(x.double(), w64, b64), (w64, b64),
                                       grad_y.double())
            for deterministic in (True, False):
                grad_w, grad_b = run_backward_weight(emu, dtype, to_kernel_layout(grad_y),
                                                     to_kernel_layout(x), kernel, deterministic)
                assert_rel_close(weight_grad_to_torch_layout(grad_w, x.dim()), refs[0],
                                 tol(dtype, "conv"), "grad_weight")
                assert_rel_close(grad_b, refs[1], tol(dtype, "conv"), "grad_bias")
            for layer_norm in (True, False):
                check_pos_embed_norm(emu, dtype, batch, channels, spatial, kernel, layer_norm,
                                     seed)
    geometry_launches = [r for r in emu.launches() if "Geometry<" in r]
    assert len(geometry_launches) == 2 * 2 * (1 + 2 + 2)
    assert all("Geometry<long>" in r for r in geometry_launches), geometry_launches
    emu.clear_launch_log()
    emu.set_force_int64_index(0)
    run_forward(emu, dtype, to_kernel_layout(x), weight, bias, True, kernel)
    assert "Geometry<int>" in emu.launches()[-1]


def forward_blocks(x_kernel: torch.Tensor, vec: int) -> int:
    """The forward launcher's grid: 256 threads, each VEC channels of 4 outputs along W."""
    n, d, h, w, c = x_kernel.shape
    return -(-n * d * h * -(-w // 4) * (c // vec) // 256)


def layer_norm_shared_bytes(channels: int, vec: int, dtype) -> int:
    """pos_embed_norm's LayerNorm stash for 4 warps: rounds x 2 pixels x VEC values per lane."""
    channel_vecs = channels // vec
    group_lanes = 1
    while group_lanes < 32 and group_lanes < channel_vecs:
        group_lanes *= 2
    return 4 * -(-channel_vecs // group_lanes) * 2 * vec * 32 * accum_dtype(dtype).itemsize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_buffers_take_the_scalar_path(emu, dtype):
    """A buffer one element off a 16-byte boundary (a storage offset) sends the launch to the VEC=1
    kernel, whichever buffer it is, and the result is still right."""
    vec = VEC_WIDTH[dtype]
    spatial, kernel, batch, channels = (9, 13), (3, 3), 2, 48
    x, weight, bias = make_inputs(batch, channels, spatial, kernel, dtype, seed=0)
    x_kernel = to_kernel_layout(x)
    ref = conv_reference(x.double(), weight, bias)
    # forward: each buffer off in turn
    for misaligned in ((), ("x",), ("y",), ("weight",), ("bias",)):
        emu.clear_launch_log()
        y = run_forward(emu, dtype, x_kernel, weight, bias, False, kernel, misaligned)
        assert_rel_close(from_kernel_layout(y, 4), ref, tol(dtype, "conv"),
                         f"y, {misaligned} misaligned")
        (record,) = emu.launches()
        expect_vec = 1 if misaligned else vec
        assert record.startswith(f"grid=({forward_blocks(x_kernel, expect_vec)},1,1)"), record
    # pos_embed_norm (LayerNorm): each buffer off in turn
    for misaligned in ((), *((name,) for name in POS_EMBED_BUFFERS)):
        emu.clear_launch_log()
        check_pos_embed_norm(emu, dtype, batch, channels, spatial, kernel, True, 0, misaligned)
        expect_vec = vec if not misaligned else 1
        (record,) = emu.launches()
        assert f" shared={layer_norm_shared_bytes(channels, expect_vec, dtype)} " in record, record
