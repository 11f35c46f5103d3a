"""The one DPO core: every preference objective of the bundle (SAMPO's PO1 / PO2, the human pairs, paper 003's
ranked loss) computes its rewards, its loss and its logged quantities here.

For a policy's logits z, the reference's z_ref and a binary mask y over the pixels p of an H x W map (P pixels):

    l_p(y | z)   = y_p log sigmoid(z_p) + (1 - y_p) log sigmoid(-z_p)       (Bernoulli log-likelihood of pixel p)
    rho_p(y)     = l_p(y | z) - l_p(y | z_ref)                              (the per-pixel log-ratio map)

A pair (y_w chosen, y_l rejected) gets its rewards over a region R, the same for both masks:

    image:         r(y) = mean_p rho_p(y)   (``loglik_reduction: sum``: sum_p)       R = the whole image
    disagreement:  D = dilate_k(y_w xor y_l),  r(y) = sum_{p in D} rho_p(y) / |D|   (k = ``region_dilation``)

    margin = beta * (r(y_w) - r(y_l)),   L = mean over the valid pairs of -log sigmoid(margin)   (:func:`dpo_loss`)

``image`` is the papers' pixel-averaged log-likelihood: a pair whose masks differ on k of P pixels has a margin of
order k / P. ``disagreement`` normalises by |D| instead, so the margin is that of the pixels the pair is about,
whatever the image size (RN-DPO; docs/results.md, "How the reward is computed"). A pair is valid when its
qualities differ (a tie carries no preference) and its region is not empty; invalid pairs are left out of every
mean (an objective without a valid pair adds zero with a gradient, it does not count as a zero loss).

Logged, in TRL's vocabulary, means over the valid pairs: ``chosen_rewards`` (beta r(y_w)), ``rejected_rewards``
(beta r(y_l)), ``margins``, ``accuracies`` (share of margins > 0), ``pairs`` (their number) and
``disagreement_fraction`` (|y_w xor y_l| / P, undilated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


REGIONS = ("image", "disagreement")
REDUCTIONS = ("mean", "sum")
TERMS = ("chosen_rewards", "rejected_rewards", "margins", "accuracies", "pairs", "disagreement_fraction")


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


def log_ratio_map(logits: torch.Tensor, ref_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """rho_p(y) = l_p(y | z) - l_p(y | z_ref), (..., H, W); the reference detached."""
    logits, ref, y = torch.broadcast_tensors(logits, ref_logits.detach(), masks.to(logits.dtype))
    return (F.binary_cross_entropy_with_logits(ref, y, reduction="none")
            - F.binary_cross_entropy_with_logits(logits, y, reduction="none"))


def dilate(region: torch.Tensor, dilation: int) -> torch.Tensor:
    """A float (..., H, W) map of 0 / 1 dilated by ``dilation`` pixels (a (2k + 1)^2 square); unchanged for 0."""
    if dilation <= 0:
        return region
    flat = region.reshape(-1, 1, *region.shape[-2:])
    return F.max_pool2d(flat, 2 * dilation + 1, stride=1, padding=dilation).reshape(region.shape)


def disagreement(chosen: torch.Tensor, rejected: torch.Tensor, dilation: int = 0) -> torch.Tensor:
    """D = y_w xor y_l (..., H, W) as a float map, dilated by ``dilation`` pixels (:func:`dilate`)."""
    return dilate(((chosen > 0.5) ^ (rejected > 0.5)).float(), dilation)


class RewardRegion:
    """Where a pair's rewards are computed (module docstring), with the config's checks.

    Args:
        reward_region: ``image`` (the pixel mean or sum over the image) or ``disagreement`` (the mean over
            D = y_w xor y_l).
        region_dilation: pixels by which D is dilated (``disagreement``; >= 0).
        loglik_reduction: ``mean`` or ``sum`` of the pixel log-likelihood (``image``).
    """

    def __init__(self, reward_region: str = "image", region_dilation: int = 0, loglik_reduction: str = "mean") -> None:
        if reward_region not in REGIONS:
            raise ValueError(f"reward_region must be one of {REGIONS} (the pixel mean over the image, or the mean over "
                             f"the pixels where the pair's masks differ), got {reward_region!r}")
        if isinstance(region_dilation, bool) or not isinstance(region_dilation, int) or region_dilation < 0:
            raise ValueError(f"region_dilation must be an integer >= 0 (pixels), got {region_dilation!r}")
        if loglik_reduction not in REDUCTIONS:
            raise ValueError(f"loglik_reduction must be 'mean' or 'sum', got {loglik_reduction!r}")
        self.region, self.dilation, self.reduction = reward_region, region_dilation, loglik_reduction

    def __repr__(self) -> str:
        return (f"RewardRegion(reward_region={self.region!r}, region_dilation={self.dilation}, "
                f"loglik_reduction={self.reduction!r})")

    def rewards(self, logits: torch.Tensor, ref_logits: torch.Tensor, masks: torch.Tensor, chosen: torch.Tensor,
                rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewards of pairs of candidates.

        Args:
            logits, ref_logits: (C, H, W) the policy's and the reference's logits of C candidates.
            masks: (C, H, W) the candidates' binary masks (detached).
            chosen, rejected: (Q,) indices into the C candidates: pair q prefers ``chosen[q]`` to ``rejected[q]``.

        Returns:
            r(y_w) (Q,), r(y_l) (Q,), the region's share of the image |D| / P (Q,; undilated) and whether the
            region is not empty (Q,).
        """
        # plain tensors: indexing a MONAI MetaTensor would slice its batched metadata too
        logits, ref_logits, masks, chosen, rejected = (x.as_subclass(torch.Tensor) for x in (
            logits, ref_logits, masks.detach(), chosen, rejected))
        d = disagreement(masks[chosen], masks[rejected])
        fraction = d.flatten(-2).mean(-1)
        if self.region == "image":
            r = bernoulli_log_likelihood(logits, masks, self.reduction) - bernoulli_log_likelihood(
                ref_logits.detach(), masks, self.reduction)
            return r[chosen], r[rejected], fraction, fraction > 0
        weights = dilate(d, self.dilation)
        size = weights.flatten(-2).sum(-1)
        weights = weights / size.clamp_min(1.0)[..., None, None]
        rho = log_ratio_map(logits, ref_logits, masks)
        r_w = (rho[chosen] * weights).flatten(-2).sum(-1)
        r_l = (rho[rejected] * weights).flatten(-2).sum(-1)
        return r_w, r_l, fraction, size > 0


