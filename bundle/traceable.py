"""A trace-friendly forward of :class:`~bundle.networks.PromptableSAM` for the TorchScript export (``model.ts``).

``torch.jit.script`` cannot compile ``segment_anything`` (its image encoder has branch-local variables), so the
export traces. Tracing ``PromptableSAM.forward`` as it is would freeze two things:

* the number of clicks: SAM's prompt encoder writes point embeddings through boolean-mask indexing
  (``embedding[labels == -1] = ...``), which a trace records for the click count it saw;
* the batch size: ``forward`` loops over the images of the batch in Python.

:class:`TraceablePromptableSAM` computes the same function with shape-independent tensor ops: ``torch.where``
instead of masked writes, and one batched mask-decoder pass in which each image has exactly one prompt set (so
SAM's ``repeat_interleave`` of the image embedding is not needed). It is a subclass with the same parameters and
state-dict layout, so a merged ``models/model.pt`` loads into it strictly. What a trace of it still fixes is the
spatial input size: the click channels are read with the traced width/height, so the TorchScript model takes
``(B, C + 2, image_size, image_size)`` only (the bundle's preprocessing resizes to that); see
:func:`bundle.export.export_torchscript`, which wraps the trace in a scripted shape check.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from bundle.guidance import guidance_to_points
from bundle.networks.promptable_sam import PromptableSAM


class TraceablePromptableSAM(PromptableSAM):
    """:class:`PromptableSAM` (``lora_rank=0``) whose ``forward`` traces without fixing batch size or click count."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.lora_rank:
            raise ValueError("TraceablePromptableSAM needs merged weights (lora_rank=0); merge the adapters first")

    @classmethod
    def from_network(cls, net: PromptableSAM) -> TraceablePromptableSAM:
        """A traceable copy of a merged (``lora_rank=0``) network, same weights."""
        if net.lora_rank:
            raise ValueError("merge the LoRA adapters first (bundle.export.merge_lora)")
        net_logger = logging.getLogger("bundle.networks.promptable_sam")
        level = net_logger.level
        net_logger.setLevel(logging.ERROR)  # no "random initialisation" warning: the weights are copied next
        try:
            out = cls(net.model_size, net.image_size, net.in_channels, lora_rank=0, max_points=net.max_points)
        finally:
            net_logger.setLevel(level)
        out.load_state_dict(net.state_dict(), strict=True)
        return out.to(next(net.parameters()).device).eval()

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """SAM's ``PromptEncoder._embed_points`` (with its padding point) written with ``torch.where``."""
        pe = self._sam.prompt_encoder
        b = points.shape[0]
        points = torch.cat([points + 0.5, torch.zeros_like(points[:, :1])], dim=1)
        labels = torch.cat([labels, torch.full_like(labels[:, :1], -1)], dim=1).unsqueeze(-1)
        emb = pe.pe_layer.forward_with_coords(points, pe.input_image_size)
        emb = torch.where(labels == -1, pe.not_a_point_embed.weight.expand_as(emb), emb)
        emb = torch.where(labels == 0, emb + pe.point_embeddings[0].weight, emb)
        emb = torch.where(labels == 1, emb + pe.point_embeddings[1].weight, emb)
        return emb.reshape(b, -1, pe.embed_dim)

    def _decode_batched(self, embeddings: torch.Tensor, sparse: torch.Tensor):
        """SAM's ``MaskDecoder.predict_masks`` for B images with one prompt set each (no repeat of the image)."""
        sam = self._sam
        dec = sam.mask_decoder
        pe = sam.prompt_encoder
        b = embeddings.shape[0]
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([tokens, sparse], dim=1)
        src = embeddings + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos_src = pe.get_dense_pe().expand_as(src)
        _, c, h, w = src.shape
        hs, src = dec.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = dec.output_upscaling(src)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
        _, c2, h2, w2 = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)
        iou = dec.iou_prediction_head(iou_token_out)
        # multimask_output=True: slots 1..3, as PromptableSAM.decode
        return masks[:, 1:], iou[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C + 2, H, W) image + click channels -> (B, 1, H, W) logits of the best predicted-IoU mask."""
        h, w = x.shape[-2:]
        points, labels = guidance_to_points(x[:, self.in_channels :], self.max_points)
        scale = torch.tensor([self.image_size / w, self.image_size / h], dtype=points.dtype, device=points.device)
        points = points * scale
        embeddings = self.encode(x[:, : self.in_channels])
        logits, iou = self._decode_batched(embeddings, self._embed_points(points, labels))
        best = iou.argmax(dim=1, keepdim=True)  # (B, 1)
        index = best.view(-1, 1, 1, 1).expand(-1, 1, logits.shape[-2], logits.shape[-1])
        low = torch.gather(logits, 1, index)
        return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
