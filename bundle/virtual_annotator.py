"""The virtual annotator of paper 003 (METHOD.md, "The virtual-annotator variant"): candidates made by
thresholding the model's probability map, a simulated rater that orders them, and the ranked DPO loss (eq. 5).

For one (image, prompt set) item with actor logits z and reference logits z_ref (the frozen supervised model):

* candidates Y_t = (sigmoid(z) > t) for the thresholds t_1 < ... < t_T in (0, 1) (default 0.3, 0.5, 0.7, 0.9),
  from the detached actor logits;
* the rater scores them against G: ``ranking`` (default) s_t = IoU(Y_t, G); ``rating`` s_t = the bucket of the
  IoU in ``levels`` equal steps, 1 + floor(levels * IoU) clipped to ``levels`` (4 buckets: [0, .25) -> 1, ...,
  [.75, 1] -> 4); ``best`` s_t = IoU, of which only the top candidate is used (SAM-style: the loss backpropagates
  through the best candidate alone). The candidates are ordered best to worst, Y1..YT, by s (stable: among equal
  scores the lower threshold first). G enters nothing but these scores;
* r(Y) = log pi_theta(Y) - log pi_ref(Y) over the comparison's ``reward_region`` (bundle/dpo.py): ``image``, the
  pixel-averaged Bernoulli log-likelihood of SAMPO (the paper's); ``disagreement``, the mean of the log-ratio map
  over D = dilate(Ya xor Yb) of the two candidates compared, each comparison with its own D. All candidates come
  from one logit map, so the pixels where two agree cancel in r(Ya) - r(Yb) and ``image`` only dilutes the
  difference by |D| / P;
* ranking / rating (T = 4, paper eq. 5):
      margin = beta1 (r(Y1) - r(Y4)) + beta2 (r(Y2) - r(Y3)),   L = -logsigmoid(margin)    (bundle.dpo.dpo_loss)
  which is eq. 5's -logsigmoid(beta1 r(Y1) + beta2 r(Y2) - beta2 r(Y3) - beta1 r(Y4)) regrouped into its two
  comparisons; best: margin = beta1 r(Y1) (``image`` only: one candidate has no region of disagreement).

Ties, as METHOD.md handles them (a comparison between equal qualities carries no preference; an item whose
candidates all tie adds nothing and does not count as zero):

* s(Y2) = s(Y3): the beta2 comparison drops out of the margin (beta1 (r(Y1) - r(Y4)) is left);
* s(Y1) = s(Y4), i.e. all candidates tie (they are ordered): the item is left out of the batch mean; for ``best``
  likewise when every candidate has the top score;
* equal scores on the same side (Y1 = Y2, or Y3 = Y4) change nothing: both are rewarded (penalised) anyway.

The loss and the DPO core's terms (``margins``, ``accuracies``: share of margins > 0, ``chosen_rewards`` /
``rejected_rewards``: beta1 r(Y1) / beta1 r(Y4), 0 for ``best``, ``pairs``: the items, ``disagreement_fraction``:
|Y1 xor Y4| / P) are means over the items of the whole batch that carry a preference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from bundle.dpo import RewardRegion, dpo_loss
from bundle.loss_weights import loss_weight
from bundle.metrics import overlap

RATERS = ("ranking", "rating", "best")


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """The thresholds as floats, strictly increasing and inside (0, 1); ``ValueError`` saying what is wrong."""
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise ValueError(f"thresholds must be a list of probabilities, e.g. [0.3, 0.5, 0.7, 0.9], got {thresholds!r}")
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be numbers in (0, 1), got {list(thresholds)!r}") from None
    outside = [t for t in values if not 0.0 < t < 1.0]  # NaN fails both comparisons
    if outside:
        raise ValueError(f"thresholds must lie strictly inside (0, 1) (0 and 1 give the all-on / all-off mask), "
                         f"got {list(values)}; outside: {outside}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"thresholds must be strictly increasing (each gives one candidate, from the largest mask "
                         f"to the smallest), got {list(values)}")
    if len(values) < 2:
        raise ValueError(f"thresholds: at least 2 are needed to compare candidates, got {list(values)}")
    return values


def _check_rater(rater: str) -> str:
    if rater not in RATERS:
        raise ValueError(f"rater must be one of {RATERS} (paper 003: rank by IoU, rate in buckets, or the best "
                         f"candidate only), got {rater!r}")
    return rater


@dataclass
class Ranking:
    """The rater's answer for items (...): ``order`` (..., T) candidate indices best to worst, ``score`` (..., T)
    their scores in that order (non-increasing)."""

    order: torch.Tensor
    score: torch.Tensor


class VirtualAnnotator:
    """Candidates by thresholding and the simulated rater (module docstring).

    Args:
        thresholds: probability levels, strictly increasing in (0, 1); one candidate each.
        rater: ``ranking`` (by IoU), ``rating`` (IoU in ``levels`` buckets) or ``best`` (top candidate only).
        levels: number of rating buckets (``rating``).
    """

    def __init__(self, thresholds: Sequence[float] = (0.3, 0.5, 0.7, 0.9), rater: str = "ranking",
                 levels: int = 4) -> None:
        self.thresholds = check_thresholds(thresholds)
        self.rater = _check_rater(rater)
        if rater != "best" and len(self.thresholds) != 4:
            raise ValueError(f"the {rater} loss (paper eq. 5) orders exactly 4 candidates Y1..Y4 (beta1: Y1 vs Y4, "
                             f"beta2: Y2 vs Y3): give 4 thresholds, got {list(self.thresholds)}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels (rating buckets) must be an integer >= 2, got {levels!r}")
        self.levels = levels

    def candidates(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., H, W) logits -> (..., T, H, W) masks sigmoid(z) > t, detached (z > logit(t), the same test)."""
        cuts = torch.tensor([math.log(t / (1 - t)) for t in self.thresholds], dtype=logits.dtype,
                            device=logits.device)
        return logits.detach().unsqueeze(-3) > cuts.view(-1, 1, 1)

    def __call__(self, candidates: torch.Tensor, target: torch.Tensor) -> Ranking:
        """Rate (..., T, H, W) candidates against G, broadcastable to (..., H, W): the only use of G."""
        iou = overlap(candidates, target.unsqueeze(-3))[1]
        score = iou if self.rater != "rating" else (1 + torch.floor(iou * self.levels)).clamp(max=self.levels)
        score, order = torch.sort(score, dim=-1, descending=True, stable=True)
        return Ranking(order=order, score=score)