def dpo_loss(margins: torch.Tensor, valid: torch.Tensor, chosen_rewards: torch.Tensor | None = None,
             rejected_rewards: torch.Tensor | None = None, fraction: torch.Tensor | None = None,
             like: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """-log sigmoid of the beta-scaled ``margins`` (Q,), averaged over the ``valid`` pairs, and the logged means.

    Args:
        margins: beta (r(y_w) - r(y_l)) per pair (Q,), with their gradients.
        valid: (Q,) bool, the pairs that carry a preference.
        chosen_rewards, rejected_rewards: beta r(y_w), beta r(y_l) (Q,), for the logs (default: not logged, 0).
        fraction: the pairs' |D| / P (Q,), logged as ``disagreement_fraction``.
        like: a tensor of the graph, so that no valid pair gives a zero loss with a gradient (default ``margins``).

    Returns:
        ``loss`` and :data:`TERMS` (detached scalars).
    """
    valid = valid.bool()
    m = margins[valid]
    zero = (margins if like is None else like).sum() * 0.0
    empty = zero.detach()

    def mean(x):
        return x[valid].detach().float().mean() if x is not None and m.numel() else empty

    return {"loss": -F.logsigmoid(m).mean() if m.numel() else zero, "chosen_rewards": mean(chosen_rewards),
            "rejected_rewards": mean(rejected_rewards), "margins": mean(margins),
            "accuracies": (m.detach() > 0).float().mean() if m.numel() else empty,
            "pairs": torch.tensor(float(m.numel())), "disagreement_fraction": mean(fraction)}


def pair_terms(region: RewardRegion, beta: float, logits: torch.Tensor, ref_logits: torch.Tensor,
               masks: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
               tie: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`dpo_loss` of pairs of candidates (:meth:`RewardRegion.rewards`' arguments); ``tie`` (Q,) marks the
    pairs whose qualities are equal (left out, as are pairs with an empty region)."""
    r_w, r_l, fraction, nonempty = region.rewards(logits, ref_logits, masks, chosen, rejected)
    valid = nonempty if tie is None else nonempty & ~tie
    return dpo_loss(beta * (r_w - r_l), valid, beta * r_w, beta * r_l, fraction, like=logits)


def merge_terms(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The logged :data:`TERMS` of several :func:`dpo_loss` results as one set: means weighted by their pairs."""
    n = torch.stack([p["pairs"] for p in parts])
    total = n.sum()
    out = {"pairs": total}
    for key in TERMS:
        if key != "pairs":
            values = torch.stack([p[key].detach().float().cpu() for p in parts])
            out[key] = (values * n).sum() / total if total > 0 else values.new_zeros(())
    return out
