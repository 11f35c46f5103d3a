"""Human preference pairs: the label an annotator saved is preferred to what the model proposed for the same clicks.

Where the pairs come from: :mod:`bundle.pair_store` (MONAI Label records them; any datalist may carry them).

Training (``configs/train.yaml``: ``human_pairs: true``, ``lambda_human``): :class:`HumanPaird` maps an item's
clicks into the network's frame exactly as served clicks are mapped (:func:`bundle.guidance.click_channels`, then
the network's own click reading :func:`bundle.guidance.guidance_to_points`), so the pair is trained under the
prompt S that the network answered. The trainer decodes S with the actor and the reference as one more prompt set
of the same image encodings (:func:`bundle.engines.decode_actor_and_reference`), and :class:`HumanPairLoss` adds,
over the items of the batch that have a pair,

    y_w = the saved label (the item's training target G), y_l = the proposal, both at the model's size
    z(S) = the logits of the slot the actor serves for S (highest predicted IoU, chosen detached), for both policies
    r(y | S) = the reward of bundle/dpo.py over ``reward_region`` (``image``: the pixel-averaged log-ratio
               log pi_theta(y | S) - log pi_ref(y | S), SAMPO's reward; ``disagreement``: its mean over
               D = dilate(y_w xor y_l), where the annotator changed the proposal)
    L_DPO = mean over valid pairs of -logsigmoid(beta * (r(y_w | S) - r(y_l | S)))      (bundle.dpo.dpo_loss)
    L_SUP = mean over pairs of BCE(z_theta(S), y_w)
    L_human = lambda_human * (L_DPO + L_SUP),   L_total = L_SAMPO + L_human

beside SAMPO's simulated pairs of the same images. pi_ref is the network with its adapters off: in MONAI Label's
continued training the served model (bundle/continued.py), i.e. the model that made the proposals. A pair whose
winner equals its loser at the model's size (the proposal saved unchanged) carries no preference and is left out of
L_DPO but kept in L_SUP, as SAMPO leaves tied pairs out. Winner and loser share one logit map, so in ``image`` mode
the pixels where they agree cancel and the margin is the disagreement's, diluted by |D| / P. Logged per iteration:
``human_dpo``, ``human_sup`` and the DPO core's terms with the prefix ``human_`` (``human_pairs``: the pairs in
L_DPO, ``human_margins``, ``human_accuracies``, ``human_chosen_rewards``, ``human_rejected_rewards``,
``human_disagreement_fraction``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Resize
from monai.utils import convert_to_tensor
from torch import nn

from bundle.clicks import PromptInputError, check_click_list
from bundle.dpo import TERMS as DPO_TERMS
from bundle.dpo import RewardRegion, pair_terms
from bundle.guidance import PAD_LABEL, click_channels, guidance_to_points
from bundle.loss_weights import loss_weight

logger = logging.getLogger(__name__)

KEYS = ("human_points", "human_point_labels", "human_loser", "human_pair")  # what HumanPaird adds to an item
TERMS = ("human_dpo", "human_sup") + tuple(f"human_{t}" for t in DPO_TERMS)  # what HumanPairLoss logs


# ------------------------------------------------------------------------------------------------------------------
# training: the item transform and the loss
# ------------------------------------------------------------------------------------------------------------------
class HumanPaird(MapTransform):
    """An item's ``proposal`` and ``clicks`` -> the human pair's inputs at the model's size (every item gets them):

    * ``human_points`` (2 * max_points, 2), ``human_point_labels`` (2 * max_points,): the clicks as the network reads
      them from its click channels at ``image_size`` (label -1: no click);
    * ``human_loser`` (1, S, S): the proposal resized as the label is (nearest);
    * ``human_pair``: 1.0 for an item with a usable pair, 0.0 for a plain label (all of the above zero / -1).

    Runs on the loaded item (``image`` (C, H, W) and ``label`` at the image's size), before any resizing. A
    proposal that cannot be used (missing file, another size than the image, clicks outside it or malformed) is
    logged with the file and the reason, and the item trains as a plain label.

    Args:
        image_size: the network's input size S.
        max_points: clicks read per channel, as the served network reads them (``max_points`` of inference.yaml).
        image_key, proposal_key, clicks_key: item keys.
    """

    def __init__(self, image_size: int, max_points: int = 16, image_key: str = "image",
                 proposal_key: str = "proposal", clicks_key: str = "clicks") -> None:
        super().__init__(keys=[image_key], allow_missing_keys=False)
        self.image_size, self.max_points = int(image_size), int(max_points)
        self.image_key, self.proposal_key, self.clicks_key = image_key, proposal_key, clicks_key
        self._resize = Resize((self.image_size, self.image_size), mode="nearest")

    def _pair(self, d: Mapping, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        path = d.get(self.proposal_key)
        if not path:
            return None
        name = os.fspath(path)
        try:
            mask = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            logger.warning("proposal %s unreadable (%s): item trains as a plain label", path, e)
            return None
        if mask.shape != tuple(size):
            logger.warning("proposal %s has size %s but its image has size %s: item trains as a plain label",
                           path, tuple(mask.shape), tuple(size))
            return None
        clicks = d.get(self.clicks_key) or {}
        try:
            if not isinstance(clicks, Mapping):
                raise PromptInputError(f"clicks must be {{'foreground': [[x, y]], 'background': [...]}}, "
                                       f"got {clicks!r:.80}")
            fg = check_click_list(clicks.get("foreground"), "foreground", name)
            bg = check_click_list(clicks.get("background"), "background", name)
            h, w = size
            outside = [c for c in fg + bg if len(c) != 2 or not (0 <= c[0] < w and 0 <= c[1] < h)]
            if not fg or outside or len(fg) > self.max_points or len(bg) > self.max_points:
                raise PromptInputError(f"clicks {clicks} are not what the server answers (>= 1 foreground click, "
                                       f"at most {self.max_points} per kind, [x, y] inside {w} x {h})")
        except PromptInputError as e:
            logger.warning("proposal %s: %s: item trains as a plain label", path, e)
            return None
        guidance = click_channels(fg + bg, len(fg), size, self.image_size)
        points, labels = guidance_to_points(guidance[None], self.max_points)
        loser = self._resize(torch.from_numpy((mask > 0).astype(np.float32))[None])
        # a plain tensor, as for an item without a pair: a batch mixing a MetaTensor and a tensor does not collate
        return points[0].float(), labels[0].long(), convert_to_tensor(loser, dtype=torch.float32, track_meta=False)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = d[self.image_key]
        pair = self._pair(d, tuple(int(v) for v in image.shape[-2:]))
        s, p = self.image_size, 2 * self.max_points
        if pair is None:
            points, labels = torch.zeros((p, 2)), torch.full((p,), PAD_LABEL, dtype=torch.long)
            loser, flag = torch.zeros((1, s, s)), 0.0
        else:
            (points, labels, loser), flag = pair, 1.0
        d.update({"human_points": points, "human_point_labels": labels, "human_loser": loser,
                  "human_pair": torch.tensor(flag)})
        return d


@dataclass
class HumanPrompts:
    """The batch's human pairs: ``index`` (T,) of their images, the prompt (T, 1, P, 2) / (T, 1, P) to decode and the
    ``loser`` (T, H, W)."""

    index: torch.Tensor
    points: torch.Tensor
    labels: torch.Tensor
    loser: torch.Tensor

    @property
    def prompt(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, points, labels)``: the ``extra`` argument of :func:`bundle.engines.decode_actor_and_reference`."""
        return self.index, self.points, self.labels


class HumanPairLoss(nn.Module):
    """The human-pair term (module docstring): ``lambda_human * (L_DPO + L_SUP)`` over the batch's pairs.

    Args:
        beta: DPO temperature (> 0), SAMPO's ``beta``.
        lambda_human: weight of the human-pair term against SAMPO's loss (>= 0).
        loglik_reduction: ``mean`` (pixel-averaged, default) or ``sum`` log-likelihood, as SAMPO's (``image``).
        reward_region: ``image`` or ``disagreement`` (bundle/dpo.py), as SAMPO's.
        region_dilation: pixels by which the disagreement region is dilated.
    """

    def __init__(self, beta: float = 0.1, lambda_human: float = 1.0, loglik_reduction: str = "mean",
                 reward_region: str = "image", region_dilation: int = 0) -> None:
        super().__init__()
        self.beta = loss_weight("beta", beta, positive=True)
        self.lambda_human = loss_weight("lambda_human", lambda_human)
        self.region = RewardRegion(reward_region, region_dilation, loglik_reduction)

    @staticmethod
    def prompts(batch: Mapping | None, device: torch.device | str) -> HumanPrompts | None:
        """The human pairs of a collated ``batch`` (:class:`HumanPaird` keys) on ``device``; ``None`` without any."""
        if not isinstance(batch, Mapping) or "human_pair" not in batch:
            return None
        index = torch.nonzero(torch.as_tensor(batch["human_pair"]).reshape(-1) > 0).flatten()
        if not len(index):
            return None
        take = lambda key: torch.as_tensor(batch[key])[index].to(device)  # noqa: E731
        return HumanPrompts(index.to(device), take("human_points").float()[:, None],
                            take("human_point_labels").long()[:, None], take("human_loser")[:, 0].float())

    def empty(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of a batch without a human pair (all zero, the loss included)."""
        zero = like.sum() * 0.0
        return {"loss": zero, **{key: zero.detach() for key in TERMS}}

    def forward(self, logits: torch.Tensor, ref_logits: torch.Tensor, iou_pred: torch.Tensor, winner: torch.Tensor,
                loser: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            logits: the actor's logits of the human prompts (T, M, H, W) at the winner's size.
            ref_logits: the reference's, same shape (no gradient).
            iou_pred: the actor's predicted IoUs (T, M): the served slot of each prompt.
            winner: the saved labels (T, H, W), binary.
            loser: the proposals (T, H, W), binary.

        Returns:
            ``loss`` (weighted by ``lambda_human``) and the unweighted ``human_dpo``, ``human_sup`` (both with their
            gradients, as SAMPOLoss returns its terms; the trainer detaches what it logs); the DPO core's terms
            prefixed ``human_`` (``human_pairs``: pairs in L_DPO, ``human_margins``, ...).
        """
        slot = iou_pred.detach().argmax(-1)
        pick = lambda z: z.gather(1, slot.view(-1, 1, 1, 1).expand(-1, 1, *z.shape[-2:]))[:, 0]  # noqa: E731
        z, z_ref = pick(logits), pick(ref_logits.detach())
        w, l = (winner > 0.5).to(z.dtype), (loser > 0.5).to(z.dtype)
        t = len(z)
        pairs = torch.arange(t, device=z.device)
        # one logit map scores both masks: candidates [winner_0..winner_T-1, loser_0..loser_T-1]
        terms = pair_terms(self.region, self.beta, torch.cat([z, z]), torch.cat([z_ref, z_ref]), torch.cat([w, l]),
                           pairs, pairs + t)  # a proposal saved unchanged has an empty region: left out
        dpo = terms.pop("loss")
        sup = F.binary_cross_entropy_with_logits(z, w)
        return {"loss": self.lambda_human * (dpo + sup), "human_dpo": dpo, "human_sup": sup,
                **{f"human_{key}": value for key, value in terms.items()}}
