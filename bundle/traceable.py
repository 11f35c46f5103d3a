"""The TorchScript form of a merged :class:`~bundle.networks.PromptableSAM` (``models/model.ts``).

``torch.jit.script`` cannot compile ``segment_anything`` (its image encoder has branch-local variables), and a trace
of ``PromptableSAM.forward`` would freeze what must stay free: the batch size and each image's number of clicks
(the decoder sees exactly an image's clicks plus SAM's padding point, :mod:`bundle.networks.decoding`, so the token
count changes with every request). The export therefore traces the shape-stable parts and scripts the control flow:

* ``encoder``: a trace of :meth:`PromptableSAM.encode` (images -> embeddings; any batch, ``image_size`` square);
* ``decoder``: a trace of :func:`~bundle.networks.decoding.embed_points` + :func:`~bundle.networks.decoding.predict_masks`
  for one prompt set of k >= 1 clicks (k free: the ops are written without masked writes);
* ``no_click_decoder``: the same decoder with no token at all (SAM's answer to an image with no click);
* :class:`ScriptedPromptableSAM`, scripted: checks the input shape, reads the clicks from the guidance channels,
  and decodes each image of the batch with its own clicks, as the eager ``forward`` does.

The spatial input size is fixed at ``image_size`` x ``image_size`` (the bundle's preprocessing resizes to it), and
checked with a clear error. :func:`bundle.export.verify_torchscript` compares the result with the eager network.
"""

from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from bundle.guidance import guidance_to_points
from bundle.networks.decoding import embed_points, predict_masks
from bundle.networks.promptable_sam import PromptableSAM


class _Encoder(nn.Module):
    def __init__(self, net: PromptableSAM) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.encode(images)


class _Decoder(nn.Module):
    """One prompt set of one image: (1, D, h, w), (1, k, 2) points in the encoder's frame, (1, k) labels."""

    def __init__(self, net: PromptableSAM) -> None:
        super().__init__()
        self.net = net

    def forward(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor):
        sam = self.net._sam
        sparse = embed_points(sam.prompt_encoder, points, labels)
        return predict_masks(sam.prompt_encoder, sam.mask_decoder, embedding, sparse)


class _NoClickDecoder(nn.Module):
    def __init__(self, net: PromptableSAM) -> None:
        super().__init__()
        self.net = net

    def forward(self, embedding: torch.Tensor):
        sam = self.net._sam
        sparse = embedding.new_zeros((embedding.shape[0], 0, embedding.shape[1]))
        return predict_masks(sam.prompt_encoder, sam.mask_decoder, embedding, sparse)


class ScriptedPromptableSAM(nn.Module):
    """Scripted ``net(x)``: (B, C + 2, S, S) image + click channels -> (B, 1, S, S) best predicted-IoU logits."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, no_click_decoder: nn.Module, in_channels: int,
                 image_size: int, max_points: int) -> None:
        super().__init__()
        self.encoder, self.decoder, self.no_click_decoder = encoder, decoder, no_click_decoder
        self.in_channels, self.image_size, self.max_points = in_channels, image_size, max_points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if x.dim() != 4 or x.shape[1] != self.in_channels + 2 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                "expected input (B, " + str(self.in_channels + 2) + ", " + str(s) + ", " + str(s)
                + "): image channels in [0, 1] + foreground and background click channels, resized to the "
                "network's image_size; got " + str(x.shape)
            )
        points, labels = guidance_to_points(x[:, self.in_channels :], self.max_points)
        embeddings = self.encoder(x[:, : self.in_channels])
        out: List[torch.Tensor] = []
        for i in range(x.shape[0]):
            keep = labels[i] >= 0  # a click, not PAD_LABEL (-1)
            embedding = embeddings[i : i + 1]
            if bool(keep.any()):
                low, iou = self.decoder(embedding, points[i][keep].unsqueeze(0), labels[i][keep].unsqueeze(0))
            else:
                low, iou = self.no_click_decoder(embedding)
            out.append(low[:, int(iou[0].argmax())].unsqueeze(1))
        return F.interpolate(torch.cat(out, 0), size=[s, s], mode="bilinear", align_corners=False)


def script_network(net: PromptableSAM) -> torch.jit.ScriptModule:
    """TorchScript of a merged (``lora_rank=0``) network: traced encoder and decoders inside a scripted forward."""
    if net.lora_rank:
        raise ValueError("merge the LoRA adapters first (bundle.export.merge_lora)")
    net = net.cpu().eval()
    s = net.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand((2, net.in_channels, s, s), generator=g)
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag the constants a trace fixes: the spatial size, checked by ScriptedPromptableSAM
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        encoder = torch.jit.trace(_Encoder(net), images, check_trace=False)
        embedding = net.encode(images[:1])
        points = torch.randint(0, s, (1, 3, 2), generator=g).float()
        labels = torch.tensor([[1, 0, 1]])
        decoder = torch.jit.trace(_Decoder(net), (embedding, points, labels), check_trace=False)
        no_click = torch.jit.trace(_NoClickDecoder(net), (embedding,), check_trace=False)
    return torch.jit.script(ScriptedPromptableSAM(encoder, decoder, no_click, net.in_channels, s, net.max_points))
