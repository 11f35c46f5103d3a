"""SAMPO's online preference mining and hybrid loss (METHOD.md, "Online prompt-centric preference mining" and
"Losses").

For one image with N prompt sets and M output slots:

* candidate masks y[k, j] = (z[k, j] > 0), detached; quality m[k, j] = IoU(y[k, j], G);
* PO1 (inter-prompt): per slot j, winner argmax_k m[k, j] vs loser argmin_k m[k, j];
* PO2 (intra-prompt): per prompt set k, winner argmax_j m[k, j] vs loser argmin_j m[k, j];
* pairs with equal IoUs carry no preference and are left out of the preference means;
* r(y | S) = log pi_theta(y | S) - log pi_ref(y | S), log pi = pixel-averaged Bernoulli log-likelihood;
* L_pair = -logsigmoid(beta * (r_w - r_l)); L_total = lambda_dw * (L_PO1 + lambda * L_PO2) + L_SUP, where L_SUP is
  BCE(z_w, G) + BCE(z_l, G) averaged over the mined pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def mask_iou(masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binary ``masks`` (..., H, W) with ``target`` (H, W); two empty masks have IoU 1."""
    masks, target = masks.bool(), target.bool().expand_as(masks)
    inter = (masks & target).flatten(-2).sum(-1).float()
    union = (masks | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def bernoulli_log_likelihood(logits: torch.Tensor, masks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """log pi(y | S): sum or mean over pixels of y*logsigmoid(z) + (1-y)*logsigmoid(-z), per mask (..., H, W)."""
    y = masks.to(logits.dtype)
    ll = (y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits)).flatten(-2)
    if reduction == "mean":
        return ll.mean(-1)
    if reduction == "sum":
        return ll.sum(-1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


@dataclass
class Pairs:
    """Winner / loser indices into the flattened (N * M) candidates, and which pairs carry a preference."""

    winner: torch.Tensor
    loser: torch.Tensor
    valid: torch.Tensor


def mine_pairs(iou: torch.Tensor) -> tuple[Pairs, Pairs]:
    """Inter-prompt (one pair per slot j) and intra-prompt (one pair per prompt set k) pairs from IoUs (N, M)."""
    n, m = iou.shape
    slots = torch.arange(m, device=iou.device)
    sets = torch.arange(n, device=iou.device)
    inter = Pairs(
        winner=iou.argmax(0) * m + slots,
        loser=iou.argmin(0) * m + slots,
        valid=iou.amax(0) > iou.amin(0),
    )
    intra = Pairs(
        winner=sets * m + iou.argmax(1),
        loser=sets * m + iou.argmin(1),
        valid=iou.amax(1) > iou.amin(1),
    )
    return inter, intra


def _flag(name: str, value) -> bool:
    """A switch from a config or the command line: a bool, or the strings true / false (any case)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


class SAMPOLoss(nn.Module):
    """The hybrid SAMPO objective for one image.

    Args:
        beta: DPO temperature on the reward difference.
        lam: weight ``lambda`` of the intra-prompt term.
        lambda_dw: weight of the preference terms against SUP.
        po1, po2, sup: switches of the three terms (the papers' K1 / K2 / K3 ablations).
        reduction: ``mean`` (default) or ``sum`` of the pixel log-likelihood.
    """

    def __init__(
        self,
        beta: float = 1.0,
        lam: float = 1.0,
        lambda_dw: float = 1.0,
        po1: bool = True,
        po2: bool = True,
        sup: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        po1, po2, sup = _flag("po1", po1), _flag("po2", po2), _flag("sup", sup)
        if not (po1 or po2 or sup):
            raise ValueError("at least one of po1, po2, sup must be on")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.beta, self.lam, self.lambda_dw = beta, lam, lambda_dw
        self.po1, self.po2, self.sup, self.reduction = po1, po2, sup, reduction

    def forward(self, logits: torch.Tensor, ref_logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            logits: actor logits (N, M, H, W) at the resolution of ``target``.
            ref_logits: reference logits (N, M, H, W), no gradient.
            target: G, (H, W) binary.

        Returns:
            ``loss`` and its terms ``po1``, ``po2``, ``sup`` (unweighted), ``reward_margin`` (mean of
            beta * (r_w - r_l) over valid pairs), ``preference_accuracy`` (share of valid pairs with r_w > r_l)
            and ``pairs`` (number of valid pairs).
        """
        n, m = logits.shape[:2]
        masks = (logits.detach() > 0).flatten(0, 1)
        iou = mask_iou(masks, target).view(n, m)
        inter, intra = mine_pairs(iou)
        z = logits.flatten(0, 1)
        reward = bernoulli_log_likelihood(z, masks, self.reduction) - bernoulli_log_likelihood(
            ref_logits.detach().flatten(0, 1), masks, self.reduction
        )
        zero = logits.sum() * 0.0
        out = {"po1": zero, "po2": zero, "sup": zero}
        margins = []
        for name, pairs in (("po1", inter), ("po2", intra)):
            margin = self.beta * (reward[pairs.winner] - reward[pairs.loser])
            margins.append(margin[pairs.valid])
            if pairs.valid.any():
                out[name] = -F.logsigmoid(margin[pairs.valid]).mean()
        if self.sup:
            idx_w = torch.cat([inter.winner, intra.winner])
            idx_l = torch.cat([inter.loser, intra.loser])
            g = target.to(z.dtype).expand(len(idx_w), *target.shape)
            out["sup"] = F.binary_cross_entropy_with_logits(z[idx_w], g) + F.binary_cross_entropy_with_logits(z[idx_l], g)
        preference = (out["po1"] if self.po1 else zero) + self.lam * (out["po2"] if self.po2 else zero)
        out["loss"] = self.lambda_dw * preference + (out["sup"] if self.sup else zero)
        margin = torch.cat(margins).detach()
        out["reward_margin"] = margin.mean() if margin.numel() else margin.new_zeros(())
        out["preference_accuracy"] = (margin > 0).float().mean() if margin.numel() else margin.new_zeros(())
        out["pairs"] = torch.tensor(float(margin.numel()))
        return out
