"""Human preference pairs: the label an annotator saved is preferred to what the model proposed for the same clicks.

Where the pairs come from (MONAI Label, ``scripts/monailabel_app``):

1. the server answers clicks on a datastore image: :meth:`PairStore.record_proposal` keeps that answer, the mask at
   the image's size and the clicks it answered (the latest answer per image);
2. the annotator saves the image's final label: :meth:`PairStore.freeze` freezes the latest proposal as the image's
   *pair* (a later click on the image does not change it; a later save freezes the latest proposal again). A label
   saved for an image the server never answered has no proposal, so no pair: it trains as a plain label;
3. the train task's datalist (:func:`attach_pairs`) gives each item with a pair ``proposal`` (an ``.npy`` (H, W)
   mask at the image's size, copied into the run folder) and ``clicks`` (``{"foreground": [[x, y], ...],
   "background": [...]}`` in image pixels, x the column); items without them are plain labels. Any datalist may
   carry these two keys (docs/DATA_CONTRACT.md).

Training (``configs/train.yaml``: ``human_pairs: true``, ``lambda_human``): :class:`HumanPaird` maps an item's
clicks into the network's frame exactly as served clicks are mapped (:func:`bundle.inference.click_channels`, then
the network's own click reading :func:`bundle.guidance.guidance_to_points`), so the pair is trained under the
prompt S that the network answered. The trainer decodes S with the actor and the reference as one more prompt set
of the same image encodings (:func:`bundle.engines.decode_actor_and_reference`), and :class:`HumanPairLoss` adds,
over the items of the batch that have a pair,

    y_w = the saved label (the item's training target G), y_l = the proposal, both at the model's size
    z(S) = the logits of the slot the actor serves for S (highest predicted IoU, chosen detached), for both policies
    r(y | S) = log pi_theta(y | S) - log pi_ref(y | S)     log pi = the pixel-averaged Bernoulli log-likelihood of
               bundle.preference.bernoulli_log_likelihood (SAMPO's reward)
    L_DPO = mean over valid pairs of -logsigmoid(beta * (r(y_w | S) - r(y_l | S)))
    L_SUP = mean over pairs of BCE(z_theta(S), y_w)
    L_human = lambda_human * (L_DPO + L_SUP),   L_total = L_SAMPO + L_human

beside SAMPO's simulated pairs of the same images. pi_ref is the network with its adapters off: in MONAI Label's
continued training the served model (bundle/continued.py), i.e. the model that made the proposals. A pair whose
winner equals its loser at the model's size (the proposal saved unchanged) carries no preference and is left out of
L_DPO but kept in L_SUP, as SAMPO leaves tied pairs out. Logged per iteration: ``human_pairs`` (the pairs in L_DPO),
``human_dpo``, ``human_sup``, ``human_reward_margin`` (mean beta * (r_w - r_l)).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Resize
from torch import nn

from bundle.clicks import PromptInputError, check_click_list
from bundle.guidance import PAD_LABEL, guidance_to_points
from bundle.inference import click_channels
from bundle.io import atomic_write, save_json, save_npy
from bundle.preference import _weight, bernoulli_log_likelihood

logger = logging.getLogger(__name__)

STORE_DIR = "sampo_pairs"  # MONAI Label: <datastore>/sampo_pairs (outside labels/, so never taken for a label tag)
KEYS = ("human_points", "human_point_labels", "human_loser", "human_pair")  # what HumanPaird adds to an item
TERMS = ("human_pairs", "human_dpo", "human_sup", "human_reward_margin")  # what HumanPairLoss logs
_WRITE_LOCK = threading.Lock()


def _sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha1_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# the store: proposals and frozen pairs of a datastore
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Proposal:
    """A stored proposal (or frozen pair): the mask file, the clicks it answered, the image it was made on."""

    image_id: str
    mask_path: str
    clicks: dict
    shape: tuple[int, int]
    image_sha1: str
    model: str = ""
    time: str = ""


class PairStore:
    """Proposals and frozen pairs of one datastore, kept in the folder ``root``.

    Per image id: ``<id>.proposal.npy`` + ``<id>.proposal.json`` (the server's latest answer) and ``<id>.pair.npy``
    + ``<id>.pair.json`` (frozen when the final label was saved). Each file is written atomically
    (:mod:`bundle.io`), the JSON last; it records the sha1 of the mask and of the image file, the clicks, the image
    size and the model. A mask that does not match its JSON (a write cut between the two files) or an image file
    changed since the proposal is no proposal (logged), never a wrong pair.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)

    def _paths(self, image_id: str, kind: str) -> tuple[str, str]:
        if not image_id or os.sep in image_id or (os.altsep and os.altsep in image_id) or image_id.startswith("."):
            raise ValueError(f"not a datastore image id: {image_id!r}")
        base = os.path.join(self.root, f"{image_id}.{kind}")
        return base + ".npy", base + ".json"

    def record_proposal(self, image_id: str, image_path: str, mask: np.ndarray, foreground: Sequence,
                        background: Sequence = (), model: str = "") -> Proposal:
        """Keep ``mask`` ((H, W), > 0 inside; the image's size) as the latest proposal for ``image_id`` and the
        clicks it answered ((x, y) image pixels)."""
        mask = (np.asarray(mask) > 0).astype(np.uint8)
        if mask.ndim != 2:
            raise ValueError(f"{image_id}: a proposal is a 2D mask (H, W), got shape {mask.shape}")
        clicks = {"foreground": [list(map(float, c)) for c in foreground],
                  "background": [list(map(float, c)) for c in background]}
        record = {"image_id": image_id, "image": os.path.abspath(image_path), "image_sha1": _sha1_file(image_path),
                  "shape": list(mask.shape), "clicks": clicks, "mask_sha1": _sha1_bytes(mask.tobytes()),
                  "model": model, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        npy, meta = self._paths(image_id, "proposal")
        with _WRITE_LOCK:  # the two files of one image stay a pair under concurrent requests
            save_npy(mask, npy)
            save_json(record, meta)
        return self._proposal(record, npy)

    @staticmethod
    def _proposal(record: Mapping, npy: str) -> Proposal:
        return Proposal(record["image_id"], npy, dict(record["clicks"]), tuple(record["shape"]), record["image_sha1"],
                        record.get("model", ""), record.get("time", ""))

    def _read(self, image_id: str, kind: str, image_path: str | None) -> Proposal | None:
        npy, meta = self._paths(image_id, kind)
        if not os.path.isfile(meta):
            return None
        try:
            with open(meta, encoding="utf-8") as f:
                record = json.load(f)
            mask = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable stored %s (%s): no pair for image %s", meta, kind, e, image_id)
            return None
        if _sha1_bytes(np.ascontiguousarray(mask.astype(np.uint8)).tobytes()) != record.get("mask_sha1"):
            logger.warning("%s: the mask %s does not match its record (an interrupted write): no pair for image %s",
                           meta, npy, image_id)
            return None
        try:
            changed = image_path is not None and _sha1_file(image_path) != record.get("image_sha1")
        except OSError as e:
            logger.warning("%s: image %s unreadable (%s): no pair for it", meta, image_path, e)
            return None
        if changed:
            logger.warning("%s: image %s changed since the model's proposal: no pair for it", meta, image_path)
            return None
        return self._proposal(record, npy)

    def proposal(self, image_id: str, image_path: str | None = None) -> Proposal | None:
        """The latest proposal for ``image_id`` (checked against ``image_path``'s content when given)."""
        return self._read(image_id, "proposal", image_path)

    def pair(self, image_id: str, image_path: str | None = None) -> Proposal | None:
        """The frozen pair of ``image_id``: the proposal its saved label corrected; ``None``: a plain label."""
        return self._read(image_id, "pair", image_path)

    def freeze(self, image_id: str, image_path: str) -> Proposal | None:
        """A final label of ``image_id`` was saved: its latest proposal (if any, and made on this image's current
        content) becomes its pair. Returns the pair, or ``None`` (the image was never answered: a plain label)."""
        with _WRITE_LOCK:
            proposal = self._read(image_id, "proposal", image_path)
            if proposal is None:
                logger.info("label of %s saved without a proposal of the model: a plain label (no pair)", image_id)
                return None
            npy, meta = self._paths(image_id, "pair")
            with open(proposal.mask_path, "rb") as src, atomic_write(npy, "wb") as out:
                shutil.copyfileobj(src, out)
            with open(self._paths(image_id, "proposal")[1], encoding="utf-8") as f:
                record = json.load(f)
            save_json({**record, "frozen": time.strftime("%Y-%m-%dT%H:%M:%S")}, meta)
        logger.info("label of %s saved: paired with the model's proposal for clicks %s", image_id, proposal.clicks)
        return self._proposal(record, npy)


def attach_pairs(items: Sequence[Mapping], image_ids: Sequence[str], store: PairStore,
                 snapshot_dir: str | os.PathLike | None = None) -> list[dict]:
    """Datalist ``items`` (``image`` paths; ``image_ids[i]`` the datastore id of ``items[i]``) with ``proposal`` and
    ``clicks`` added where ``store`` holds a pair for the image; the others unchanged (plain labels). With
    ``snapshot_dir`` each pair's mask is copied there (``<id>.npy``), so that a training run keeps the pairs it was
    given while annotators go on saving."""
    out = []
    for item, image_id in zip(items, image_ids):
        item = dict(item)
        pair = store.pair(image_id, item.get("image")) if image_id else None
        if pair is not None:
            path = pair.mask_path
            if snapshot_dir is not None:
                path = os.path.join(os.fspath(snapshot_dir), f"{image_id}.npy")
                with open(pair.mask_path, "rb") as src, atomic_write(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            item.update({"proposal": path, "clicks": pair.clicks})
        out.append(item)
    n = count_pairs(out)
    logger.info("%d of %d datalist items carry a human preference pair (saved label vs the model's proposal)",
                n, len(out))
    return out


def count_pairs(items: Sequence[Mapping] | Any) -> int:
    """Number of datalist items with a ``proposal`` (logged as the run's ``human_pair_items`` param)."""
    try:
        return sum(1 for item in items if isinstance(item, Mapping) and item.get("proposal"))
    except TypeError:
        return 0


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
        return points[0].float(), labels[0].long(), torch.as_tensor(loser, dtype=torch.float32)

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
        loglik_reduction: ``mean`` (pixel-averaged, default) or ``sum`` log-likelihood, as SAMPO's.
    """

    def __init__(self, beta: float = 0.1, lambda_human: float = 1.0, loglik_reduction: str = "mean") -> None:
        super().__init__()
        self.beta = _weight("beta", beta, positive=True)
        self.lambda_human = _weight("lambda_human", lambda_human)
        if loglik_reduction not in ("mean", "sum"):
            raise ValueError(f"loglik_reduction must be 'mean' or 'sum', got {loglik_reduction!r}")
        self.loglik_reduction = loglik_reduction

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
        return {"loss": zero, "human_pairs": torch.tensor(0.0), "human_dpo": zero.detach(),
                "human_sup": zero.detach(), "human_reward_margin": zero.detach()}

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
            gradients, as SAMPOLoss returns its terms; the trainer detaches what it logs);
            ``human_pairs`` (pairs in L_DPO) and ``human_reward_margin``.
        """
        slot = iou_pred.detach().argmax(-1)
        pick = lambda z: z.gather(1, slot.view(-1, 1, 1, 1).expand(-1, 1, *z.shape[-2:]))[:, 0]  # noqa: E731
        z, z_ref = pick(logits), pick(ref_logits.detach())
        w, l = (winner > 0.5).to(z.dtype), (loser > 0.5).to(z.dtype)

        def reward(y):
            return (bernoulli_log_likelihood(z, y, self.loglik_reduction)
                    - bernoulli_log_likelihood(z_ref, y, self.loglik_reduction))

        valid = (w != l).flatten(1).any(1)  # a proposal saved unchanged carries no preference
        margin = self.beta * (reward(w) - reward(l))[valid]
        dpo = -F.logsigmoid(margin).mean() if margin.numel() else z.sum() * 0.0
        sup = F.binary_cross_entropy_with_logits(z, w)
        return {"loss": self.lambda_human * (dpo + sup), "human_pairs": torch.tensor(float(margin.numel())),
                "human_dpo": dpo, "human_sup": sup,
                "human_reward_margin": margin.detach().mean() if margin.numel() else margin.new_zeros(())}
