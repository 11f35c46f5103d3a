"""LoRA adapters (peft) on SAM's image encoder, and the check of the LoRA settings (``lora_rank``, ``lora_alpha``,
``lora_targets``, ``trainable_parts``) with messages that say which values are allowed."""

from __future__ import annotations

import re
from typing import Sequence

from peft import LoraConfig, get_peft_model
from torch import nn

TARGETS = ("qkv", "proj", "lin1", "lin2")  # the linear layers of a SAM image-encoder block
TRAINABLE = ("prompt_encoder", "mask_decoder")


def check_lora_args(rank, alpha=None, targets: Sequence[str] = TARGETS, trainable: Sequence[str] = TRAINABLE) -> None:
    """Raise ``ValueError`` saying what is allowed when a LoRA setting is not.

    ``rank``: an integer >= 0 (0: no adapters, as in a merged export; then there is no reference policy, so SAMPO
    training needs rank >= 1). ``alpha``: ``None`` (= rank) or a number > 0. ``targets``: a non-empty list of
    :data:`TARGETS`. ``trainable``: a list of :data:`TRAINABLE`; with ``rank`` 0 also ``image_encoder`` (full
    training of the whole SAM, as the testbed's pretraining does).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(
            f"lora_rank must be an integer >= 0, got {rank!r}: the rank of the LoRA adapters on the image encoder "
            "(64 by default; 0 means no adapters, which gives no reference policy, so SAMPO training needs >= 1)"
        )
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise ValueError(f"lora_alpha must be a number > 0 or null (= lora_rank), got {alpha!r}")
    if isinstance(targets, str) or not isinstance(targets, Sequence):
        raise ValueError(f"lora_targets must be a list of layer names among {list(TARGETS)}, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if rank > 0 and (unknown or not targets):
        raise ValueError(
            f"lora_targets must be a non-empty list among {list(TARGETS)} (the image encoder's linear layers), "
            f"got {list(targets)}" + (f"; unknown: {unknown}" if unknown else "")
        )
    if isinstance(trainable, str) or not isinstance(trainable, Sequence):
        raise ValueError(f"trainable_parts must be a list among {list(TRAINABLE)}, got {trainable!r}")
    allowed = TRAINABLE + (("image_encoder",) if rank == 0 else ())
    unknown = sorted(set(trainable) - set(allowed))
    if unknown:
        hint = " (image_encoder only with lora_rank 0: with adapters it is frozen)" if "image_encoder" in unknown else ""
        raise ValueError(f"trainable parts must be among {', '.join(allowed)}; got {unknown}{hint}")


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
    check_lora_args(rank, alpha, targets, trainable)
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


def fold_adapters(model, seed: int | None = 0) -> None:
    """Make the current trained model the new base, in place, and start fresh adapters on it (paper 003's stage
    boundary: the reference policy, adapters off, becomes the model trained so far; no second copy exists).

    * every LoRA layer: W <- W + scaling * B A (its delta folded into the frozen base weight), then A re-drawn
      (kaiming uniform, from ``seed`` without touching the global RNG) and B = 0, so the adapters add nothing yet;
    * every trained ``modules_to_save`` copy (prompt encoder, mask decoder) is copied into the original it shadows.

    Afterwards the model computes what it computed before (up to float rounding of the fold), with adapters on and
    with adapters off. ``model`` is the peft model of :func:`add_lora`.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    with torch.no_grad(), torch.random.fork_rng(enabled=seed is not None, devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                for name in list(module.lora_A.keys()):
                    base.weight += module.get_delta_weight(name).to(base.weight.dtype)
                    module.reset_lora_parameters(name, init_lora_weights=True)
            elif isinstance(module, ModulesToSaveWrapper):
                trained = module.modules_to_save[module.active_adapters[0]]
                module.original_module.load_state_dict(trained.state_dict())
