"""When an op may run its implementation directly instead of through its torch.library custom op.

The custom op's dispatch (dispatcher, autograd wrapper, the Python kernel's lookup) costs ~85 µs a
call on a 2-vCPU AMD EPYC: more than the depthwise kernel itself at UniFormer's batch-1 stage-3/4
shapes (~40 µs). Eager inference does not need it. Everything else does, and goes through the op:
torch.compile and export (Dynamo, fake tensors, tracing modes must see the op), torch.jit.trace
(its tracer records dispatcher calls: it would record the kernel's insides instead of the op),
autograd (a gradient to record), tensor subclasses, torch_function/torch_dispatch modes,
functorch transforms.
The implementation is the same function either way, so both paths give the same result.
"""
from __future__ import annotations

import torch

# nn.Parameter is a Tensor subclass that disables __torch_function__: a module's weights are plain
# tensors to the op. Any other subclass may intercept the call and must see the op.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def may_skip_dispatch(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` (None entries ignored) is plain eager inference."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    present = [t for t in tensors if t is not None]
    if any(type(t) not in _PLAIN_TYPES for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None)
