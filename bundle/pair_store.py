"""The store of human preference pairs: what the model proposed for an annotator's clicks, frozen into a pair
when the annotator saves the image's label (MONAI Label, ``scripts/monailabel_app``).

1. the server answers clicks on a datastore image: :meth:`PairStore.record_proposal` keeps that answer, the mask at
   the image's size and the clicks it answered (the latest answer per image);
2. the annotator saves the image's final label: :meth:`PairStore.freeze` freezes the latest proposal as the image's
   *pair* (a later click on the image does not change it; a later save freezes the latest proposal again). A label
   saved for an image the server never answered has no proposal, so no pair: it trains as a plain label;
3. the train task's datalist (:func:`attach_pairs`) gives each item with a pair ``proposal`` (an ``.npy`` (H, W)
   mask at the image's size, copied into the run folder) and ``clicks`` (``{"foreground": [[x, y], ...],
   "background": [...]}`` in image pixels, x the column); items without them are plain labels. Any datalist may
   carry these two keys (docs/DATA_CONTRACT.md).

How a pair is trained: :mod:`bundle.human_pairs`.
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

from bundle.io import atomic_write, save_json, save_npy

logger = logging.getLogger(__name__)

STORE_DIR = "sampo_pairs"  # MONAI Label: <datastore>/sampo_pairs (outside labels/, so never taken for a label tag)
_WRITE_LOCK = threading.Lock()


def _sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha1_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
