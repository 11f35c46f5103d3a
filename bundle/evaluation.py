"""Evaluation of a trained PromptableSAM (METHOD.md, "Evaluation protocol"), as MONAI ``SupervisedEvaluator`` parts.

``configs/evaluate.yaml`` runs a ``SupervisedEvaluator`` over the test split: each item (an image, and for T2 /
organ one item per class present) gets 3 positive + 3 negative points seeded per image and class
(:class:`bundle.transforms.prompts.EvalPromptsd`), drawn as click channels; the network's single-tensor forward
returns the logits of the slot with the highest predicted IoU; ``logit > 0`` is the predicted mask.

:class:`bundle.handlers.EvaluationReport` is the handler that collects one row per item (Dice, IoU, class, tissue,
number of nuclei, density stratum), and at the end writes ``results.csv`` and ``summary.json`` (means overall, per
class, per tissue, per density stratum), optionally the prompt-sensitivity grid (:mod:`bundle.sensitivity`), and logs
all of it to one MLflow run.

Nuclei (t1 / t2, :func:`item_nuclei_metrics`): the predicted mask is split into nuclei by inference's watershed
(:func:`bundle.nuclei.split_instances`, ``configs/evaluate.yaml#nuclei``) and matched against the item's target
instances (``target_inst``: every nucleus for t1, those of the class for t2) with :func:`bundle.nuclei_metrics.
nuclei_metrics`: PQ = DQ x SQ, AJI, detection F1 at IoU > 0.5 and the count error. Groups report the means over
their items (HoVer-Net's convention for PQ and AJI: per image, then averaged); ``overall.nuclei_pooled`` adds the
detection F1 of the pooled counts, ``F1 = 2 sum TP / (2 sum TP + sum FP + sum FN)``.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn

from bundle.checkpoints import BaseMismatchError, load_weights
from bundle.guidance import guidance_to_points
from bundle.io import atomic_write
from bundle.metrics import STRATA, count_instances, overlap
from bundle.networks import CheckpointError
from bundle.networks.decoding import upsample
from bundle.nuclei import split_instances
from bundle.nuclei_metrics import nuclei_metrics

logger = logging.getLogger(__name__)

NUCLEI_FIELDS = ("pq", "dq", "sq", "aji", "f1", "precision", "recall", "tp", "fp", "fn", "true_count", "pred_count",
                 "count_abs_error", "count_rel_error")
ROW_FIELDS = ("name", "target_class", "class_name", "tissue", "n_nuclei", "stratum", "dice", "iou", "oracle_dice",
              "pred_fraction", "target_fraction", *NUCLEI_FIELDS)
# the nuclei metrics that groups report as means (the TP / FP / FN counts are pooled instead)
NUCLEI_MEANS = ("pq", "dq", "sq", "aji", "f1", "true_count", "pred_count", "count_abs_error", "count_rel_error")
NUCLEI_SPLIT_KEYS = ("threshold", "min_distance", "min_size")


# -- the network under evaluation ----------------------------------------------------------------------------------
def load_checkpoint(network: nn.Module, checkpoint: str | None) -> nn.Module:
    """Load ``checkpoint`` into ``network`` (strictly) and return it; ``None`` / ``""`` keeps the initial weights.

    Accepts the raw state dict that ``CheckpointSaver`` writes for ``best_model.pt`` and the training state
    ``checkpoint_epoch=N.pt`` (a dict with a ``network`` entry).
    """
    if not checkpoint:
        logger.warning("Evaluating the INITIAL network (no checkpoint given: zero-shot; initialisation: %s)",
                       getattr(network, "initialisation", "?"))
        return network
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint to evaluate not found: {checkpoint}")
    try:  # a bare state dict, a training state's "network" entry, or trained tensors on the base they name
        load_weights(network, checkpoint)
    except BaseMismatchError:  # its message says which base to build the network on
        raise
    except CheckpointError as e:
        raise RuntimeError(f"{checkpoint} does not fit the configured network (model_size / lora_rank / "
                           f"image_size must be those of its training): {e}") from e
    logger.info("Evaluating %s", checkpoint)
    return network


@torch.no_grad()
def slot_dice(network: nn.Module, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Dice of each of the 3 output slots for one evaluator input ``x`` (C + 2, H, W) against ``label``: the
    slot the IoU head picks is what users get; the best of the three (the "oracle slot") shows what it costs."""
    c = network.in_channels
    h, w = x.shape[-2:]
    points, labels = guidance_to_points(x[None, c:], network.max_points)
    low, _ = network.decode(network.encode(x[None, :c]), points[:, None], labels[:, None], input_size=(h, w))
    return overlap(upsample(low[0, 0], (h, w)) > 0, torch.as_tensor(label).reshape(h, w).to(low.device))[0]


