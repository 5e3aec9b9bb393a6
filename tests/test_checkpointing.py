"""Activation checkpointing of the video and dense models (``use_checkpoint``, ``checkpoint_num``,
the official options): the first n blocks of each stage are recomputed in backward, state_dict
and gradients are unchanged, and accelerated models keep it."""
from __future__ import annotations

import copy

import pytest
import torch

import uniformer_models as um
import uniformer_kernels as uk
from uniformer_kernels.testing import assert_rel_close, randomize_state_, tolerance

WIDTHS = dict(embed_dim=(16, 32, 64, 64), head_dim=16, num_classes=10)
CASES = {
    "video": (lambda **kw: um.UniFormerVideo(depth=(2, 1, 2, 1), **WIDTHS, **kw), (2, 3, 4, 32, 32)),
    "dense": (lambda **kw: um.UniFormer(depth=(2, 1, 2, 1), features_only=True, hybrid=True,
                                        window_size=2, **WIDTHS, **kw), (2, 3, 64, 48)),
}
NUM = (1, 0, 2, 1)


def grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    total = sum((o.double() * torch.sin(torch.arange(o.numel(), dtype=torch.float64)).view(o.shape)).sum()
                for o in (out if isinstance(out, (list, tuple)) else [out]))
    total.backward()
    return torch.cat([x.grad.reshape(-1)] + [p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("accelerated", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_blocks_are_recomputed_with_the_same_gradients(case, accelerated):
    build, shape = CASES[case]
    plain = randomize_state_(build()).train()
    ckpt = build(use_checkpoint=True, checkpoint_num=NUM).train()
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    if accelerated:
        plain, ckpt = uk.accelerate(plain), uk.accelerate(ckpt)
    calls = {}
    for stage in range(4):
        for i, blk in enumerate(getattr(ckpt, f"blocks{stage + 1}")):
            # a pre-hook: the recomputation stops once it has what backward needs (early stop)
            blk.register_forward_pre_hook(
                lambda m, a, key=(stage, i): calls.__setitem__(key, calls.get(key, 0) + 1))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    # BatchNorm in train mode updates its statistics again when a block is recomputed (as in
    # the official code); the gradients do not depend on them
    expected = grads(copy.deepcopy(plain), x)
    got = grads(ckpt, x)
    assert_rel_close(got, expected, tolerance(torch.float32, "model"))
    assert calls == {(s, i): 2 if i < NUM[s] else 1 for s in range(4)
                     for i in range(len(getattr(ckpt, f"blocks{s + 1}")))}


def test_checkpoint_num_is_checked():
    with pytest.raises(ValueError, match="checkpoint_num"):
        um.UniFormerVideo(depth=(1, 1, 1, 1), **WIDTHS, use_checkpoint=True, checkpoint_num=(1, 1))
    with pytest.raises(ValueError, match="checkpoint_num"):
        um.UniFormer(depth=(1, 1, 1, 1), **WIDTHS, checkpoint_num=(0, -1, 0, 0))


def saved_activation_bytes(model, x) -> int:
    """Bytes of the distinct activation storages autograd holds for backward after ``model(x)``
    (parameters excluded): the part of a training step's peak memory that checkpointing frees,
    measured deterministically (the CPU allocator reports no peak). Tensors a checkpointed block
    saves go to torch.utils.checkpoint's own hooks, which drop them, so they are not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.clone().requires_grad_(True))
    return sum(storages.values())


@pytest.mark.parametrize("accelerated", [False, True])
def test_checkpointing_lowers_the_memory_held_for_backward(accelerated):
    """Video model: checkpointing no block, the first NUM blocks, every block of each stage holds
    strictly less for backward each time (reference and accelerated)."""
    build, shape = CASES["video"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    held = []
    for num in ((0, 0, 0, 0), NUM, (2, 1, 2, 1)):
        model = randomize_state_(build(use_checkpoint=True, checkpoint_num=num)).train()
        held.append(saved_activation_bytes(uk.accelerate(model) if accelerated else model, x))
    assert held[0] > held[1] > held[2] > 0, held
