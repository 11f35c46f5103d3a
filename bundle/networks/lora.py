"""LoRA adapters (peft) on SAM's image encoder."""

from __future__ import annotations

import re
from typing import Sequence

from peft import LoraConfig, get_peft_model
from torch import nn


def add_lora(
    sam: nn.Module,
    rank: int = 64,
    alpha: float | None = None,
    targets: Sequence[str] = ("qkv", "proj", "lin1", "lin2"),
    trainable: Sequence[str] = ("prompt_encoder", "mask_decoder"),
):
    """Wrap ``sam`` in a peft model: LoRA of ``rank`` on the image encoder's ``targets``, ``trainable`` parts in full.

    The image encoder's own weights are frozen. The parts in ``trainable`` are peft ``modules_to_save``: a trained
    copy sits beside the frozen original, so ``disable_adapter()`` gives back the whole initial model.
    """
    unknown = set(trainable) - {"prompt_encoder", "mask_decoder"}
    if unknown:
        raise ValueError(f"trainable parts must be among prompt_encoder, mask_decoder; got {sorted(unknown)}")
    names = "|".join(re.escape(t) for t in targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=0.0,
        target_modules=rf"image_encoder\.blocks\.\d+\.(?:.*\.)?(?:{names})",
        modules_to_save=list(trainable) or None,
    )
    model = get_peft_model(sam, config)
    if not any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError(f"no image-encoder linear layer matches lora_targets {list(targets)}")
    return model
