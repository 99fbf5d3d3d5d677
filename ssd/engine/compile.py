"""`train.compile=true`: regional compilation, one transformer block at a time.

Compiling a whole backbone's `forward` misses the token paths (masked and kept-token encodes call the blocks
through `forward_features` and hooks), and recompiles for every crop size. Compiling each block's `forward`
instead covers every path that runs the blocks, compiles one graph per block class and sequence length (identical
blocks share it: the compile time of one block, not of the network), and leaves forward hooks (masked_kd's block
outputs) outside the compiled code. A backbone without transformer blocks (ResNet, ConvNeXt) is compiled whole.
Parameters and state dicts do not change, so checkpoints and exports are those of an eager run.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of a timm ViT / Eva (or a predictor built like one); [] for other modules."""
    blocks = getattr(module, "blocks", None)
    return list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []


def compile_regions(method: nn.Module) -> dict[str, int]:
    """Compile every transformer block of every network of `method` (student, teacher, predictor, ...), and each
    block-less `backbone` whole; returns the counts (blocks, whole backbones)."""
    counts = {"blocks": 0, "backbones": 0}
    for name, module in method.named_modules():
        blocks = transformer_blocks(module)
        for block in blocks:
            block.forward = torch.compile(block.forward)
            counts["blocks"] += 1
        block_less = not any(transformer_blocks(m) for m in module.modules())
        if block_less and name.rsplit(".", 1)[-1] == "backbone":
            module.compile()
            counts["backbones"] += 1
    return counts
