"""SAMPO's online preference mining and hybrid loss (METHOD.md, "Online prompt-centric preference mining",
"Losses" and "Decisions").

For a batch of B images with N prompt sets each and M output slots:

* candidate masks y[b, k, j] = (z[b, k, j] > 0), detached; quality m[b, k, j] = IoU(y[b, k, j], G_b);
* PO1 (inter-prompt): per image and slot j, winner argmax_k m[b, k, j] vs loser argmin_k m[b, k, j];
* PO2 (intra-prompt): per image and prompt set k, winner argmax_j m[b, k, j] vs loser argmin_j m[b, k, j];
* r(y | S) = log pi_theta(y | S) - log pi_ref(y | S), log pi = pixel-averaged Bernoulli log-likelihood;
* L_pair = -logsigmoid(beta * (r_w - r_l)); L_PO1, L_PO2, the reward margin and the preference accuracy are means
  over the valid pairs of the whole batch: a pair whose IoUs tie carries no preference and is left out, so an
  image whose candidates all tie adds nothing (it does not count as zero);
* L_SUP = BCE(z_w, G) + BCE(z_l, G), pixel means, averaged over every mined pair, ties included;
* L_IOU = MSE(predicted IoU, m) over all B x N x M candidates, m detached (SAM's IoU-head objective);
* L_total = lambda_dw * (L_PO1 + lambda * L_PO2) + L_SUP + lambda_iou * L_IOU, each term behind its switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bundle.metrics import overlap


def bernoulli_log_likelihood(logits: torch.Tensor, masks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """log pi(y | S): sum or mean over pixels of y*logsigmoid(z) + (1-y)*logsigmoid(-z), per mask (..., H, W).

    Computed as -BCE-with-logits(z, y), the same quantity in one fused, numerically stable op (two log-sigmoids and
    their products took a third of the small model's SAMPO step; docs/benchmarks.md)."""
    logits, y = torch.broadcast_tensors(logits, masks.to(logits.dtype))  # (one mask against M candidates, ...)
    ll = -F.binary_cross_entropy_with_logits(logits, y, reduction="none").flatten(-2)
    if reduction == "mean":
        return ll.mean(-1)
    if reduction == "sum":
        return ll.sum(-1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


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


def _flag(name: str, value) -> bool:
    """A switch from a config or the command line: a bool, or the strings true / false (any case)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _weight(name: str, value, positive: bool = False) -> float:
    """A loss weight from a config: a finite number >= 0 (> 0 where ``positive``)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not torch.isfinite(torch.tensor(value)) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        hint = " (beta <= 0 makes the preference term constant or reversed)" if name == "beta" else ""
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}{hint}")
    return value


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
        loglik_reduction: ``mean`` (default) or ``sum`` of the pixel log-likelihood.
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
    ) -> None:
        super().__init__()
        self.use_po1, self.use_po2 = _flag("use_po1", use_po1), _flag("use_po2", use_po2)
        self.use_sup, self.use_iou_head = _flag("use_sup", use_sup), _flag("use_iou_head", use_iou_head)
        if not (self.use_po1 or self.use_po2 or self.use_sup):
            raise ValueError("at least one of use_po1, use_po2, use_sup must be on")
        if loglik_reduction not in ("mean", "sum"):
            raise ValueError(f"loglik_reduction must be 'mean' or 'sum', got {loglik_reduction!r}")
        self.beta = _weight("beta", beta, positive=True)
        self.lam, self.lambda_dw = _weight("lambda", lam), _weight("lambda_dw", lambda_dw)
        self.lambda_iou = _weight("lambda_iou", lambda_iou)
        self.loglik_reduction = loglik_reduction

    def forward(self, logits: torch.Tensor, ref_logits: torch.Tensor, target: torch.Tensor,
                iou_pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            logits: actor logits (B, N, M, H, W) at the resolution of ``target``; (N, M, H, W) for one image.
            ref_logits: reference logits, same shape, no gradient.
            target: G, (B, H, W) binary ((H, W) for one image).
            iou_pred: the actor's predicted IoUs (B, N, M); needed when the IoU-head term is on.

        Returns:
            ``loss`` and its unweighted terms ``po1``, ``po2``, ``sup``, ``iou_head``; ``reward_margin`` (mean of
            beta * (r_w - r_l) over the batch's valid pairs), ``preference_accuracy`` (share of those with
            r_w > r_l), ``pairs`` (their number) and ``iou`` (B, N, M), the candidates' true IoUs.
        """
        if logits.ndim == 4:
            logits, ref_logits, target = logits[None], ref_logits[None], target[None]
            iou_pred = None if iou_pred is None else iou_pred[None]
        b, n, m = logits.shape[:3]
        masks = logits.detach() > 0
        iou = overlap(masks, target[:, None, None])[1]
        inter, intra = mine_pairs(iou)
        z = logits.flatten(0, 2)
        masks = masks.flatten(0, 2)
        reward = bernoulli_log_likelihood(z, masks, self.loglik_reduction) - bernoulli_log_likelihood(
            ref_logits.detach().flatten(0, 2), masks, self.loglik_reduction
        )
        zero = logits.sum() * 0.0
        out = {"po1": zero, "po2": zero, "sup": zero, "iou_head": zero}
        margin = self._pair_terms(reward, inter, intra, out)
        if self.use_sup:
            out["sup"] = supervised_term(z, target, inter, intra, (b, n, m))
        if self.use_iou_head:
            if iou_pred is None:
                raise ValueError("the IoU-head term needs iou_pred (or set use_iou_head: false)")
            out["iou_head"] = F.mse_loss(iou_pred.reshape(b, n, m), iou.to(iou_pred.dtype))
        preference = (out["po1"] if self.use_po1 else zero) + self.lam * (out["po2"] if self.use_po2 else zero)
        out["loss"] = (self.lambda_dw * preference + (out["sup"] if self.use_sup else zero)
                       + (self.lambda_iou * out["iou_head"] if self.use_iou_head else zero))
        out["reward_margin"] = margin.mean() if margin.numel() else margin.new_zeros(())
        out["preference_accuracy"] = (margin > 0).float().mean() if margin.numel() else margin.new_zeros(())
        out["pairs"] = torch.tensor(float(margin.numel()))
        out["iou"] = iou
        return out

    def _pair_terms(self, reward: torch.Tensor, inter: Pairs, intra: Pairs, out: dict) -> torch.Tensor:
        """L_PO1 and L_PO2 into ``out`` (left at zero without a valid pair); the beta-scaled reward margins of all
        valid pairs, detached (the diagnostics)."""
        margins = []
        for name, pairs in (("po1", inter), ("po2", intra)):
            margin = self.beta * (reward[pairs.winner[pairs.valid]] - reward[pairs.loser[pairs.valid]])
            margins.append(margin)
            if margin.numel():
                out[name] = -F.logsigmoid(margin).mean()
        return torch.cat(margins).detach()
