"""SAM's own objective, interactive single-object segmentation, for pretraining a small SAM-architecture base
(METHOD.md, "The intent-gap testbed").

A batch holds B tiles with K prompts each; prompt k of tile b is 1..3 clicks inside one object and its target
G_bk is that object only (:class:`bundle.transforms.prompts.SingleObjectPromptsd`). The image is encoded once;
then R + 1 rounds decode every prompt through :meth:`PromptableSAM.decode` (its clicks plus SAM's padding point):

* round 0: the sampled clicks;
* round r = 1..R (``correction_rounds``, 0 allowed): one corrective click is added to each prompt, drawn uniformly
  from the error region E = (y > 0) xor G of the previous round's chosen mask y (the slot with the highest predicted
  IoU), labelled positive on a missed pixel (y = 0, G = 1) and negative on a false one (y = 1, G = 0); a prompt
  whose mask is already exact gets no click. SAM also feeds the previous mask logits back as a dense prompt; this
  bundle decodes clicks only, as every surface does.

Per round, for the M = 3 candidate logits z_bkj with predicted IoUs s_bkj, on a ``loss_size`` grid (SAM: G's size;
cheaper: the decoder's native image_size / 4, G area-downsampled to it, so G is soft there):

    FL(z, G)   = mean_pixels( -a_t (1 - p_t)^gamma log p_t ),  p = sigmoid(z), p_t = p if G else 1 - p,
                 a_t = alpha if G else 1 - alpha                  (focal loss; alpha 0.25, gamma 2)
    DL(z, G)   = 1 - (2 sum(p G) + 1) / (sum p + sum G + 1)       (soft Dice loss)
    L_mask     = focal_weight * FL + dice_weight * DL             (SAM: 20 : 1)
    L_round    = mean_bk min_j L_mask(z_bkj, G_bk)               (SAM: only the best of the 3 masks is trained)
               + lambda_iou * mean_bkj (s_bkj - IoU(z_bkj > 0, G_bk >= 0.5))^2,  the true IoU detached
    L          = mean over the R + 1 rounds of L_round

The logged ``focal`` and ``dice_loss`` are FL and DL of the chosen slots, averaged like L; ``iou_head`` the MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bundle.engines import PromptTrainer
from bundle.guidance import PAD_LABEL
from bundle.metrics import overlap
from bundle.networks.decoding import best_slot, loss_grid, to_grid, upsample
from bundle.loss_weights import loss_weight


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """FL of the module docstring, pixel mean per mask: (..., H, W) -> (...)."""
    t = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return (a_t * (1 - p_t) ** gamma * ce).flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DL of the module docstring per mask: (..., H, W) -> (...)."""
    p = torch.sigmoid(logits).flatten(-2)
    t = targets.to(logits.dtype).flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


