"""Which weights a fine-tuning run starts from (``configs/train.yaml``: ``base``, ``model_size``, ``sam_checkpoint``).

    base = official   models/sam_vit_b_01ec64.pth is present (``make download``): SAM ViT-B at 224 px, the papers'
    base = testbed    otherwise: the intent-gap testbed's ``small`` SAM, pretrained in this repository on SAM's own
                      objective (``make base``; docs/testbed.md) and committed as models/sam_small_base.pth, at 256 px

A newcomer without SAM weights thus fine-tunes a model that segments the clicked object, and sees the intent gap
close, instead of training a random ViT-B. ``--model_size`` / ``--sam_checkpoint`` / ``--image_size`` still override
each choice; any other size (``tiny``, ``vit_l``, ``vit_h``) looks for its official file in ``ckpt_dir``.
"""

from __future__ import annotations

import os

from bundle.networks.sam_builder import OFFICIAL_CHECKPOINTS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTBED_CHECKPOINT = os.path.join(REPO_ROOT, "models", "sam_small_base.pth")
TESTBED_SIZE = "small"
IMAGE_SIZES = {TESTBED_SIZE: 256}  # the size the base was pretrained at; every other size: the papers' 224


def choose_base(ckpt_dir: str) -> str:
    """``official`` when the official ViT-B checkpoint is in ``ckpt_dir``, else ``testbed``."""
    return "official" if os.path.isfile(os.path.join(ckpt_dir, OFFICIAL_CHECKPOINTS["vit_b"])) else "testbed"


def base_model_size(base: str) -> str:
    if base not in ("official", "testbed"):
        raise ValueError(f"base must be 'official' (SAM ViT-B) or 'testbed' (the small base of docs/testbed.md), got {base!r}")
    return "vit_b" if base == "official" else TESTBED_SIZE


def base_checkpoint(model_size: str, ckpt_dir: str) -> str:
    """The file a ``model_size`` network starts from: the committed testbed base for ``small``, else the official
    checkpoint's name in ``ckpt_dir`` (absent: the network says it starts from random initialisation)."""
    if model_size == TESTBED_SIZE:
        return TESTBED_CHECKPOINT
    return os.path.join(ckpt_dir, OFFICIAL_CHECKPOINTS.get(model_size, f"sam_{model_size}.pth"))


def base_image_size(model_size: str) -> int:
    return IMAGE_SIZES.get(model_size, 224)


def describe(initialisation: str) -> str | None:
    """The line a run prints at its start and end about its starting weights, or None for official SAM weights."""
    if initialisation == "random":
        return "training SAM from RANDOM INITIALISATION (no official checkpoint in models/; see README)"
    if initialisation == os.path.basename(TESTBED_CHECKPOINT):
        return ("no official SAM checkpoint in models/: fine-tuning the intent-gap testbed's small SAM pretrained in "
                "this repository (models/sam_small_base.pth, docs/testbed.md), not SAM ViT-B")
    return None