class RankedDPOLoss(nn.Module):
    """Paper 003's ranked DPO loss (eq. 5) with the tie rules of the module docstring.

    Args:
        beta1: weight of the outer comparison Y1 vs Y4 (> 0).
        beta2: weight of the inner comparison Y2 vs Y3 (>= 0, at most ``beta1``: the larger quality gap weighs
            at least as much).
        rater: as :class:`VirtualAnnotator` (``best``: margin = beta1 r(Y1)).
        loglik_reduction: ``mean`` (default, as SAMPO) or ``sum`` of the pixel log-likelihood (``image``).
        reward_region: ``image`` (default, the paper's) or ``disagreement`` (bundle/dpo.py).
        region_dilation: pixels by which each comparison's disagreement region is dilated.
    """

    def __init__(self, beta1: float = 1.0, beta2: float = 0.5, rater: str = "ranking",
                 loglik_reduction: str = "mean", reward_region: str = "image", region_dilation: int = 0) -> None:
        super().__init__()
        self.beta1 = loss_weight("beta1", beta1, positive=True)
        self.beta2 = loss_weight("beta2", beta2)
        if self.beta1 < self.beta2:
            raise ValueError(f"beta1 must be >= beta2 (eq. 5 weighs the best-vs-worst comparison Y1/Y4 by beta1 and "
                             f"the closer Y2/Y3 by beta2), got beta1={self.beta1}, beta2={self.beta2}")
        self.rater = _check_rater(rater)
        self.region = RewardRegion(reward_region, region_dilation, loglik_reduction)
        if rater == "best" and reward_region != "image":
            raise ValueError(f"rater 'best' rewards one candidate, which has no region of disagreement: use "
                             f"reward_region 'image' with it, got {reward_region!r}")

    def forward(self, logits: torch.Tensor, ref_logits: torch.Tensor, candidates: torch.Tensor,
                ranking: Ranking) -> dict[str, torch.Tensor]:
        """
        Args:
            logits: actor logits (..., H, W) of the items; ref_logits: the reference's, same shape (no gradient).
            candidates: (..., T, H, W) binary candidates of each item; ranking: the rater's :class:`Ranking`.
        """
        t = candidates.shape[-3]
        if self.rater != "best" and t != 4:
            raise ValueError(f"eq. 5 needs 4 candidates per item, got {t}")
        size = candidates.shape[-2:]
        index = ranking.order[..., None, None].expand_as(candidates)
        ordered = candidates.gather(-3, index).reshape(-1, *size)  # item i's Y1..YT at rows i*T .. i*T + T-1
        z = logits.unsqueeze(-3).expand(*candidates.shape).reshape(-1, *size)
        z_ref = ref_logits.detach().unsqueeze(-3).expand(*candidates.shape).reshape(-1, *size)
        s = ranking.score.reshape(-1, t)
        first = torch.arange(len(s), device=logits.device) * t
        valid = s[:, 0] > s[:, -1]
        if self.rater == "best":
            r_w, _, fraction, _ = self.region.rewards(z, z_ref, ordered, first, first + t - 1)
            margin, chosen, rejected = self.beta1 * r_w, self.beta1 * r_w, torch.zeros_like(r_w)
        else:
            q = len(first)  # both comparisons at once, Y1 / Y4 then Y2 / Y3: one pass over the candidates
            r_w, r_l, fractions, nonempty = self.region.rewards(z, z_ref, ordered, torch.cat([first, first + 1]),
                                                                torch.cat([first + 3, first + 2]))
            (r1, r2), (r4, r3) = r_w.split(q), r_l.split(q)
            fraction, (outer, inner) = fractions[:q], nonempty.split(q)
            inner = (inner & (s[:, 1] > s[:, 2])).to(r1.dtype)
            margin = self.beta1 * (r1 - r4) + self.beta2 * inner * (r2 - r3)
            chosen, rejected, valid = self.beta1 * r1, self.beta1 * r4, valid & outer
        return dpo_loss(margin, valid, chosen, rejected, fraction, like=logits)