class SingleObjectLoss(nn.Module):
    """One round of SAM's objective (``L_round`` of the module docstring).

    Args:
        focal_weight, dice_weight: weights of FL and DL in the mask loss (SAM: 20 and 1).
        lambda_iou: weight of the IoU-head MSE.
        focal_alpha, focal_gamma: the focal loss's class weight and focusing exponent.
    """

    def __init__(self, focal_weight: float = 20.0, dice_weight: float = 1.0, lambda_iou: float = 1.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.focal_weight = loss_weight("focal_weight", focal_weight)
        self.dice_weight = loss_weight("dice_weight", dice_weight)
        self.lambda_iou = loss_weight("lambda_iou", lambda_iou)
        self.focal_alpha = loss_weight("focal_alpha", focal_alpha)
        self.focal_gamma = loss_weight("focal_gamma", focal_gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, iou_pred: torch.Tensor) -> dict[str, torch.Tensor]:
        """logits (B, K, M, H, W), targets (B, K, H, W), iou_pred (B, K, M) -> ``loss``, ``focal``, ``dice_loss``,
        ``iou_head``."""
        g = targets.unsqueeze(2).expand_as(logits)
        focal = focal_loss(logits, g, self.focal_alpha, self.focal_gamma)
        dice = dice_loss(logits, g)
        mask_loss = self.focal_weight * focal + self.dice_weight * dice  # (B, K, M)
        best = mask_loss.argmin(-1, keepdim=True)
        true_iou = overlap(logits.detach(), g >= 0.5)[1]  # soft (area-downsampled) targets: pixels half covered
        iou_head = F.mse_loss(iou_pred, true_iou)
        loss = mask_loss.gather(-1, best).mean() + self.lambda_iou * iou_head
        return {"loss": loss, "focal": focal.gather(-1, best).mean(), "dice_loss": dice.gather(-1, best).mean(),
                "iou_head": iou_head}


def corrective_clicks(pred: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None):
    """One click per mask from its error region, uniformly: (..., H, W) logits and targets -> points (..., 2) (x, y)
    and labels (...): 1 on a missed target pixel, 0 on a false positive, -1 (no click) when the mask is exact."""
    g = targets > 0
    error = (pred > 0) ^ g
    flat = error.flatten(-2)
    score = torch.rand(flat.shape, generator=generator, device=flat.device) * flat
    index = score.argmax(-1)
    w = pred.shape[-1]
    points = torch.stack([index % w, index // w], -1).to(pred.dtype)
    hit = g.flatten(-2).gather(-1, index[..., None])[..., 0]
    labels = torch.where(flat.any(-1), hit.long(), torch.full_like(index, PAD_LABEL))
    return points, labels


def interactive_rounds(net, images: torch.Tensor, targets: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                       correction_rounds: int = 0, generator: torch.Generator | None = None):
    """Decode the prompts, then ``correction_rounds`` times add a corrective click and decode again.

    Args:
        net: :class:`bundle.networks.PromptableSAM`.
        images: (B, C, H, W); targets (B, K, H, W); points (B, K, P, 2) and labels (B, K, P) in the targets' frame.

    Returns:
        one (low-resolution logits (B, K, 3, h, w), predicted IoU (B, K, 3)) per round; the corrective clicks are
        drawn from the chosen mask upsampled to the targets' size.
    """
    size = tuple(targets.shape[-2:])
    embeddings = net.encode(images)
    rounds = []
    for r in range(correction_rounds + 1):
        if r:
            prev_low, prev_iou = (t.detach() for t in rounds[-1])
            chosen = upsample(best_slot(prev_low, prev_iou), size)
            click, click_label = corrective_clicks(chosen, targets, generator)
            points = torch.cat([points, click.unsqueeze(2)], 2)
            labels = torch.cat([labels, click_label.unsqueeze(2)], 2)
        rounds.append(net.decode(embeddings, points, labels, input_size=size))
    return rounds


class SingleObjectTrainer(PromptTrainer):
    """Trainer of SAM's interactive single-object objective (module docstring): a :class:`PromptTrainer` whose
    loss is the mean of :class:`SingleObjectLoss` over the rounds of :func:`interactive_rounds`.

    Args:
        correction_rounds: corrective-click rounds after the first decoding (0: the sampled clicks only).
        loss_size: side of the square grid the loss is computed on: the logits are upsampled to it and the targets
            area-downsampled to it (soft targets; the true IoU thresholds them at 0.5). ``None``: the targets' size,
            as SAM. The decoder's native output (``image_size / 4``) costs about 30x less than 256 px on CPU.
        the rest: as :class:`bundle.engines.PromptTrainer`; ``label`` is the (B, K, H, W) single-object targets and
            ``loss_function`` a :class:`SingleObjectLoss`. The training metrics score round 0 (the sampled clicks)
            at the targets' size.
    """

    def __init__(self, *args, correction_rounds: int = 0, loss_size: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if int(correction_rounds) < 0:
            raise ValueError(f"correction_rounds must be >= 0, got {correction_rounds}")
        loss_grid(loss_size, (1, 1))  # a bad value stops here
        self.correction_rounds = int(correction_rounds)
        self.loss_size = loss_size

    def compute_loss(self, images, targets, points, labels):
        rounds = self.network_pass(interactive_rounds, images, targets, points, labels, self.correction_rounds)
        size = loss_grid(self.loss_size, targets.shape[-2:])
        goal = to_grid(targets, size)
        terms = [self.loss_function(upsample(low, size), goal, iou) for low, iou in rounds]
        out = {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}
        first_low, first_iou = rounds[0]
        return upsample(best_slot(first_low, first_iou), tuple(targets.shape[-2:])), targets, out
