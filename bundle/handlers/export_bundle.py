"""At the end of training, export ``model.pt`` / ``model.ts`` (:mod:`bundle.export`) and log them with the bundle's
configs to the training's MLflow run."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time

from ignite.engine import Events

from bundle.checkpoints import load_weights
from bundle.export import ARTIFACT_PATH, bundle_configs, export_bundle, export_record
from bundle.networks import PromptableSAM

logger = logging.getLogger(__name__)


class ExportBundle:
    """At the end of training, export ``model.pt`` / ``model.ts`` and log them with the bundle's configs to MLflow.

    The MLflow artifacts (under ``artifact_path``) form a bundle folder::

        bundle/models/model.pt, bundle/models/model.ts, bundle/configs/metadata.json, bundle/configs/inference.yaml

    Args:
        output_dir: where ``model.pt`` and ``model.ts`` are written (e.g. the bundle's ``models/``).
        bundle_root: bundle whose ``configs/metadata.json`` and ``configs/inference.yaml`` go with the model.
        network: the training network (default: the engine's ``network``).
        checkpoint: export this checkpoint (e.g. ``best_model.pt`` by validation Dice) instead of the final weights
            when it exists at the end of training.
        tracking_uri: MLflow tracking URI; ``None`` or empty skips the logging.
        mlflow_handler: the trainer's ``MLFlowHandler``; its run gets the artifacts (even after it closed the run).
        experiment_name, run_name: find the run by name when no ``mlflow_handler`` is given.
        artifact_path: folder of the artifacts in the run.
        verify: check merged, eager and TorchScript outputs against each other.
        resume_from: the training state this run resumed from, if any: ``checkpoint`` written before the resume is
            then this run's best and is exported (otherwise only a ``checkpoint`` written by this process is).
        task: the task trained, recorded in ``model.pt`` with the architecture (:func:`bundle.export.export_record`).
    """

    def __init__(
        self,
        output_dir: str,
        bundle_root: str = ".",
        network: PromptableSAM | None = None,
        checkpoint: str | None = None,
        tracking_uri: str | None = None,
        mlflow_handler=None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        artifact_path: str = ARTIFACT_PATH,
        verify: bool = True,
        resume_from: str | None = None,
        task: str | None = None,
    ) -> None:
        self.resume_from, self.task = resume_from, task
        self.output_dir, self.bundle_root, self.network, self.checkpoint = output_dir, bundle_root, network, checkpoint
        self.tracking_uri, self.mlflow_handler = tracking_uri, mlflow_handler
        self.experiment_name, self.run_name, self.artifact_path, self.verify = experiment_name, run_name, artifact_path, verify
        self.run_id: str | None = None
        self.exported: dict[str, str] = {}
        self.record: dict = {}

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine) -> None:
        self._start_time = time.time()
        run = getattr(self.mlflow_handler, "cur_run", None)
        if run is not None:
            self.run_id = run.info.run_id

    def _network(self, engine) -> PromptableSAM:
        net = self.network if self.network is not None else getattr(engine, "network", None)
        if net is None:
            raise ValueError("ExportBundle: no network given and the engine has none")
        # the checkpoint only if this training wrote it, or the run it resumed (a stale one is not exported)
        fresh = self.checkpoint and os.path.isfile(self.checkpoint)
        fresh = fresh and (
            bool(self.resume_from) or os.path.getmtime(self.checkpoint) >= getattr(self, "_start_time", 0.0) - 1.0
        )
        if fresh:
            twin = load_weights(copy.deepcopy(net).cpu(), self.checkpoint)
            logger.info("ExportBundle: exporting %s", self.checkpoint)
            return twin
        return net

    def __call__(self, engine) -> None:
        net = self._network(engine)
        was_training = net.training
        try:
            self.exported = export_bundle(net, self.output_dir, self.bundle_root, verify=self.verify, task=self.task)
            self.record = export_record(net, self.task)
        finally:
            net.train(was_training)
        logger.info("Exported the bundle models: %s, %s", self.exported["model.pt"], self.exported["model.ts"])
        if self.tracking_uri:
            self.log_artifacts()

    def _find_run_id(self, client) -> str | None:
        if self.run_id is None and self.mlflow_handler is not None:
            run = getattr(self.mlflow_handler, "cur_run", None)
            self.run_id = run.info.run_id if run is not None else None
        if self.run_id is None and self.experiment_name and self.run_name:
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is not None:
                runs = client.search_runs(
                    [exp.experiment_id], filter_string=f"tags.mlflow.runName = '{self.run_name}'",
                    order_by=["attributes.start_time DESC"], max_results=1,
                )
                self.run_id = runs[0].info.run_id if runs else None
        return self.run_id

    def log_artifacts(self) -> str:
        """Log the exported files to the MLflow run as a bundle folder; return the run id."""
        from mlflow.tracking import MlflowClient
        from monai.bundle import ConfigParser

        client = MlflowClient(tracking_uri=self.tracking_uri)
        run_id = self._find_run_id(client)
        if run_id is None:
            raise RuntimeError(
                f"ExportBundle: no MLflow run to log to at {self.tracking_uri} (give mlflow_handler, or "
                f"experiment_name and run_name)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            root = os.path.join(tmp, "bundle")
            os.makedirs(os.path.join(root, "models"))
            os.makedirs(os.path.join(root, "configs"))
            for name in ("model.pt", "model.ts"):
                shutil.copy2(self.exported[name], os.path.join(root, "models", name))
            meta, infer = bundle_configs(self.bundle_root, self.record["model_size"], self.record["image_size"],
                                         record=self.record)
            ConfigParser.export_config_file(meta, os.path.join(root, "configs", "metadata.json"), fmt="json", indent=4)
            ConfigParser.export_config_file(
                infer, os.path.join(root, "configs", "inference.yaml"), fmt="yaml", sort_keys=False
            )
            client.log_artifacts(run_id, root, artifact_path=self.artifact_path)
        logger.info("Logged the bundle to MLflow run %s under '%s/'", run_id, self.artifact_path)
        return run_id
