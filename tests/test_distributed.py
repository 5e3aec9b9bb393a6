"""Data-parallel training of an accelerated model: DDP and FSDP2 (``fully_shard``) over 2 gloo
processes on the CPU, the averaged gradients against the float64 reference on the same data, and
no "Grad strides do not match bucket view strides" warning (gradients come back in their
parameter's layout, also for a model whose parameters were made channels-last)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import uniformer_models as um
from uniformer_kernels.convert import accelerate
from uniformer_kernels.testing import assert_rel_close, randomize_state_, tolerance

WORLD = 2
SHAPE = (2, 3, 64, 64)  # per rank; stage 4 is 2x2


def tiny_model(channels_last: bool = False) -> nn.Module:
    model = um.UniFormer(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 64), head_dim=16,
                         num_classes=10)
    model = randomize_state_(model).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def shard(rank: int) -> torch.Tensor:
    """Rank ``rank``'s batch, channels-last as a data loader may hand it over."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(rank + 1))
    return x.contiguous(memory_format=torch.channels_last)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    w = torch.sin(torch.arange(out.numel(), dtype=torch.float64) * 0.37).view(out.shape)
    return (out.double() * w).sum()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def reference_grads() -> dict[str, torch.Tensor]:
    """What data-parallel training computes: the mean over ranks of each rank's gradient, each
    with its own batch statistics; in float64, in one process."""
    model = tiny_model().double()
    for rank in range(WORLD):
        (loss_of(model(shard(rank).double())) / WORLD).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _worker(rank: int, store: str, wrapper: str, channels_last: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = accelerate(tiny_model(channels_last))
        if wrapper == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in [b for name in ("blocks1", "blocks2", "blocks3", "blocks4")
                          for b in getattr(model, name)]:
                fully_shard(block)
            wrapped = fully_shard(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_of(wrapped(shard(rank))).backward()
        strides = [str(w.message) for w in caught if "stride" in str(w.message).lower()]
        assert not strides, strides
        expected = reference_grads()
        got = []
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            if wrapper == "ddp":
                assert grad.stride() == p.stride(), (name, grad.stride(), p.stride())
            got.append(grad)
        # concatenated: some are analytically zero (biases feeding a train-mode BatchNorm)
        assert_rel_close(flat(got), flat(expected.values()), tolerance(torch.float32, "model"),
                         name=f"{wrapper} gradients on rank {rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not built into this torch")
@pytest.mark.slow
@pytest.mark.parametrize("wrapper,channels_last", [("ddp", False), ("ddp", True), ("fsdp2", False)])
def test_data_parallel_training_matches_the_reference(wrapper, channels_last, tmp_path):
    """Two processes, ~25 s each case on 2 cores (start-up, the imports, the float64 reference)."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), wrapper, channels_last), nprocs=WORLD,
             join=True)


@pytest.mark.parametrize("backend", [None, "eager"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_gradients_keep_the_parameter_layout(channels_last, backend):
    """The strides DDP compares, without processes. With channels-last parameters the depthwise
    weights' gradients came back contiguous and the 1x1 weights' with flatten's strides; a
    gradient that differs only in size-1 dims is stored as is, so p.grad shows it."""
    model = accelerate(tiny_model(channels_last), backend=backend)
    loss_of(model(shard(0))).backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
