"""Activation checkpointing of SAM's image-encoder blocks (memory option; issue 12).

A checkpointed block keeps only its input during the forward pass and recomputes its activations in the backward
pass (``torch.utils.checkpoint``, non-reentrant): the encoder's activation memory drops from about depth x block
activations to one block's, for about one more encoder forward per step. Gradients are unchanged. Only training
passes with gradients are checkpointed; inference, ``no_grad`` passes (the reference policy) and tracing run the
plain block. The block's class is swapped in place, so parameter names and checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedBlock(Block):
    """SAM's ViT :class:`Block` whose training forward is recomputed in the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def checkpoint_blocks(image_encoder: nn.Module) -> int:
    """Make every block of ``image_encoder`` a :class:`CheckpointedBlock`; returns how many."""
    blocks = [b for b in image_encoder.blocks if isinstance(b, Block)]
    for block in blocks:
        block.__class__ = CheckpointedBlock
    return len(blocks)
