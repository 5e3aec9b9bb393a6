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
