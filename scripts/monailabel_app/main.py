"""MONAI Label app serving the SAMPO bundle: interactive (click) segmentation and training on the datastore.

    monailabel start_server --app scripts/monailabel_app --studies <images folder> \
        --conf bundle <bundle folder> [--conf model_name sampo] [--conf skip_trainers true]

``bundle`` is a bundle folder with configs/ and models/model.pt (scripts/export.py), by default this repository, or
a version of the MLflow model registry, ``--conf bundle models:/<name>/<version> --conf mlflow_tracking_uri URI``
(bundle/registry.py): it is downloaded with MLflow's client into ``<registry_dir>/<name>/<version>`` (``--conf
registry_dir DIR``, default the app's ``model/`` folder) at every start and served from there; a name or version
the registry does not have stops the server with an error naming it and listing what exists.
The infer task is MONAI Label's ``BundleInferTask`` of type ``deepgrow``, so clients send foreground / background
clicks: ``POST /infer/sampo?image=<id>`` with params ``{"foreground": [[x, y], ...], "background": [...]}`` (2D) or
voxel clicks ``[[i, j, k], ...]`` (3D; all on one slice). Bad requests are answered with HTTP 4xx: 422 for
unusable clicks (none in the foreground, outside the image, malformed), 404 for an unknown model or image.
The train task is MONAI Label's ``BundleTrainTask`` on the bundle's configs/train.yaml, reading the datastore's
label masks (bundle/labeling.py). Training continues from the model being served (bundle/continued.py): the merged
models/model.pt becomes the run's SAM base (``<run>/served_start.pth``) under fresh LoRA adapters, so SAMPO's
reference policy is the served model; the request's ``pretrained: false`` starts from the train config's own
initialisation instead. When the run succeeds its export replaces the bundle's models/model.pt (and model.ts)
atomically, the previous files kept in ``<run>/served_before/``; the infer task reloads model.pt on its new
modification time, so the next click is answered by the new model without a restart (and the image-embedding cache
of bundle/predictor.py starts afresh). Each ``POST /train/sampo`` is a fresh run of its own: checkpoints and exports
in ``<train_dir>/<run>/models`` (``--conf train_dir DIR``, default ``<bundle>/monailabel_train``; never resuming the
command-line run), MLflow in ``<train_dir>/eval/mlflow.db``, the datastore's
labelled images only (no synthetic set) and the request's ``max_epochs`` (also the LR schedule's length and the
logged parameter). Nothing to train on (no labelled image, or none left for training after ``val_split``) is
answered 400, a bad ``max_epochs`` / ``val_split`` 422, each with the reason.

Human preference pairs (bundle/pair_store.py, bundle/human_pairs.py): every answered click on a datastore image (2D) records the proposed
mask and its clicks in ``<datastore>/sampo_pairs/``; ``PUT /datastore/label?image=<id>`` (tag final) freezes the
image's latest proposal as its pair (the answer says ``"human_pair": true``), a label for an image never answered
is a plain label (``false``). The train task's datalist gives each paired item its ``proposal`` (copied into
``<run>/human_pairs/``) and ``clicks``, and the training adds their DPO + SUP term (``human_pairs``,
``lambda_human`` in configs/train.yaml). A label that is not an image of its image's size is answered 422 before
anything is saved (the previous label and pair are kept). ``--conf registered_model_name NAME`` registers each
training's export as a new version of NAME in the run's MLflow store.

``/info`` offers as ``model_filename`` only the files in ``models/`` that load into the inference network (the
merged ``model.pt``); a training checkpoint (``best_model.pt``, ``checkpoint_epoch=N.pt``: LoRA weights of the
training network) asked for by name is answered 422 naming the files that load. An infer request whose
``params`` is JSON but not an object (e.g. ``[1, 2, 3]``) is answered 422, one with no image 400.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Dict

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

# the app's code (sampo_app/, one job a module): MONAI Label imports main.py with the app folder on sys.path only
# while it imports it, so these imports stay at module level (tests import exposure_warning, _listen_host from main)
from sampo_app.http_checks import (
    CheckedDatastore,
    _answer_invalid_json_with_422,
    _check_requests,
    _in_chain,
    _listen_host,
    check_infer_request,
    check_label,
    exposure_warning,
    infer_error,
    loadable_models,
)
from sampo_app.infers import SAMPOInferTask, freeze_pair, record_proposal
from sampo_app.trainers import SAMPOTrainTask

logger = logging.getLogger(__name__)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class SAMPOApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        # the bundle's Python package: this repository's (a bundle copy holds configs and models only); first on the
        # path, so that a folder named "bundle" in the working directory cannot shadow it
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        self.sampo_bundle = self._bundle_folder(conf.get("bundle") or REPO, app_dir, conf)
        if os.path.isfile(os.path.join(self.sampo_bundle, "bundle", "__init__.py")) and self.sampo_bundle not in sys.path:
            sys.path.insert(0, self.sampo_bundle)
        self.model_name = conf.get("model_name", "sampo")
        self.pair_store = None
        if not studies.startswith(("http://", "https://")):  # a local datastore: human preference pairs beside it
            from bundle.pair_store import STORE_DIR, PairStore

            self.pair_store = PairStore(os.path.join(studies, STORE_DIR))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAMPO promptable SAM",
            description="Segment Anything fine-tuned with SAMPO preference optimisation: clicks -> intended target",
            version="0.1.0",
        )

    @staticmethod
    def _bundle_folder(bundle: str, app_dir: str, conf) -> str:
        """``--conf bundle``: a folder, or ``models:/<name>/<version>`` fetched from the MLflow registry into
        ``<registry_dir>/<name>/<version>`` (bundle/registry.py)."""
        from bundle.registry import RegistryError, fetch_bundle, is_model_uri

        if not is_model_uri(bundle):
            return os.path.abspath(bundle)
        uri = conf.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or None
        root = os.path.abspath(conf.get("registry_dir") or os.path.join(app_dir, "model"))
        try:
            return fetch_bundle(bundle, root, uri)
        except RegistryError as e:
            logger.error("SAMPO: cannot serve --conf bundle %s: %s", bundle, e)
            raise

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return CheckedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def on_init_complete(self):
        super().on_init_complete()
        warning = exposure_warning(_listen_host(sys.argv), bool(settings.MONAI_LABEL_AUTH_ENABLE))
        if warning:
            logger.warning(warning)
        _answer_invalid_json_with_422()
        _check_requests(SAMPOApp, SAMPOTrainTask)

    def init_infers(self) -> Dict[str, InferTask]:
        from bundle.networks import CheckpointError

        try:  # configs/inference.yaml builds the network that models/model.pt records
            task = SAMPOInferTask(self.sampo_bundle, self.conf, type=InferType.DEEPGROW, load_strict=True)
            if task.is_valid():
                task.check_model()  # a model that cannot be served stops the server now, not at the first click
        except Exception as e:  # also raised inside the config's expressions (monai wraps those)
            cause = _in_chain(e, CheckpointError) or _in_chain(e, FileNotFoundError)
            if cause is None:
                raise
            logger.error("SAMPO: cannot serve the bundle %s: %s", self.sampo_bundle, cause)
            raise RuntimeError(f"SAMPO: cannot serve the bundle {self.sampo_bundle}: {cause}") from e
        if not task.is_valid():
            raise RuntimeError(f"{self.sampo_bundle}: not a usable bundle (configs/inference.yaml + models/model.pt)")
        offered = loadable_models(os.path.join(self.sampo_bundle, "models"), task.network)
        task._config["model_filename"] = sorted(offered, key=len)  # model.pt first, as MONAI Label sorts them
        return {self.model_name: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        train_dir = self.conf.get("train_dir") or os.path.join(self.sampo_bundle, "monailabel_train")
        task = SAMPOTrainTask(self.sampo_bundle, self.conf, train_dir, self.pair_store)
        return {self.model_name: task} if task.is_valid() else {}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        check_infer_request(self._infers, request, datastore or self.datastore())
        try:
            result = super().infer(request, datastore)
            self._record_proposal(request, result, datastore or self.datastore())
            return result
        except HTTPException:
            raise
        except Exception as e:
            answer = infer_error(e)
            if answer is None:
                raise
            raise answer from e

    # -- human preference pairs (bundle/human_pairs.py; sampo_app/infers.py) ---------------------------------------
    def _record_proposal(self, request, result, datastore) -> None:
        """Keep what the model answered to a datastore image's clicks (2D images); never fails the request."""
        record_proposal(self.pair_store, self.sampo_bundle, request, result, datastore)

    def check_label(self, image: str, upload) -> None:
        """``HTTPException`` 404 for an image not in the datastore, 422 for a mask that is not an image of the
        image's size (bundle/labeling.py); the upload is left readable from its start."""
        check_label(self.datastore(), image, upload)

    def freeze_pair(self, image: str) -> bool:
        """A final label of ``image`` was saved: freeze its latest proposal as its pair; whether it has one."""
        return freeze_pair(self.pair_store, image, self.datastore())
