"""Evaluator handler: one row per item (Dice, IoU, class, tissue, number of nuclei, density stratum; for nuclei
tasks PQ / DQ / SQ, AJI, detection F1 and the count error, :func:`bundle.evaluation.item_nuclei_metrics`), then
``results.csv``, ``summary.json`` (:func:`bundle.evaluation.summarise`), optionally the prompt-sensitivity grid
(:mod:`bundle.sensitivity`), and one MLflow run with all of it."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import torch
from ignite.engine import Engine, Events

from bundle.evaluation import item_nuclei_metrics, nuclei_split, slot_dice, summarise, summary_metrics, write_rows
from bundle.io import save_json
from bundle.metrics import density_stratum, dice_iou

logger = logging.getLogger(__name__)


def _scalar(x: Any):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (list, tuple)) and len(x) == 1:
        return _scalar(x[0])
    return x


class EvaluationReport:
    """Evaluator handler: one row per item, then CSV + summary JSON (+ sensitivity grid) and one MLflow run.

    Args:
        output_dir: folder of ``results.csv``, ``summary.json`` and the sensitivity files.
        task: ``t1``, ``t2`` or ``organ`` (decides which groupings are reported).
        classes: ``{"1": "other", ...}`` from the datalist, to name the classes.
        in_channels: image channels before the click channels in the evaluator's input.
        sensitivity: optional :class:`bundle.sensitivity.PromptSensitivity`, fed every item.
        oracle_slot: also report the Dice of the best of the 3 output slots (:func:`slot_dice`; one more encoder
            pass per item).
        tracking_uri, experiment_name, run_name: where the MLflow run goes; no tracking when ``tracking_uri`` is
            empty.
        nuclei: ``{"enabled", "threshold", "min_distance", "min_size"}``: split each predicted mask into nuclei
            (inference's watershed) and score them against the item's ``target_inst``; None or ``enabled: false``
            turns them off. Items without ``target_inst`` get none.
        params: parameters logged with the run (checkpoint, task, prompts, ...).
        artifacts: further files logged with the run when they exist (e.g. the executed config).
    """

    def __init__(
        self,
        output_dir: str,
        task: str,
        classes: dict | None = None,
        in_channels: int = 3,
        sensitivity=None,
        oracle_slot: bool = False,
        tracking_uri: str | None = None,
        experiment_name: str = "sampo",
        run_name: str | None = None,
        params: dict | None = None,
        artifacts: Sequence[str] = (),
        nuclei: dict | None = None,
    ) -> None:
        self.artifacts = list(artifacts)
        self.nuclei = nuclei_split(nuclei)
        self.output_dir, self.task, self.in_channels = output_dir, task, in_channels
        self.classes = {int(k): v for k, v in (classes or {}).items()}
        self.sensitivity, self.oracle_slot = sensitivity, oracle_slot
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.run_name = run_name or f"eval_{task}_{time.strftime('%Y%m%d_%H%M%S')}"
        self.params = params or {}
        self.rows: list[dict] = []
        self.summary: dict | None = None
        self.run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.rows = []
        if self.sensitivity is not None:
            self.sensitivity.reset()

    def collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, dict):  # not decollated
            raise ValueError("EvaluationReport needs a decollating evaluator (decollate=True)")
        for item, out in zip(batch, output):
            target_class = int(_scalar(item.get("target_class", 0)) or 0)
            n_nuclei = _scalar(item.get("n_nuclei"))
            d, i = dice_iou(out["pred"], out["label"])
            row = {
                "name": str(_scalar(item.get("name", len(self.rows)))),
                "target_class": target_class,
                "class_name": self.classes.get(target_class, str(target_class)) if target_class else "",
                "tissue": str(_scalar(item.get("tissue", "")) or ""),
                "n_nuclei": "" if n_nuclei is None else int(n_nuclei),
                "stratum": "" if n_nuclei is None or self.task == "organ" else density_stratum(int(n_nuclei)),
                "dice": d,
                "iou": i,
                "oracle_dice": (float(slot_dice(engine.network, torch.as_tensor(item["image"]).to(engine.state.device),
                                                out["label"]).max()) if self.oracle_slot else None),
                # share of the image predicted / annotated as target: shows degenerate all-in / all-out predictions
                "pred_fraction": float(torch.as_tensor(out["pred"]).float().mean()),
                "target_fraction": float(torch.as_tensor(out["label"]).float().mean()),
            }
            if self.nuclei is not None and item.get("target_inst") is not None:
                row.update(item_nuclei_metrics(out["pred"], item["target_inst"], self.nuclei))
            self.rows.append(row)
            if self.sensitivity is not None:
                image = torch.as_tensor(item["image"])[: self.in_channels]
                key = f"{row['name']}#{target_class}"
                self.sensitivity.add(engine.network, image, torch.as_tensor(out["label"]), key, engine.state.device)

    def completed(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.summary = summarise(self.rows, self.task)
        self.summary["params"] = {k: v for k, v in self.params.items()}
        files = [write_rows(self.rows, os.path.join(self.output_dir, "results.csv"))]
        metrics = summary_metrics(self.summary)
        if self.sensitivity is not None and self.sensitivity.n_images:
            sens_files, sens_summary = self.sensitivity.write(self.output_dir, self.summary)
            self.summary["sensitivity"] = sens_summary
            files += sens_files
            metrics.update({f"sensitivity_{k}": v for k, v in sens_summary.items() if isinstance(v, float)})
        summary_path = save_json(self.summary, os.path.join(self.output_dir, "summary.json"), default=str)
        files.insert(1, summary_path)
        files += [a for a in self.artifacts if os.path.isfile(a)]
        if self.tracking_uri:
            self.run_id = self._log(metrics, files)
            self.summary["mlflow_run_id"] = self.run_id
            save_json(self.summary, summary_path, default=str)
        _print_summary(self.summary, self.output_dir, self.run_name if self.tracking_uri else None, self.tracking_uri)

    def _log(self, metrics: dict, files: list[str]) -> str:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        from bundle.tracking import experiment_id

        client = MlflowClient(self.tracking_uri)
        run = client.create_run(experiment_id(client, self.experiment_name), run_name=self.run_name, tags={"kind": "evaluation", "task": self.task})
        rid = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, str(v)[:6000]) for k, v in self.params.items()]
        params += [Param("n_items", str(self.summary["n_items"])), Param("n_images", str(self.summary["n_images"]))]
        client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], params=params)
        for path in files:
            client.log_artifact(rid, path)
        client.set_terminated(rid, "FINISHED")
        return rid


def _print_summary(summary: dict, output_dir: str, run: str | None, uri: str | None) -> None:
    o = summary["overall"]
    lines = ["", f"Evaluation ({summary['task']}, {summary['n_items']} items / {summary['n_images']} images): "
                 f"Dice {o['dice']:.4f}  IoU {o['iou']:.4f}"
                 + (f"  (oracle slot Dice {o['oracle_dice']:.4f})" if "oracle_dice" in o else "")
                 + (f"  (predicted share {o['pred_fraction']:.3f}, target share {o['target_fraction']:.3f})"
                    if "pred_fraction" in o else "")]
    if "pq" in o:
        lines.append(f"  nuclei: PQ {o['pq']:.4f} (DQ {o['dq']:.4f}, SQ {o['sq']:.4f})  AJI {o['aji']:.4f}  "
                     f"F1 {o['f1']:.4f} (pooled {o['nuclei_pooled']['f1']:.4f})  count error {o['count_rel_error']:.3f} "
                     f"({o['pred_count']:.1f} predicted / {o['true_count']:.1f} true per item)")
    for section in ("per_class", "per_tissue", "per_stratum"):
        for name, v in summary.get(section, {}).items():
            lines.append(f"  {section[4:]:>7} {name:<14} Dice {v['dice']:.4f}  IoU {v['iou']:.4f}"
                         + (f"  PQ {v['pq']:.4f}  AJI {v['aji']:.4f}  F1 {v['f1']:.4f}" if "pq" in v else "")
                         + f"  (n={v['n']})")
    if "sensitivity" in summary:
        s = summary["sensitivity"]
        lines.append(f"  prompt sensitivity: Dice {s['min_dice']:.4f} .. {s['max_dice']:.4f} over the grid "
                     f"({s['n_images']} items)")
    lines.append(f"  results: {os.path.abspath(output_dir)}")
    if run:
        lines.append(f"  MLflow run: {run} in {uri}")
    logger.info("\n".join(lines))
