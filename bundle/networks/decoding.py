"""Decoding point prompts exactly as ``segment_anything.SamPredictor`` does: the real clicks plus one padding point.

SAM's mask decoder attends to every sparse token, "not a point" padding tokens included, so a prompt's masks depend
on how many padding tokens come with it. ``SamPredictor.predict(point_coords, point_labels)`` gives the decoder the
k real clicks followed by SAM's single padding point (k + 1 tokens; no token at all when k = 0). In this bundle
prompt sets travel padded to a common length P (label -1 = "no click", so that sets of different sizes stack into
one tensor); this module strips that storage padding before the decoder sees it:

    tokens(S) = [e(p_1, l_1), ..., e(p_k, l_k), e_pad]      e(p, l) = PE(p + 0.5) + w_l,  e_pad = w_not_a_point

Prompt sets are grouped by their number of real clicks k; each group is decoded in one batched call of k + 1 sparse
tokens, every prompt set against the embedding of its own image (SAM's ``MaskDecoder.predict_masks`` without its
``repeat_interleave`` of one image, so sets of different images share a call). Every surface -- the trainer, the
single-tensor ``net(x)``, evaluation, the sensitivity grid, TorchScript and MONAI Label -- decodes through here.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bundle.guidance import PAD_LABEL


def embed_points(prompt_encoder: nn.Module, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SAM's ``PromptEncoder._embed_points(pad=True)``, trace-safe: (T, k, 2), (T, k) -> (T, k + 1, C).

    The same arithmetic with ``torch.where`` instead of SAM's boolean-mask writes, whose trace would fix k.
    """
    pe = prompt_encoder
    points = torch.cat([points + 0.5, torch.zeros_like(points[:, :1])], dim=1)
    labels = torch.cat([labels, torch.full_like(labels[:, :1], PAD_LABEL)], dim=1).unsqueeze(-1)
    emb = pe.pe_layer.forward_with_coords(points, pe.input_image_size)
    emb = torch.where(labels == PAD_LABEL, pe.not_a_point_embed.weight.expand_as(emb), emb)
    emb = torch.where(labels == 0, emb + pe.point_embeddings[0].weight, emb)
    return torch.where(labels == 1, emb + pe.point_embeddings[1].weight, emb)


def predict_masks(prompt_encoder: nn.Module, mask_decoder: nn.Module, embeddings: torch.Tensor,
                  sparse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``MaskDecoder`` with ``multimask_output=True`` for T prompt sets, each against its own image embedding.

    Args:
        embeddings: (T, D, h, w) image embedding of each prompt set.
        sparse: (T, K, D) sparse prompt tokens (see :func:`embed_points`; K may be 0).

    Returns:
        low-resolution mask logits (T, 3, 4h, 4w) and predicted IoUs (T, 3): SAM's slots 1..3.
    """
    pe, dec = prompt_encoder, mask_decoder  # peft wrappers forward attributes to the active copy
    t = embeddings.shape[0]
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).unsqueeze(0).expand(t, -1, -1)
    tokens = torch.cat([tokens, sparse.to(tokens.dtype)], dim=1)
    src = embeddings + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
    pos_src = pe.get_dense_pe().expand_as(src)
    _, c, h, w = src.shape
    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(t, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
    _, c2, h2, w2 = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(t, c2, h2 * w2)).reshape(t, -1, h2, w2)
    iou = dec.iou_prediction_head(iou_token_out)
    return masks[:, 1:], iou[:, 1:]


def click_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of real clicks (label != -1) of each prompt set: (..., P) -> (...)."""
    return (labels != PAD_LABEL).sum(-1)


def compact(points: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Move each set's real clicks to the front, in their order, padding behind: (T, P, 2), (T, P)."""
    order = torch.sort((labels == PAD_LABEL).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(points, 1, order.unsqueeze(-1).expand_as(points)), torch.gather(labels, 1, order)


def decode_prompt_sets(prompt_encoder: nn.Module, mask_decoder: nn.Module, embeddings: torch.Tensor,
                       points: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode N prompt sets per image, each with exactly its real clicks plus SAM's padding point.

    Args:
        embeddings: (B, D, h, w) image embeddings.
        points: (B, N, P, 2) (x, y) clicks in the encoder's input frame (``image_size`` square).
        labels: (B, N, P) 1 foreground, 0 background, -1 no click (storage padding, anywhere in the set).

    Returns:
        low-resolution mask logits (B, N, 3, 4h, 4w) and predicted IoUs (B, N, 3).
    """
    b, n, p = labels.shape
    points, labels = compact(points.reshape(b * n, p, 2), labels.reshape(b * n, p))
    image = torch.arange(b, device=embeddings.device).repeat_interleave(n)
    counts = click_counts(labels)
    masks, ious, order = [], [], []
    for k in torch.unique(counts).tolist():
        sets = torch.nonzero(counts == k).flatten()
        if k:
            sparse = embed_points(prompt_encoder, points[sets, :k], labels[sets, :k])
        else:  # no click at all: SamPredictor passes no points, so no padding token either
            sparse = embeddings.new_zeros((len(sets), 0, embeddings.shape[1]))
        m, i = predict_masks(prompt_encoder, mask_decoder, embeddings[image[sets]], sparse)
        masks.append(m)
        ious.append(i)
        order.append(sets)
    inverse = torch.argsort(torch.cat(order))
    masks, ious = torch.cat(masks)[inverse], torch.cat(ious)[inverse]
    return masks.reshape(b, n, *masks.shape[1:]), ious.reshape(b, n, -1)


def best_slot(masks: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """The mask of the slot with the highest predicted IoU (what users get): (..., 3, H, W), (..., 3) -> (..., H, W)."""
    index = iou.argmax(-1)[..., None, None, None].expand(*masks.shape[:-3], 1, *masks.shape[-2:])
    return masks.gather(-3, index).squeeze(-3)


def loss_grid(loss_size: int | None, size: tuple[int, int]) -> tuple[int, int]:
    """The grid a loss is computed on: ``size`` (the targets') when ``loss_size`` is None, else loss_size x loss_size.
    A bad ``loss_size`` (not a positive integer) is refused, naming the key."""
    if loss_size is None:
        return tuple(size)
    if isinstance(loss_size, bool) or not isinstance(loss_size, int) or loss_size < 1:
        raise ValueError(f"loss_size must be a positive number of pixels or None (the targets' size), got {loss_size!r}")
    return (loss_size, loss_size)


def to_grid(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks or targets (..., H, W) area-averaged onto the loss grid ``size`` (soft values in [0, 1]; the mean of
    the pixels each grid cell covers); returned unchanged when they already have that size."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="area").view(*masks.shape[:-2], *size)


def upsample(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of decoder logits (..., h, w) to ``size``, as ``SamPredictor.postprocess_masks``."""
    flat = low.reshape(-1, 1, *low.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).view(*low.shape[:-2], *size)
