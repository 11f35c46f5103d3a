"""SAM as a promptable MONAI network with LoRA adapters on the image encoder.

Two ways in:

* ``net(x) -> logits``: the single-tensor contract used by inference, MONAI Label, MONAI Deploy and TorchScript.
  ``x`` is (B, C + 2, H, W): C image channels in [0, 1] then foreground and background click channels
  (see :mod:`bundle.guidance`). The output is (B, 1, H, W) mask logits from the output slot with the highest
  predicted IoU.
* ``encode`` / ``decode``: the trainer's API. Each image is encoded once; the prompt sets of all images are decoded
  together with ``multimask_output=True`` (M = 3 masks per prompt set).

Both decode each prompt set with its real clicks plus SAM's single padding point, as ``SamPredictor`` does
(:mod:`bundle.networks.decoding`): the number of click slots a set is stored with never reaches the decoder.

The reference policy is the same network with its adapters disabled (:meth:`reference`): LoRA on the image
encoder is switched off, and the trainable prompt encoder / mask decoder fall back to their initial weights
(peft ``modules_to_save`` keeps the trained copy beside the original). No second copy of the encoder exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bundle.guidance import guidance_to_points
from bundle.networks.activation_checkpointing import checkpoint_blocks
from bundle.networks.decoding import best_slot, decode_prompt_sets
from bundle.networks.lora import add_lora, check_lora_args
from bundle.networks.sam_builder import build_sam, load_sam_checkpoint

logger = logging.getLogger(__name__)


def _initial_sam(model_size: str, image_size: int, sam_checkpoint: str | None, require_checkpoint: bool,
               seed: int | None) -> tuple[nn.Module, str]:
    """The SAM a :class:`PromptableSAM` wraps, before adapters, and its ``initialisation``: the file name of
    ``sam_checkpoint`` when it was loaded, else ``random`` (built from ``seed``; the global RNG is left as it was)."""
    with torch.random.fork_rng(enabled=seed is not None, devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        sam = build_sam(model_size, image_size)
    if sam_checkpoint and os.path.isfile(sam_checkpoint):
        load_sam_checkpoint(sam, sam_checkpoint)
        return sam, os.path.basename(sam_checkpoint)
    if sam_checkpoint and require_checkpoint:
        raise FileNotFoundError(f"SAM checkpoint not found: {sam_checkpoint} (see README: download the checkpoint)")
    if not sam_checkpoint:  # inference / export: trained weights replace these next (and say so when loaded)
        logger.info("%s built with random weights (no SAM checkpoint given)", model_size)
    else:
        logger.warning(
            "No SAM checkpoint found%s: %s starts from RANDOM INITIALISATION. "
            "Put the official checkpoint in models/ (README: 'Official checkpoints') to fine-tune SAM.",
            f" at {sam_checkpoint}" if sam_checkpoint else "",
            model_size,
        )
    return sam, "random"


class PromptableSAM(nn.Module):
    """Segment Anything with point prompts, LoRA on the image encoder, and a single-tensor forward.

    Args:
        model_size: ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny`` (tests).
        image_size: square input size of the image encoder (224 in the papers).
        in_channels: image channels before the two click channels (3: RGB, or grey CT repeated).
        sam_checkpoint: official SAM checkpoint to start from; ``None`` or a missing file with
            ``require_checkpoint=False`` means random initialisation, announced in the log.
        require_checkpoint: raise if ``sam_checkpoint`` does not exist instead of starting from random weights.
        lora_rank: LoRA rank on the image encoder (0: no adapters, e.g. a merged export).
        lora_alpha: LoRA scaling numerator (default: ``lora_rank``).
        lora_targets: names of the encoder's linear layers that get adapters.
        trainable_parts: SAM parts trained in full beside the adapters (``prompt_encoder``, ``mask_decoder``).
        max_points: clicks read per guidance channel in the single-tensor forward.
        activation_checkpointing: recompute the image encoder's block activations in the backward pass (less
            memory, about one more encoder forward per training step; :mod:`.activation_checkpointing`).
        seed: build the SAM weights from this seed (the global RNG is left as it was), so that a random base can
            be rebuilt for the adapter-sized checkpoints of :mod:`bundle.checkpoints`; None: the global RNG.
    """

    def __init__(
        self,
        model_size: str = "vit_b",
        image_size: int = 224,
        in_channels: int = 3,
        sam_checkpoint: str | None = None,
        require_checkpoint: bool = False,
        lora_rank: int = 64,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = ("qkv", "proj", "lin1", "lin2"),
        trainable_parts: Sequence[str] = ("prompt_encoder", "mask_decoder"),
        max_points: int = 16,
        seed: int | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey, repeated to RGB) or 3, got {in_channels}")
        self.model_size = model_size
        self.image_size = image_size
        self.in_channels = in_channels
        self.max_points = max_points
        self.seed = seed
        sam, self.initialisation = _initial_sam(model_size, image_size, sam_checkpoint, require_checkpoint, seed)
        check_lora_args(lora_rank, lora_alpha, lora_targets, trainable_parts)
        self.lora_rank = lora_rank
        self.lora_targets = tuple(lora_targets) if lora_rank > 0 else ()
        if lora_rank > 0:
            self.sam = add_lora(sam, lora_rank, lora_alpha, lora_targets, trainable_parts)
        else:
            for name, param in sam.named_parameters():
                param.requires_grad = name.split(".")[0] in trainable_parts
            self.sam = sam
        if activation_checkpointing:
            checkpoint_blocks(self._sam.image_encoder)
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1), False)

    # -- parts -------------------------------------------------------------------------------------------------
    @property
    def _sam(self):
        """The (possibly peft-injected) ``Sam`` module."""
        return self.sam.get_base_model() if self.lora_rank > 0 else self.sam

    @contextlib.contextmanager
    def reference(self):
        """Context in which the network is the reference policy pi_ref (adapters disabled, no gradients)."""
        if self.lora_rank == 0:
            raise RuntimeError(
                "lora_rank 0 means no LoRA adapters, so there is no reference policy (the network with its adapters "
                "off) for SAMPO's preference terms: train with lora_rank >= 1 (0 is for merged exports / inference)"
            )
        with torch.no_grad(), self.sam.disable_adapter():
            yield self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, D, h, w) image embeddings (resized to ``image_size`` first)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (images * 255.0 - self.pixel_mean) / self.pixel_std
        return self._sam.image_encoder(x)

    def decode(
        self,
        embeddings: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        input_size: Optional[Tuple[int, int]] = None,
    ):
        """Decode N prompt sets per image, each as ``SamPredictor`` would (:mod:`bundle.networks.decoding`).

        Args:
            embeddings: (B, D, h, w) image embeddings from :meth:`encode`.
            points: (B, N, P, 2) (x, y) pixel coordinates in an image of ``input_size`` (H, W), by default
                ``image_size`` square.
            labels: (B, N, P) 1 foreground, 0 background, -1 no click (padding to a common P; not a token).
            input_size: size of the image the points refer to; they are scaled to ``image_size``.

        Returns:
            low-resolution mask logits (B, N, 3, 4h, 4w) and predicted IoUs (B, N, 3).
        """
        if input_size is not None:
            h, w = input_size
            scale = torch.tensor([self.image_size / w, self.image_size / h], dtype=points.dtype, device=points.device)
            points = points * scale
        sam = self._sam
        return decode_prompt_sets(sam.prompt_encoder, sam.mask_decoder, embeddings, points, labels)

    # -- single-tensor contract ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C + 2, H, W) image + click channels -> (B, 1, H, W) logits of the best predicted-IoU mask."""
        expected = self.in_channels + 2
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(
                f"expected input (B, {expected}, H, W): {self.in_channels} image channels + 2 click channels, "
                f"got {tuple(x.shape)}"
            )
        return self.decode_clicks(self.encode(x[:, : self.in_channels]), x[:, self.in_channels :])

    def decode_clicks(self, embeddings: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The second half of :meth:`forward`: (B, D, h, w) embeddings of the images and their (B, 2, H, W) click
        channels -> (B, 1, H, W) logits of the best predicted-IoU mask (:mod:`bundle.predictor` caches the first)."""
        points, labels = guidance_to_points(guidance, self.max_points)
        return self.decode_points(embeddings, points, labels, tuple(guidance.shape[-2:]))

    def decode_points(self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                      size: Tuple[int, int]) -> torch.Tensor:
        """(B, D, h, w) embeddings, one prompt set per image ((B, P, 2) (x, y) clicks in an image of ``size``,
        (B, P) labels 1 / 0 / -1) -> (B, 1, *size) logits of the best predicted-IoU mask."""
        low, iou = self.decode(embeddings, points[:, None], labels[:, None], size)
        return F.interpolate(best_slot(low, iou), size=size, mode="bilinear", align_corners=False)


class ReferencePolicy(nn.Module):
    """The network with its adapters disabled (pi_ref): zero-shot SAM from the initialisation the run started at."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.net = network
        self.in_channels = network.in_channels
        self.max_points = network.max_points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.net.reference():
            return self.net(x)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self.net.reference():
            return self.net.encode(images)

    def decode(self, *args, **kwargs):
        with self.net.reference():
            return self.net.decode(*args, **kwargs)


def policy(network: nn.Module, which: str = "actor") -> nn.Module:
    """``actor``: the network as trained; ``reference``: the same network with adapters off (zero-shot SAM)."""
    if which == "actor":
        return network
    if which == "reference":
        return ReferencePolicy(network)
    raise ValueError(f"eval_policy must be 'actor' or 'reference', got {which!r}")
