"""The MLflow model registry: a training run's exported bundle as a registered model version, and back to a folder.

* :func:`register_bundle`: the bundle folder a training run logged under ``bundle/``
  (:class:`bundle.handlers.ExportBundle`: ``models/model.pt``, ``models/model.ts``, ``configs/metadata.json``,
  ``configs/inference.yaml``) becomes a new version of the registered model ``name`` (created if needed), with
  source ``runs:/<run id>/bundle`` and the given tags (:class:`bundle.handlers.RegisterBundle` tags the validation
  Dice and the training run).
* :func:`fetch_bundle`: ``models:/<name>/<version>`` (or ``models:/<name>/latest``, ``models:/<name>@<alias>``) ->
  a local bundle folder ``<root>/<name>/<version>`` with ``configs/`` and ``models/``, downloaded with
  ``MlflowClient`` (so it works with any MLflow client that has the registry, whatever the server's version); what
  MONAI Label (``--conf bundle models:/...``) and the MONAI Deploy app (``-m models:/...``) serve. Each fetch
  replaces ``configs/`` and ``models/`` of that folder as a whole (the previous ones kept until the download is
  complete), so a folder always holds the registered files of its version.
* :class:`RegistryError`: a malformed URI, a registered model or version that does not exist, a version whose files
  are not a bundle; the message names it, lists what the registry has and says how to fix it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from typing import Mapping

from bundle.io import save_json

logger = logging.getLogger(__name__)

ARTIFACT_PATH = "bundle"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


class RegistryError(LookupError):
    """A ``models:/`` reference that cannot be served (the message says which part and what exists)."""


def is_model_uri(value) -> bool:
    """Whether ``value`` is an MLflow registry reference ``models:/...``."""
    return isinstance(value, str) and value.startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` -> (name, version, None); ``models:/<name>@<alias>`` -> (name, None, alias);
    ``RegistryError`` for anything else. ``version`` is a number or ``latest``."""
    m = _URI.match(uri or "")
    if not m or (m["version"] is not None and m["version"] != "latest" and not m["version"].isdigit()):
        raise RegistryError(f"{uri!r} is not an MLflow registry reference: expected models:/<name>/<version> (a "
                            f"number or 'latest') or models:/<name>@<alias>, e.g. models:/sampo/1")
    return m["name"], m["version"], m["alias"]


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower()


def register_bundle(tracking_uri: str, run_id: str, name: str, tags: Mapping[str, str] | None = None,
                    artifact_path: str = ARTIFACT_PATH, description: str = ""):
    """Register the bundle run ``run_id`` logged under ``artifact_path`` as a new version of ``name``; return the
    MLflow ``ModelVersion``. ``RegistryError`` when the run holds no bundle there."""
    from mlflow.exceptions import MlflowException

    if not isinstance(name, str) or not name.strip() or "/" in name or "@" in name:
        raise RegistryError(f"registered_model_name must be a name without '/' or '@' (e.g. sampo), got {name!r}")
    client = _client(tracking_uri)
    listed = {os.path.basename(a.path) for a in client.list_artifacts(run_id, artifact_path)}
    if not {"models", "configs"} <= listed:
        raise RegistryError(f"MLflow run {run_id} at {tracking_uri} has no bundle under '{artifact_path}/' (found "
                            f"{sorted(listed)}): the export (bundle.handlers.ExportBundle) must log it first")
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        client.create_registered_model(name, description="SAMPO bundles (configs/ + models/model.pt, model.ts)")
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          tags={k: str(v) for k, v in (tags or {}).items()},
                                          description=description or None)
    logger.info("registered the bundle of MLflow run %s as models:/%s/%s (tags %s)", run_id, name, version.version,
                dict(tags or {}))
    return version


def resolve_version(uri: str, tracking_uri: str | None = None):
    """The registered ``ModelVersion`` a ``models:/`` reference names; ``RegistryError`` naming what is missing."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    client = _client(tracking_uri)
    where = f"the MLflow registry at {tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'the default URI'}"
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"{uri}: no registered model '{name}' in {where} (registered models: {names}); train "
                            f"with --registered_model_name {name} to register one, or check the name") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            if not versions:
                raise RegistryError(f"{uri}: registered model '{name}' in {where} has no version yet")
            version = str(versions[-1])
        return client.get_model_version(name, version)
    except MlflowException as e:
        if not _not_found(e):
            raise
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise RegistryError(f"{uri}: registered model '{name}' in {where} has no {what} (versions: {versions})") \
            from None


def fetch_bundle(uri: str, root: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """Download the bundle of ``models:/...`` ``uri`` into ``<root>/<name>/<version>`` and return that folder.

    The files come from the version's source with ``MlflowClient`` (``runs:/<run>/<path>``: the run's artifacts);
    ``configs/`` and ``models/`` of the folder are replaced once the download is complete, and ``registry.json``
    records what was fetched (URI, version, run, tags). ``RegistryError`` for an unknown name / version or a
    version without ``configs/inference.yaml`` and ``models/model.pt``.
    """
    version = resolve_version(uri, tracking_uri)
    name = version.name
    dest = os.path.join(os.fspath(root), name, str(version.version))
    os.makedirs(dest, exist_ok=True)
    client = _client(tracking_uri)
    staging = tempfile.mkdtemp(prefix=".fetch-", dir=dest)
    try:
        source = version.source or ""
        if source.startswith("runs:/"):
            run_id, _, path = source[len("runs:/"):].partition("/")
            local = client.download_artifacts(run_id, path, staging)
        else:
            import mlflow

            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=staging,
                                                        tracking_uri=tracking_uri)
        missing = [f for f in ("configs/inference.yaml", "models/model.pt")
                   if not os.path.isfile(os.path.join(local, f))]
        if missing:
            raise RegistryError(f"{uri} (version {version.version}, source {source}) is not a bundle: it lacks "
                                f"{missing}; register the 'bundle/' folder that training logs")
        for part in ("configs", "models"):
            old = os.path.join(dest, part)
            if os.path.exists(old):
                os.replace(old, os.path.join(staging, f"previous_{part}"))
            os.replace(os.path.join(local, part), old)
        save_json({"uri": uri, "name": name, "version": str(version.version), "run_id": version.run_id,
                   "source": source, "tags": dict(version.tags or {}), "tracking_uri": tracking_uri,
                   "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}, os.path.join(dest, "registry.json"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("fetched %s (version %s of '%s', run %s) into %s", uri, version.version, name, version.run_id, dest)
    return dest