def nuclei_split(config: dict | None) -> dict | None:
    """The watershed parameters of ``configs/evaluate.yaml#nuclei`` (``enabled``, ``threshold``, ``min_distance``,
    ``min_size``), or None when disabled; an unknown key is refused, naming the known ones."""
    if not config:
        return None
    unknown = sorted(set(config) - {"enabled", *NUCLEI_SPLIT_KEYS})
    if unknown:
        raise ValueError(f"nuclei: unknown key(s) {unknown}; expected enabled, {', '.join(NUCLEI_SPLIT_KEYS)}")
    if not config.get("enabled", True):
        return None
    return {k: config[k] for k in NUCLEI_SPLIT_KEYS if k in config}


def item_nuclei_metrics(pred: torch.Tensor | np.ndarray, target_inst: torch.Tensor | np.ndarray,
                        split: dict) -> dict[str, float | int]:
    """Nuclei metrics of one item: the binary prediction ``pred`` (1, H, W) split into nuclei with ``split``
    (:func:`bundle.nuclei.split_instances`) against the target instances ``target_inst`` (1, H, W)."""
    pred = np.asarray(torch.as_tensor(pred).detach().cpu()).reshape(np.shape(target_inst)[-2:])
    true = np.asarray(torch.as_tensor(target_inst).detach().cpu()).reshape(pred.shape).astype(np.int64)
    return nuclei_metrics(true, split_instances(pred > 0.5, **split))


# -- data ----------------------------------------------------------------------------------------------------------
class CountNucleid(MapTransform):
    """Write ``n_nuclei``: the number of instances in channel 0 of the raw [instance, class] label.

    Placed before resizing, so that small nuclei lost by nearest-neighbour resizing still count.
    """

    def __init__(self, keys="label", output_key: str = "n_nuclei") -> None:
        super().__init__(keys)
        self.output_key = output_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = count_instances(np.asarray(d[key])[0])
        return d


def subset(items: Sequence[dict], max_images: int | None = None) -> list[dict]:
    """The items of ``max_images`` distinct images (with all their classes), spread over the source images; all
    items when None.

    Images are taken round-robin over the sources (``source``, else the image's own name) in the order they first
    appear: the first image of every source, then the second of every source, ... so that N tiles of a tiled
    dataset come from N different source images when there are that many. Items keep their order.
    """
    if max_images is None:
        return list(items)
    if int(max_images) < 1:
        raise ValueError(f"eval_max_images must be a positive number of images or null (all), got {max_images!r}")
    by_source: dict[str, list[str]] = {}
    seen = set()
    for item in items:
        if item["name"] not in seen:
            seen.add(item["name"])
            by_source.setdefault(str(item.get("source", item["name"])), []).append(item["name"])
    keep: list[str] = []
    queues = list(by_source.values())
    for rank in range(max(map(len, queues), default=0)):
        keep += [q[rank] for q in queues if rank < len(q)]
    keep_set = set(keep[: int(max_images)])
    return [item for item in items if item["name"] in keep_set]


# -- results -------------------------------------------------------------------------------------------------------
def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def _means(rows: list[dict]) -> dict:
    """Dice and IoU means with ``n``, and the nuclei metrics' means when the rows have them."""
    out = {"dice": _mean(rows, "dice"), "iou": _mean(rows, "iou")}
    if rows and rows[0].get("pq") is not None:
        out.update({k: _mean(rows, k) for k in NUCLEI_MEANS})
    out["n"] = len(rows)
    return out


