"""Drop-in accelerated modules: ``DepthwiseConv2d/3d`` (op 1 as an nn.Conv2d/3d), and UniFormer's
blocks, stems and MLPs with the reference modules' parameters, buffers and attribute names (a
converted model's state_dict is key-for-key the same), forward built on uk.ops and GEMMs on
channels-last, token-major activations.

Each class derives from its reference class in ``uniformer_models`` (so it can be built directly,
and ``isinstance`` checks against the reference still hold) and is what ``uk.accelerate`` swaps a
matching module's class to. Blocks return channels-last maps; a model's outputs keep the
reference's shapes and formats. ``UniFormerLight`` is the one root: it converts the official
light models, whose pruning state lives in module globals, to the reference's explicit-state forward.
"""
from .cblock import CBlock
from .depthwise_conv import DepthwiseConv2d, DepthwiseConv3d
from .evo_block import EvoSABlock
from .light_root import UniFormerLight
from .mlp import CMlp, Mlp
from .sablock import SABlock
from .split_block import SplitSABlock
from .stems import PatchEmbed, head_embedding, middle_embedding
from .window_block import SABlock_Windows

# The order accelerate() tries them in: a module goes to the first class that claims it (by
# attribute names), which then checks the rest of its structure.
MODULES = (UniFormerLight, SplitSABlock, SABlock_Windows, EvoSABlock, CBlock, SABlock, PatchEmbed,
           head_embedding, middle_embedding, Mlp, CMlp)

__all__ = ["DepthwiseConv2d", "DepthwiseConv3d", "CBlock", "SABlock", "SABlock_Windows",
           "SplitSABlock", "EvoSABlock", "Mlp", "CMlp", "PatchEmbed", "head_embedding",
           "middle_embedding", "UniFormerLight", "MODULES"]
