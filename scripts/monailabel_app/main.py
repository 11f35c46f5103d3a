"""MONAI Label app serving the SAMPO bundle: interactive (click) segmentation and training on the datastore.

    monailabel start_server --app scripts/monailabel_app --studies <images folder> \
        --conf bundle <bundle folder> [--conf model_name sampo] [--conf skip_trainers true]

``bundle`` is a bundle folder with configs/ and models/model.pt (scripts/export.py), by default this repository.
The infer task is MONAI Label's ``BundleInferTask`` of type ``deepgrow``, so clients send foreground / background
clicks: ``POST /infer/sampo?image=<id>`` with params ``{"foreground": [[x, y], ...], "background": [...]}`` (2D) or
voxel clicks ``[[i, j, k], ...]`` (3D; all on one slice). Bad requests are answered with HTTP 4xx: 422 for
unusable clicks (none in the foreground, outside the image, malformed), 404 for an unknown model or image.
The train task is MONAI Label's ``BundleTrainTask`` on the bundle's configs/train.yaml, reading the datastore's
label masks (bundle/labeling.py); training starts from the config's own initialisation, not from the merged
models/model.pt.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _bad_input(exc: BaseException):
    """The bundle's PromptInputError (or another ValueError raised by the bundle's transforms) in ``exc``'s chain."""
    from bundle.inference import PromptInputError

    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, PromptInputError):
            return e
        e = e.__cause__ or e.__context__
    return None


class SAMPOTrainTask(BundleTrainTask):
    """``BundleTrainTask`` reading datastore masks as label maps; no warm start from the merged ``model.pt``."""

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # models/model.pt holds merged weights (lora_rank 0); the training network has adapters, so MONAI Label's
        # non-strict CheckpointLoader would silently load nothing. The train config initialises from SAM.
        logger.info("SAMPO: training starts from the train config's initialisation (not %s)", model_pytorch)

    def _update_overrides(self, overrides):
        from bundle.labeling import datastore_label_loader

        load = self.bundle_config.get("load")
        if isinstance(load, list):
            overrides["load"] = datastore_label_loader(load)


async def _invalid_json(request, exc):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=422, content={"detail": f"params is not valid JSON: {exc}"})


def _answer_invalid_json_with_422() -> None:
    """MONAI Label parses the ``params`` form field with ``json.loads`` in its endpoint; a JSONDecodeError there would
    be a 500. Register a handler on the running FastAPI app (its middleware stack is already built at startup)."""
    try:
        from monailabel.app import app as api
    except Exception:  # not running inside the server (e.g. the local app runner)
        return
    api.add_exception_handler(json.JSONDecodeError, _invalid_json)
    node = getattr(api, "middleware_stack", None)
    while node is not None:
        handlers = getattr(node, "_exception_handlers", None)
        if isinstance(handlers, dict):
            handlers[json.JSONDecodeError] = _invalid_json
        node = getattr(node, "app", None)


class SAMPOApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.sampo_bundle = os.path.abspath(conf.get("bundle") or REPO)
        # the bundle's Python package: this repository's (a bundle copy holds configs and models only); first on the
        # path, so that a folder named "bundle" in the working directory cannot shadow it
        for root in (REPO, self.sampo_bundle):
            if os.path.isfile(os.path.join(root, "bundle", "__init__.py")) and root not in sys.path:
                sys.path.insert(0, root)
        self.model_name = conf.get("model_name", "sampo")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAMPO promptable SAM",
            description="Segment Anything fine-tuned with SAMPO preference optimisation: clicks -> intended target",
            version="0.1.0",
        )

    def on_init_complete(self):
        super().on_init_complete()
        _answer_invalid_json_with_422()

    def init_infers(self) -> Dict[str, InferTask]:
        task = BundleInferTask(self.sampo_bundle, self.conf, type=InferType.DEEPGROW, load_strict=True)
        if not task.is_valid():
            raise RuntimeError(f"{self.sampo_bundle}: not a usable bundle (configs/inference.yaml + models/model.pt)")
        return {self.model_name: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        task = SAMPOTrainTask(self.sampo_bundle, self.conf)
        return {self.model_name: task} if task.is_valid() else {}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model '{model}'; available: {sorted(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"no image '{image}' in the datastore")
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except MONAILabelException as e:
            if e.error == MONAILabelError.INVALID_INPUT:
                raise HTTPException(status_code=422, detail=e.msg) from e
            bad = _bad_input(e)
            if bad is None:
                raise
            raise HTTPException(status_code=422, detail=str(bad)) from e
        except Exception as e:
            bad = _bad_input(e)
            if bad is None:
                raise
            raise HTTPException(status_code=422, detail=str(bad)) from e