def _pooled(rows: list[dict]) -> dict:
    """Detection F1 / precision / recall of the TP, FP and FN summed over ``rows``."""
    tp, fp, fn = (int(sum(r[k] for r in rows)) for k in ("tp", "fp", "fn"))
    return {"f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
            "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "tp": tp, "fp": fp, "fn": fn}


def _group(rows: list[dict], field: str, order: Sequence[str] | None = None) -> dict:
    groups = defaultdict(list)
    for r in rows:
        if r.get(field) not in (None, ""):
            groups[str(r[field])].append(r)
    names = [n for n in order if n in groups] if order else sorted(groups)
    return {n: _means(groups[n]) for n in names}


def summarise(rows: list[dict], task: str) -> dict:
    """Means of Dice and IoU (and of the nuclei metrics when the rows have them): overall, per class (t2 / organ),
    per tissue (when known), per density stratum (nuclei).

    Each group lists exactly the values present in ``rows`` with the number of items ``n``.
    """
    summary = {
        "task": task,
        "n_items": len(rows),
        "n_images": len({r["name"] for r in rows}),
        "overall": _means(rows),
    }
    if rows and rows[0].get("pq") is not None:
        summary["overall"]["nuclei_pooled"] = _pooled(rows)
    if rows and rows[0].get("oracle_dice") is not None:  # the best of the 3 slots: the IoU head's selection cost
        summary["overall"]["oracle_dice"] = _mean(rows, "oracle_dice")
    if rows and "pred_fraction" in rows[0]:
        summary["overall"]["pred_fraction"] = _mean(rows, "pred_fraction")
        summary["overall"]["target_fraction"] = _mean(rows, "target_fraction")
        # reference: predicting the whole image as target gives Dice 2t / (1 + t) and IoU t for a target share t
        t = np.array([r["target_fraction"] for r in rows], float)
        summary["all_foreground"] = {"dice": float(np.mean(2 * t / (1 + t))), "iou": float(np.mean(t))}
    if task != "t1":
        summary["per_class"] = _group(rows, "class_name")
    if any(r.get("tissue") not in (None, "") for r in rows):
        summary["per_tissue"] = _group(rows, "tissue")
    if task != "organ":
        summary["per_stratum"] = _group(rows, "stratum", STRATA)
    return summary


def write_rows(rows: list[dict], path: str) -> str:
    """One CSV row per item (``ROW_FIELDS``), written atomically."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in ROW_FIELDS})
    return path


def summary_metrics(summary: dict, prefix: str = "test") -> dict[str, float]:
    """Flat MLflow metrics of a summary: ``test_dice``, ``test_iou``, ``test_dice/class/<name>``, ..."""
    out = {f"{prefix}_dice": summary["overall"]["dice"], f"{prefix}_iou": summary["overall"]["iou"]}
    for key in ("oracle_dice", "pred_fraction", "target_fraction", *NUCLEI_MEANS):
        if key in summary["overall"]:
            out[f"{prefix}_{key}"] = summary["overall"][key]
    if "nuclei_pooled" in summary["overall"]:
        out[f"{prefix}_f1_pooled"] = summary["overall"]["nuclei_pooled"]["f1"]
    for section, tag in (("per_class", "class"), ("per_tissue", "tissue"), ("per_stratum", "stratum")):
        for name, values in summary.get(section, {}).items():
            safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
            for key in ("dice", "iou", "pq", "aji", "f1", "count_rel_error"):
                if key in values:
                    out[f"{prefix}_{key}/{tag}/{safe}"] = values[key]
    return {k: v for k, v in out.items() if np.isfinite(v)}


def evaluation_run_name(task: str, checkpoint: str | None, which: str = "actor") -> str:
    """The MLflow run name of one evaluation, a new run every time:
    ``eval_<task>_<checkpoint stem or 'initial'>[_reference]_YYYYmmdd_HHMMSS`` (:func:`bundle.tracking.run_name`
    names the training run, kept across resumes)."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0] if checkpoint else "initial"
    suffix = "_reference" if which == "reference" else ""
    return f"eval_{task}_{stem}{suffix}_{time.strftime('%Y%m%d_%H%M%S')}"
