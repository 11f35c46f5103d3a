"""At the end of training, register the exported bundle in the MLflow model registry (:mod:`bundle.registry`)."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

from bundle.registry import ARTIFACT_PATH, register_bundle

logger = logging.getLogger(__name__)


class RegisterBundle:
    """At the end of training, register the bundle that ``export_handler`` logged to the run as a new version of
    ``registered_model_name``, tagged with the validation Dice of the exported weights and the training run.

    Version tags: ``<key metric>`` (``val_mean_dice``: the best validation Dice, the checkpoint that was exported;
    ``none (no validation ran)`` otherwise), ``<key metric>_epoch``, ``training_run_id``, ``training_run_name``,
    ``model_size``, ``image_size``, ``task`` (from the exported architecture record). The version's source is ``runs:/<run id>/bundle``; serve it as
    ``models:/<name>/<version>`` (docs/deploy.md).

    Args:
        export_handler: the run's :class:`bundle.handlers.ExportBundle` (attached before this handler: both run at
            the end of training, the export first).
        registered_model_name: the registered model; ``None`` or empty: nothing is registered.
        tracking_uri: the MLflow tracking URI the run and its bundle are in (also the registry's).
        validator: the validation evaluator, whose best key metric is the exported checkpoint's.
        artifact_path: where the bundle is in the run.
    """

    def __init__(self, export_handler, registered_model_name: str | None = None, tracking_uri: str | None = None,
                 validator=None, artifact_path: str = ARTIFACT_PATH) -> None:
        self.export_handler, self.name, self.tracking_uri = export_handler, registered_model_name, tracking_uri
        self.validator, self.artifact_path = validator, artifact_path
        self.version = None
        if self.name and not tracking_uri:
            raise ValueError(f"registered_model_name {registered_model_name!r} needs an MLflow tracking_uri (the "
                             "registry is the tracking server's): set tracking_uri, or registered_model_name null")

    def attach(self, engine: Engine) -> None:
        if self.name:
            engine.add_event_handler(Events.COMPLETED, self)

    def tags(self) -> dict[str, str]:
        """The version's tags (see the class docstring)."""
        tags = {"training_run_id": str(self.export_handler.run_id)}
        state = getattr(self.validator, "state", None)
        key = getattr(state, "key_metric_name", None) or "val_mean_dice"
        if state is not None and getattr(state, "best_metric_epoch", -1) > 0:
            tags[key], tags[f"{key}_epoch"] = f"{float(state.best_metric):.6g}", str(state.best_metric_epoch)
        else:
            tags[key] = "none (no validation ran)"
        record = getattr(self.export_handler, "record", None) or {}
        for key in ("model_size", "image_size", "task"):
            if record.get(key) is not None:
                tags[key] = str(record[key])
        mlflow_handler = getattr(self.export_handler, "mlflow_handler", None)
        run = getattr(mlflow_handler, "cur_run", None)
        name = getattr(getattr(run, "info", None), "run_name", None) or getattr(mlflow_handler, "run_name", None)
        if name:
            tags["training_run_name"] = str(name)
        return tags

    def __call__(self, engine: Engine) -> None:
        run_id = getattr(self.export_handler, "run_id", None)
        if run_id is None:
            raise RuntimeError(f"RegisterBundle: the export logged no bundle to an MLflow run (tracking_uri "
                               f"{self.tracking_uri!r}), so nothing can be registered as '{self.name}'")
        tags = self.tags()
        self.version = register_bundle(self.tracking_uri, run_id, self.name, tags, self.artifact_path,
                                       description=f"SAMPO bundle of training run {run_id}")
        logger.info("Registered the bundle as models:/%s/%s (%s)", self.name, self.version.version,
                    ", ".join(f"{k} {v}" for k, v in tags.items()))
