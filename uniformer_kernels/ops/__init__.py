"""Fused ops, one public function per file (e.g. ``ops/depthwise.py`` -> ``ops.depthwise_conv``).

Each op checks its arguments, picks a backend with ``backends.resolve_backend`` and is registered
as a ``torch.library`` custom op (fake implementation and autograd included) so models using it
compile with ``torch.compile(fullgraph=True)``. Ops are added here as they are written.
"""
from .attention import attention
from .depthwise import depthwise_conv
from .pos_embed_norm import fold_batchnorm, pos_embed_norm

__all__ = ["depthwise_conv", "pos_embed_norm", "fold_batchnorm", "attention"]
