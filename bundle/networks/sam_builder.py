"""Build Segment Anything at any input size and load official checkpoints into it.

The official checkpoints are made for 1024x1024 inputs (a 64x64 token grid). At another input size the absolute
position embedding and the relative-position tables of the global-attention blocks no longer match; they are
resized here the way ``segment_anything`` itself interpolates relative positions (linear) and the way ViTs
resize absolute embeddings (bicubic).
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

logger = logging.getLogger(__name__)

PATCH_SIZE = 16
OFFICIAL_IMAGE_SIZE = 1024

# encoder width/depth/heads/global blocks as in segment_anything.build_sam; "small" is the base pretrained in this
# bundle (configs/pretrain.yaml; docs/testbed.md says why these numbers), "tiny" is for tests only.
SAM_SIZES: dict[str, dict] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "small": {
        "embed_dim": 192,
        "depth": 4,
        "num_heads": 3,
        "global_attn_indexes": (1, 3),
        "window_size": 8,
        "prompt_embed_dim": 128,
        "decoder_mlp_dim": 512,
        "decoder_heads": 4,
        "iou_head_hidden_dim": 128,
        "mask_in_chans": 16,
    },
    "tiny": {
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "global_attn_indexes": (1,),
        "window_size": 7,
        "prompt_embed_dim": 32,
        "decoder_mlp_dim": 64,
        "decoder_heads": 2,
        "iou_head_hidden_dim": 32,
        "mask_in_chans": 4,
    },
}
OFFICIAL_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}


class CheckpointError(ValueError):
    """A SAM checkpoint that cannot be loaded into the requested network."""


def build_sam(model_size: str = "vit_b", image_size: int = 224) -> Sam:
    """Build an untrained SAM of ``model_size`` for square inputs of ``image_size`` pixels."""
    if model_size not in SAM_SIZES:
        raise ValueError(f"model_size '{model_size}' is not one of {sorted(SAM_SIZES)}")
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size {image_size} must be a multiple of the patch size {PATCH_SIZE}")
    cfg = SAM_SIZES[model_size]
    prompt_dim = cfg.get("prompt_embed_dim", 256)
    grid = image_size // PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=PATCH_SIZE,
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=4,
            out_chans=prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg.get("window_size", 14),
            global_attn_indexes=cfg["global_attn_indexes"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=cfg.get("mask_in_chans", 16),
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=prompt_dim,
                mlp_dim=cfg.get("decoder_mlp_dim", 2048),
                num_heads=cfg.get("decoder_heads", 8),
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.get("iou_head_hidden_dim", 256),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, H, W, C) absolute position embedding -> (1, grid, grid, C), bicubic."""
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos.dtype)


def _resize_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) relative position table -> (length, C), linear, as segment_anything's get_rel_pos."""
    resized = F.interpolate(rel.float().T.unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized[0].T.to(rel.dtype)


def adapt_state_dict(state: dict[str, torch.Tensor], model: Sam, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return ``state`` with position tables resized to ``model``'s token grid; raise on any other mismatch.

    Every key of ``model`` must be in ``state`` and no other key may be; tensors must match in shape except the
    absolute position embedding and the ``rel_pos_h`` / ``rel_pos_w`` tables, which are interpolated.
    """
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match the SAM layout of the requested model "
            f"(missing {len(missing)}: {missing[:5]}, unexpected {len(unexpected)}: {unexpected[:5]})"
        )
    out, mismatched = {}, []
    for key, want in target.items():
        value = state[key]
        if value.shape != want.shape:
            if key.endswith("image_encoder.pos_embed") and value.ndim == 4 and value.shape[-1] == want.shape[-1]:
                value = _resize_pos_embed(value, want.shape[1])
            elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == want.shape[1]:
                value = _resize_rel_pos(value, want.shape[0])
            else:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}")
                continue
        out[key] = value
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensors do not fit the requested model (is it another SAM size?): "
            + "; ".join(mismatched[:5])
        )
    return out


def read_file(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU; ``FileNotFoundError`` / :class:`CheckpointError` naming
    the file (``what`` names the kind of file in the first)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:  # truncated file, wrong format, pickle with code ...
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def load_sam_checkpoint(model: Sam, path: str | os.PathLike) -> Sam:
    """Load an official-layout SAM checkpoint at ``path`` into ``model``, resizing position tables as needed."""
    path = os.fspath(path)
    state = read_file(path, "SAM checkpoint")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors in the official SAM key layout")
    model.load_state_dict(adapt_state_dict(state, model, source=path), strict=True)
    logger.info("loaded SAM weights from %s", path)
    return model


def save_sam_checkpoint(model: Sam, path: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
    """Write ``model``'s weights in the official key layout (what :func:`load_sam_checkpoint` reads) to ``path``.

    Floating tensors are cast to ``dtype`` (e.g. ``torch.float16`` to halve the file) when given. The file is written
    to ``path.tmp`` and renamed, so a killed run never leaves a truncated checkpoint. Returns its md5.
    """
    path = os.fspath(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    with open(path, "rb") as f:
        md5 = hashlib.md5(f.read()).hexdigest()
    logger.info("wrote SAM weights to %s (md5 %s)", path, md5)
    return md5
