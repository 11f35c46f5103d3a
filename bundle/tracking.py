"""MLflow tracking helpers for the bundle configs: where runs go, what they are called, what they record."""

from __future__ import annotations

import copy
import inspect
import os
import time
from pathlib import Path

from monai.bundle import ConfigParser


def sqlite_uri(path: str) -> str:
    """``sqlite:///`` URI of a database file (MLflow 3 has no file-store backend)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return "sqlite:///" + os.path.abspath(path)


def experiment_id(client, name: str) -> str:
    """Id of MLflow experiment ``name``, created if needed; with a sqlite store its artifacts go to ``mlruns/``
    beside the database (as MONAI's ``MLFlowHandler`` does), never to the current directory."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(os.path.dirname(uri[len("sqlite:///") :]), "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def run_name(output_dir: str, resuming: bool, prefix: str = "sampo") -> str:
    """A new ``{prefix}_YYYYmmdd_HHMMSS`` name, or the name of the run being resumed.

    The name is kept in ``output_dir/run_name.txt``; when training resumes from a saved state the same MLflow run
    (MONAI's ``MLFlowHandler`` reopens an unfinished run of that name) goes on.
    """
    path = os.path.join(output_dir, "run_name.txt")
    if resuming and os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    name = f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}"
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(name)
    return name


def executed_config() -> dict:
    """The raw config being executed (all config files merged, command-line overrides applied).

    Called from a ``$`` expression in a bundle config; it finds the ``ConfigParser`` that evaluates it.
    """
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return copy.deepcopy(owner.get())
        frame = frame.f_back
    raise RuntimeError("executed_config() must be evaluated by a monai.bundle.ConfigParser")


def save_executed_config(path: str) -> str:
    """Write :func:`executed_config` to ``path`` (YAML or JSON by suffix) and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ConfigParser.export_config_file(executed_config(), path, fmt="yaml" if path.endswith((".yaml", ".yml")) else "json")
    return path


def flatten_params(params: dict, prefix: str = "") -> dict:
    """Nested hyperparameters -> flat ``{"a.b": value}`` for ``mlflow.log_params``."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat
