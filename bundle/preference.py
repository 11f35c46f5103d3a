"""SAMPO's online preference mining and hybrid loss (METHOD.md, "Online prompt-centric preference mining",
"Losses" and "Decisions").

For a batch of B images with N prompt sets each and M output slots:

* candidate masks y[b, k, j] = (z[b, k, j] > 0), detached; quality m[b, k, j] = IoU(y[b, k, j], G_b);
* PO1 (inter-prompt): per image and slot j, winner argmax_k m[b, k, j] vs loser argmin_k m[b, k, j];
* PO2 (intra-prompt): per image and prompt set k, winner argmax_j m[b, k, j] vs loser argmin_j m[b, k, j];
* r(y | S) = log pi_theta(y | S) - log pi_ref(y | S) over the pair's reward region (bundle/dpo.py:
  ``reward_region: image``, the pixel-averaged Bernoulli log-likelihood of the papers, or ``disagreement``, the
  mean of the per-pixel log-ratio over D = dilate_k(y_w xor y_l));
* L_pair = -logsigmoid(beta * (r_w - r_l)) (:func:`bundle.dpo.dpo_loss`); L_PO1, L_PO2 and the logged
  ``chosen_rewards``, ``rejected_rewards``, ``margins``, ``accuracies``, ``disagreement_fraction`` are means over the
  valid pairs of the whole batch: a pair whose IoUs tie (or whose region is empty) carries no preference and is left
  out, so an image whose candidates all tie adds nothing (it does not count as zero);
* L_SUP = BCE(z_w, G) + BCE(z_l, G), pixel means, averaged over every mined pair, ties included;
* L_IOU = MSE(predicted IoU, m) over all B x N x M candidates, m detached (SAM's IoU-head objective);
* L_total = lambda_dw * (L_PO1 + lambda * L_PO2) + L_SUP + lambda_iou * L_IOU, each term behind its switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bundle.dpo import RewardRegion, dpo_loss, merge_terms
from bundle.loss_weights import loss_weight, switch
from bundle.metrics import overlap


@dataclass
class Pairs:
    """Winner / loser indices into the flattened (B * N * M) candidates, and which pairs carry a preference."""

    winner: torch.Tensor
    loser: torch.Tensor
    valid: torch.Tensor


def mine_pairs(iou: torch.Tensor) -> tuple[Pairs, Pairs]:
    """Inter-prompt (one pair per image and slot) and intra-prompt (one pair per image and prompt set) pairs.

    Args:
        iou: (B, N, M) or (N, M) IoUs of the candidates with their image's target.
    """
    if iou.ndim == 2:
        iou = iou[None]
    b, n, m = iou.shape
    base = (torch.arange(b, device=iou.device) * n * m).view(b, 1)
    slots = torch.arange(m, device=iou.device).view(1, m)
    sets = torch.arange(n, device=iou.device).view(1, n)
    inter = Pairs(
        winner=(base + iou.argmax(1) * m + slots).flatten(),
        loser=(base + iou.argmin(1) * m + slots).flatten(),
        valid=(iou.amax(1) > iou.amin(1)).flatten(),
    )
    intra = Pairs(
        winner=(base + sets * m + iou.argmax(2)).flatten(),
        loser=(base + sets * m + iou.argmin(2)).flatten(),
        valid=(iou.amax(2) > iou.amin(2)).flatten(),
    )
    return inter, intra


def supervised_term(z: torch.Tensor, target: torch.Tensor, inter: Pairs, intra: Pairs,
                    shape: tuple[int, int, int]) -> torch.Tensor:
    """L_SUP: BCE of the winners' and of the losers' logits ``z`` (B * N * M, H, W) with G, pixel means over every
    mined pair, ties included; ``shape`` is (B, N, M)."""
    b, n, m = shape
    winners = torch.cat([inter.winner, intra.winner])
    losers = torch.cat([inter.loser, intra.loser])
    g = target.to(z.dtype)[:, None, None].expand(b, n, m, *target.shape[-2:]).flatten(0, 2)
    return F.binary_cross_entropy_with_logits(z[winners], g[winners]) + F.binary_cross_entropy_with_logits(
        z[losers], g[losers])


class SAMPOLoss(nn.Module):
    """The hybrid SAMPO objective over a batch (see the module docstring for the formulas).

    Args:
        beta: DPO temperature on the reward difference (> 0).
        lam: weight ``lambda`` of the intra-prompt term (config key ``lambda``, a Python keyword).
        lambda_dw: weight of the preference terms against SUP.
        lambda_iou: weight of the IoU-head MSE.
        use_po1, use_po2, use_sup, use_iou_head: switches of the terms (PO1 / PO2 / SUP: the papers' K1 / K2 / K3).
        loglik_reduction: ``mean`` (default) or ``sum`` of the pixel log-likelihood (``reward_region: image``).
        reward_region: ``image`` (default) or ``disagreement`` (:class:`bundle.dpo.RewardRegion`).
        region_dilation: pixels by which the disagreement region is dilated.
        log_gradient_ratio: a diagnostic, off by default: also return ``gradient_ratio``, the norm of the gradient
            of lambda_dw * (L_PO1 + lambda L_PO2) at the logits over that of L_SUP (two extra backward passes to
            the logits per step; 0 without SUP's gradient).
    """

    def __init__(
        self,
        beta: float = 1.0,
        lam: float = 1.0,
        lambda_dw: float = 1.0,
        lambda_iou: float = 1.0,
        use_po1: bool = True,
        use_po2: bool = True,
        use_sup: bool = True,
        use_iou_head: bool = True,
        loglik_reduction: str = "mean",
        reward_region: str = "image",
        region_dilation: int = 0,
        log_gradient_ratio: bool = False,
    ) -> None:
        super().__init__()
        self.use_po1, self.use_po2 = switch("use_po1", use_po1), switch("use_po2", use_po2)
        self.use_sup, self.use_iou_head = switch("use_sup", use_sup), switch("use_iou_head", use_iou_head)
        if not (self.use_po1 or self.use_po2 or self.use_sup):
            raise ValueError("at least one of use_po1, use_po2, use_sup must be on")
        self.region = RewardRegion(reward_region, region_dilation, loglik_reduction)
        self.beta = loss_weight("beta", beta, positive=True)
        self.lam, self.lambda_dw = loss_weight("lambda", lam), loss_weight("lambda_dw", lambda_dw)
        self.lambda_iou = loss_weight("lambda_iou", lambda_iou)
        self.log_gradient_ratio = switch("log_gradient_ratio", log_gradient_ratio)

    def forward(self, logits: torch.Tensor, ref_logits: torch.Tensor, target: torch.Tensor,
                iou_pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            logits: actor logits (B, N, M, H, W) at the resolution of ``target``; (N, M, H, W) for one image.
            ref_logits: reference logits, same shape, no gradient.
            target: G, (B, H, W) binary ((H, W) for one image), or soft in [0, 1] on a coarser loss grid (the
                trainer's ``loss_size``): L_SUP's BCE takes it as is, the IoUs of the mining threshold it at 0.5.
            iou_pred: the actor's predicted IoUs (B, N, M); needed when the IoU-head term is on.

        Returns:
            ``loss`` and its unweighted terms ``po1``, ``po2``, ``sup``, ``iou_head``; the logged means over the
            batch's valid PO1 and PO2 pairs (:data:`bundle.dpo.TERMS`: ``chosen_rewards``, ``rejected_rewards``,
            ``margins``, ``accuracies``, ``pairs``, ``disagreement_fraction``) and ``iou`` (B, N, M), the
            candidates' true IoUs.
        """
        if logits.ndim == 4:
            logits, ref_logits, target = logits[None], ref_logits[None], target[None]
            iou_pred = None if iou_pred is None else iou_pred[None]
        b, n, m = logits.shape[:3]
        target = target.as_subclass(torch.Tensor)  # a MONAI MetaTensor's batched metadata does not follow indexing
        masks = logits.detach() > 0
        iou = overlap(masks, (target > 0.5)[:, None, None])[1]  # G binary, or area-downsampled (soft) on a loss grid
        inter, intra = mine_pairs(iou)
        z = logits.flatten(0, 2)
        masks = masks.flatten(0, 2)
        zero = logits.sum() * 0.0
        out = {"po1": zero, "po2": zero, "sup": zero, "iou_head": zero}
        r_w, r_l, fraction, nonempty = self.region.rewards(  # both pair kinds at once: one pass over the candidates
            z, ref_logits.flatten(0, 2), masks, torch.cat([inter.winner, intra.winner]),
            torch.cat([inter.loser, intra.loser]))
        parts, start = [], 0
        for name, pairs in (("po1", inter), ("po2", intra)):
            q = slice(start, start + pairs.winner.numel())
            start = q.stop
            terms = dpo_loss(self.beta * (r_w[q] - r_l[q]), nonempty[q] & pairs.valid, self.beta * r_w[q],
                             self.beta * r_l[q], fraction[q], like=z)
            out[name] = terms["loss"]
            parts.append(terms)
        if self.use_sup:
            out["sup"] = supervised_term(z, target, inter, intra, (b, n, m))
        if self.use_iou_head:
            if iou_pred is None:
                raise ValueError("the IoU-head term needs iou_pred (or set use_iou_head: false)")
            out["iou_head"] = F.mse_loss(iou_pred.reshape(b, n, m), iou.to(iou_pred.dtype))
        preference = (out["po1"] if self.use_po1 else zero) + self.lam * (out["po2"] if self.use_po2 else zero)
        out["loss"] = (self.lambda_dw * preference + (out["sup"] if self.use_sup else zero)
                       + (self.lambda_iou * out["iou_head"] if self.use_iou_head else zero))
        out.update(merge_terms(parts))
        if self.log_gradient_ratio:
            out["gradient_ratio"] = self.gradient_ratio(self.lambda_dw * preference, out["sup"], logits)
        out["iou"] = iou
        return out

    @staticmethod
    def gradient_ratio(preference: torch.Tensor, sup: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """|d preference / d z| / |d L_SUP / d z| at the logits z (detached; 0 where either has no gradient)."""
        if not (logits.requires_grad and preference.requires_grad and sup.requires_grad):
            return torch.zeros(())
        norm = lambda loss: torch.autograd.grad(loss, logits, retain_graph=True)[0].norm()  # noqa: E731
        g_sup = norm(sup)
        return (norm(preference) / g_sup).detach() if g_sup > 0 else torch.zeros(())
