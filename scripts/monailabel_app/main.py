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

import json
import logging
import os
import pathlib
import sys
import time
from typing import Dict

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
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


def _in_chain(exc: BaseException, cls: type):
    """The first exception of type ``cls`` in ``exc``'s chain of causes, or None."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, cls):
            return e
        e = e.__cause__ or e.__context__
    return None


def _bad_input(exc: BaseException):
    """The bundle's PromptInputError (a bad click or image in the request) in ``exc``'s chain."""
    from bundle.clicks import PromptInputError

    return _in_chain(exc, PromptInputError)


def check_name(value, field: str) -> str:
    """``value``, an id, tag or file name that a request gives, if it can only name one entry of one folder;
    ``HTTPException`` 422 naming ``field`` otherwise: empty, a path separator (``/``, ``\\``), NUL or another
    control character, a leading ``.`` (``..``, a hidden file), or longer than 200 bytes."""
    problem = None
    if not isinstance(value, str) or not value:
        problem = "is empty"
    elif "/" in value or "\\" in value:
        problem = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "holds a control character (NUL, newline, ...)"
    elif value.startswith("."):
        problem = "starts with '.'"
    elif len(value.encode("utf-8", "surrogatepass")) > 200:
        problem = "is longer than 200 bytes"
    if problem:
        raise HTTPException(status_code=422, detail=f"{field} {value!r} {problem}: expected a plain name such as "
                                                    "'img0' (no folder, no '..')")
    return value


def check_file_name(name: str | None, field: str, patterns) -> str:
    """``name``, the file name of an upload, checked as :func:`check_name` and against the datastore's file
    ``patterns`` (``*.png``, ``*.nii.gz``, ...); ``""`` for an upload without a name."""
    import fnmatch

    if not name:
        return ""
    check_name(name, f"{field} file name")
    if patterns and not any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns):
        raise HTTPException(status_code=422, detail=f"{field} file name {name!r} is not one of the datastore's file "
                                                    f"types {list(patterns)}")
    return name


class CheckedDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` with every id and tag a request gives checked (:func:`check_name`) before a
    file is opened or written, and an unknown image or label answered 404. ``LocalDatastore`` itself joins the
    request's id onto its folder, so ``../../x`` or an absolute id would write outside it (docs/deploy.md)."""

    def _known(self, image_id: str, field: str = "image") -> str:
        check_name(image_id, field)
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"no image '{image_id}' in the datastore")
        return image_id

    def _label(self, label_id: str, tag: str) -> None:
        check_name(label_id, "label")
        check_name(tag, "tag")
        if not self._datastore.label(label_id, tag):
            raise HTTPException(status_code=404, detail=f"no label '{label_id}' with tag '{tag}' in the datastore")

    def add_image(self, image_id, image_filename, image_info):
        name = os.path.basename(image_filename)
        check_name(image_id or self._to_id(name)[0], "image")
        check_file_name(name, "image", self._extensions)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        self._known(image_id)
        check_name(label_tag, "tag")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id):
        return super().remove_image(self._known(image_id, "id"))

    def remove_label(self, label_id, label_tag):
        self._label(label_id, label_tag)
        return super().remove_label(label_id, label_tag)

    def get_image_uri(self, image_id):
        return super().get_image_uri(image_id if image_id in self._datastore.objects else check_name(image_id, "image"))

    def get_image_info(self, image_id):
        return super().get_image_info(self._known(image_id))

    def update_image_info(self, image_id, info):
        return super().update_image_info(self._known(image_id), info)

    def get_label_uri(self, label_id, label_tag):
        if not self._datastore.label(label_id, label_tag):
            check_name(label_id, "label")
            check_name(label_tag, "tag")
        return super().get_label_uri(label_id, label_tag)

    def get_label_info(self, label_id, label_tag):
        self._label(label_id, label_tag)
        return super().get_label_info(label_id, label_tag)

    def update_label_info(self, label_id, label_tag, info):
        self._label(label_id, label_tag)
        return super().update_label_info(label_id, label_tag, info)


def exposure_warning(host: str | None, auth: bool) -> str | None:
    """The warning for a server that listens on ``host`` (None: unknown) without MONAI Label's authentication
    (``auth``) on an address other than loopback, or None."""
    import ipaddress

    if auth or host is None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to any interface
        pass
    return (f"SAMPO: the server listens on {host} without authentication (MONAI_LABEL_AUTH_ENABLE is false): anyone "
            "who can reach the port can read and write the datastore and start trainings. Listen on 127.0.0.1 "
            "behind a reverse proxy that authenticates, or enable MONAI Label's authentication (docs/deploy.md)")


def _listen_host(argv) -> str | None:
    """The ``--host`` / ``-i`` of ``monailabel start_server`` in ``argv`` (its default 0.0.0.0), else None."""
    for i, a in enumerate(argv):
        if a in ("-i", "--host") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--host="):
            return a.split("=", 1)[1]
    return "0.0.0.0" if "start_server" in argv else None


class SAMPOTrainTask(BundleTrainTask):
    """``BundleTrainTask`` reading datastore masks as label maps, each request a fresh run in its own folder.

    Args:
        path: the bundle folder (configs/train.yaml).
        conf: the app's ``--conf`` values.
        train_dir: where each request's run folder goes (never the bundle's ``models/``).
    """

    def __init__(self, path, conf, train_dir: str, pair_store=None):
        super().__init__(path, conf)
        self.train_dir = os.path.abspath(train_dir)
        self.pair_store = pair_store  # bundle.pair_store.PairStore of the datastore (None: no human pairs)
        self._run = {}

    def config(self):
        options = super().config()
        # training continues from the served models/model.pt (pretrained: true) or the train config's initialisation
        options.pop("model_filename", None)
        return options

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # models/model.pt holds merged weights (lora_rank 0); the training network has adapters, so MONAI Label's
        # non-strict CheckpointLoader would silently load nothing: the served weights become the run's SAM base
        # instead (_update_overrides, bundle/continued.py)
        if isinstance(pretrained, str):
            pretrained = strtobool(pretrained)
        self._run["start"] = model_pytorch if pretrained and os.path.isfile(model_pytorch) else None
        logger.info("SAMPO: training starts from %s", self._run["start"] or "the train config's initialisation")

    def check_request(self, request, datastore) -> tuple[int, int]:
        """(training, validation) item counts of ``request`` on ``datastore``; ``HTTPException`` 422 for a bad
        ``max_epochs`` / ``val_split``, 400 when there is nothing to train on."""
        wanted = _first(request.get("model_filename"))
        if wanted is not None and check_name(wanted, "model_filename") != "model.pt":
            raise HTTPException(status_code=422, detail=f"model_filename {wanted!r}: training continues from the "
                                                        "served models/model.pt ('model.pt', or leave it out)")
        epochs = request.get("max_epochs", 50)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise HTTPException(status_code=422, detail=f"max_epochs must be an integer >= 1, got {epochs!r}")
        split = request.get("val_split", 0.2)
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not split < 1:
            raise HTTPException(
                status_code=422, detail=f"val_split must be a number < 1 (0: no validation), got {split!r}"
            )
        n = len([d for d in datastore.datalist() if d])
        if n == 0:
            raise HTTPException(
                status_code=400,
                detail="nothing to train on: no image in the datastore has a final label (save labels with "
                "PUT /datastore/label?image=<id>&tag=final first)",
            )
        n_val = int(round(n * split)) if split > 0 else 0  # monai.data.partition_dataset's rounding
        n_val = min(n_val, n) if split > 0 else 0
        if n - n_val < 1:
            raise HTTPException(
                status_code=400,
                detail=f"nothing to train on: {n} labelled image(s) and val_split {split} leave none for training",
            )
        return n - n_val, n_val

    def __call__(self, request, datastore):
        self.check_request(request, datastore)
        name = time.strftime("train_%Y%m%d_%H%M%S")
        run_dir = os.path.join(self.train_dir, name)
        for k in range(1, 1000):  # two requests in one second get two folders
            if not os.path.exists(run_dir):
                break
            run_dir = os.path.join(self.train_dir, f"{name}_{k}")
        self._run = {"dir": run_dir, "max_epochs": request.get("max_epochs", 50), "datastore": datastore}
        result = super().__call__(request, datastore)
        logger.info("SAMPO: training run written to %s", run_dir)
        served = None
        if self._run.get("start"):
            from bundle.continued import publish

            served = publish(os.path.join(run_dir, "models"), os.path.dirname(self._run["start"]),
                             os.path.join(run_dir, "served_before"))
        return {**(result or {}), "output": run_dir, "served": served}

    def _fetch_datalist(self, request, datastore):
        """The datastore's labelled images; where the image has a frozen human pair, its ``proposal`` (copied into
        the run folder) and ``clicks`` (bundle/pair_store.py)."""
        items = super()._fetch_datalist(request, datastore)
        if self.pair_store is None or not _flag(self.bundle_config.get_parsed_content("human_pairs", default=False)):
            return items
        from bundle.pair_store import attach_pairs

        ids = {os.path.realpath(datastore.get_image_uri(i)): i for i in datastore.list_images()}
        image_ids = [ids.get(os.path.realpath(item["image"]), "") for item in items]
        return attach_pairs(items, image_ids, self.pair_store,
                            os.path.join(self._run.get("dir", self.train_dir), "human_pairs"))

    def _update_overrides(self, overrides):
        from bundle.labeling import datastore_label_loader

        load = self.bundle_config.get("load")
        if isinstance(load, list):
            overrides["load"] = datastore_label_loader(load)
        run = self._run
        datastore = run.get("datastore")
        if run.get("start"):
            from bundle.continued import served_as_base

            size = self.bundle_config.get_parsed_content("model_size")
            image_size = self.bundle_config.get_parsed_content("image_size")
            overrides["sam_checkpoint"] = served_as_base(
                run["start"], os.path.join(run.get("dir", self.train_dir), "served_start.pth"), size, image_size
            )
        overrides.update({
            # the request's epochs everywhere they are used: trainer, LR schedule, the logged hyperparameter
            "max_epochs": run.get("max_epochs", overrides.get(self.const.key_train_trainer_max_epochs())),
            # a run of its own: never the bundle's models/, never resuming another run's state
            "ckpt_dir": os.path.join(run.get("dir", self.train_dir), "models"),
            "output_dir": os.path.join(self.train_dir, "eval"),
            "resume_from": "$None",  # (a None override would be dropped by monai.bundle.run)
            # what the run trains on (train#dataset#data holds the items); no synthetic set is generated
            "datalist": f"MONAI Label datastore {getattr(datastore, '_datastore_path', '')}".strip(),
        })  # fmt: skip
        if self.conf.get("registered_model_name"):  # each training's export a new registry version
            overrides["registered_model_name"] = self.conf["registered_model_name"]
        return overrides


class SAMPOInferTask(BundleInferTask):
    """``BundleInferTask`` whose model file, when torch cannot load it into the network, is explained by the
    bundle's loader (:class:`bundle.networks.CheckpointError` naming the file and what does not fit) instead of
    torch's ``Error(s) in loading state_dict``."""

    def check_model(self, path: str | None = None) -> None:
        """Raise ``CheckpointError`` / ``FileNotFoundError`` naming the cause if ``path`` (default: the served
        ``models/model.pt``) does not load into the network (the server checks this at start)."""
        import copy

        from bundle.checkpoints import load_weights

        load_weights(copy.deepcopy(self.network).cpu(), path or self.get_path())

    def _get_network(self, device, data):
        try:
            return super()._get_network(device, data)
        except RuntimeError as e:
            self.check_model()  # raises naming the cause where torch's message does not
            raise e


def _model_error(exc: BaseException):
    """The bundle's CheckpointError in ``exc``'s chain (a served model that cannot be loaded)."""
    from bundle.networks import CheckpointError

    return _in_chain(exc, CheckpointError)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _flag(value) -> bool:
    return strtobool(value) if isinstance(value, str) else bool(value)


def loadable_models(folder: str, network) -> list[str]:
    """Files ``*.pt`` in ``folder`` that load strictly into ``network`` (merged exports; not training states)."""
    from bundle.checkpoints import check_state_dict, read_state_dict

    names = []
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []:
        try:
            check_state_dict(read_state_dict(os.path.join(folder, name)), network, name)
        except Exception as e:  # a training checkpoint (LoRA keys), another size, an unreadable file
            logger.info("SAMPO: models/%s is not offered for inference: %s", name, str(e).split(";")[0])
            continue
        names.append(name)
    return names


async def _invalid_json(request, exc):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=422, content={"detail": f"params is not valid JSON: {exc}"})


def _checked_inference(run_inference):
    """MONAI Label's ``run_inference`` with the request checked first: 422 for ``params`` that is not a JSON object,
    400 for a request without an image (MONAI Label answers both with 500)."""

    def run(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
        try:
            p = json.loads(params) if isinstance(params, str) and params else {}
        except json.JSONDecodeError as e:
            raise HTTPException(status_code=422, detail=f"params is not valid JSON: {e}") from e
        if not isinstance(p, dict):
            raise HTTPException(
                status_code=422,
                detail=f"params must be a JSON object such as {{\"foreground\": [[x, y]]}}, got {type(p).__name__}",
            )
        if not file and not image and not session_id:
            raise HTTPException(
                status_code=400, detail="no image: give ?image=<datastore image id> or upload the image as 'file'"
            )
        _check_fields(image=image, session_id=session_id)  # before the upload is written to a temporary file
        patterns = _datastore_patterns()
        check_file_name(getattr(file, "filename", None), "file", patterns)
        check_file_name(getattr(label, "filename", None), "label", patterns)
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)

    run.__wrapped__ = run_inference
    return run


def _check_fields(**fields) -> None:
    """:func:`check_name` on each given (non-None, non-empty) request field."""
    for field, value in fields.items():
        if value:
            check_name(value, field)


def _datastore_patterns() -> list:
    """The file patterns the served datastore holds (``--conf`` / MONAI_LABEL_DATASTORE_FILE_EXT)."""
    from monailabel.interfaces.utils.app import app_instance

    return list(getattr(app_instance().datastore(), "_extensions", None) or settings.MONAI_LABEL_DATASTORE_FILE_EXT)


def _checked_image_add(add_image):
    """MONAI Label's ``add_image`` (``PUT /datastore/image``) with the image id and the upload's file name checked
    before the upload is written anywhere (the datastore checks again, :class:`CheckedDatastore`)."""

    def run(background_tasks, image=None, params="{}", file=None, user=None):
        if image is not None:
            check_name(image, "image")
        name = check_file_name(getattr(file, "filename", None), "file", _datastore_patterns())
        if image is None and name:  # the id MONAI Label takes from the file name
            check_name(name.replace("".join(pathlib.PurePath(name).suffixes), ""), "image")
        return add_image(background_tasks, image, params, file, user)

    run.__wrapped__ = add_image
    return run


def _training_busy(enqueue: bool) -> None:
    """409 while a background training runs (MONAI Label's own answer is 429 for a background request, and a
    ``run_sync`` request would train beside it); ``enqueue=true`` still queues. A ``run_sync`` training needs no
    check: MONAI Label's endpoint is ``async`` and runs it on the event loop, so the server answers nothing else
    until it ends."""
    from monailabel.utils.async_tasks.utils import processes

    if processes("train") and not enqueue:
        raise HTTPException(status_code=409, detail="a training is running on this server: wait for it to end "
                            "(GET /train/ shows it), stop it (DELETE /train/), or send enqueue=true to queue this one")


def _checked_training(run_model):
    """MONAI Label's ``run_model`` (``POST /train/{model}``) with the request checked before a background run
    starts, so that nothing to train on is a 4xx answer, not a failed background task, and one training at a time
    (409 while one runs)."""

    def run(model, params=None, run_sync=False, enqueue=False):
        from monailabel.interfaces.utils.app import app_instance

        instance = app_instance()
        task = getattr(instance, "_trainers", {}).get(model)
        if isinstance(task, SAMPOTrainTask):
            request = {**instance.info().get("config", {}).get("train", {}), **(params or {})}
            task.check_request(request, instance.datastore())
        _training_busy(enqueue)
        return run_model(model, params, run_sync, enqueue)

    run.__wrapped__ = run_model
    return run


def _checked_label_save(save_label):
    """MONAI Label's ``save_label`` (``PUT /datastore/label``): the mask checked against its image first (404 for an
    unknown image, 422 for a mask that is not an image of the image's size: nothing is saved), and, for a final
    label, the image's latest proposal frozen as its human preference pair (bundle/pair_store.py)."""

    def run(background_tasks, image, params="{}", tag="final", label=None, user=None):
        from monailabel.interfaces.utils.app import app_instance

        check_name(image, "image")
        if tag:
            check_name(tag, "tag")
        check_file_name(getattr(label, "filename", None), "label", _datastore_patterns())
        instance = app_instance()
        sampo = isinstance(instance, SAMPOApp)
        if sampo:
            instance.check_label(image, label)
        res = save_label(background_tasks, image, params, tag, label, user)
        if sampo and (tag or "final") == "final":
            res = {**(res or {}), "human_pair": instance.freeze_pair(image)}
        return res

    run.__wrapped__ = save_label
    return run


def _check_requests() -> None:
    """Route MONAI Label's infer, train and label-save endpoints through the checks above (the endpoints look these
    functions up in their modules at call time)."""
    import monailabel.endpoints.datastore as datastore_endpoint
    import monailabel.endpoints.infer as infer_endpoint
    import monailabel.endpoints.train as train_endpoint

    if not hasattr(infer_endpoint.run_inference, "__wrapped__"):
        infer_endpoint.run_inference = _checked_inference(infer_endpoint.run_inference)
    if not hasattr(train_endpoint.run_model, "__wrapped__"):
        train_endpoint.run_model = _checked_training(train_endpoint.run_model)
    if not hasattr(datastore_endpoint.save_label, "__wrapped__"):
        datastore_endpoint.save_label = _checked_label_save(datastore_endpoint.save_label)
    if not hasattr(datastore_endpoint.add_image, "__wrapped__"):
        datastore_endpoint.add_image = _checked_image_add(datastore_endpoint.add_image)


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
        _check_requests()

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
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model '{model}'; available: {sorted(self._infers)}")
        wanted = _first(request.get("model_filename"))
        offered = self._infers[model].config().get("model_filename") or []
        if wanted and wanted not in offered:
            raise HTTPException(
                status_code=422,
                detail=f"model_filename '{wanted}' cannot be used for inference (a training checkpoint, or not in "
                f"models/); files that load: {offered}",
            )
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"no image '{image}' in the datastore")
        try:
            result = super().infer(request, datastore)
            self._record_proposal(request, result, datastore or self.datastore())
            return result
        except HTTPException:
            raise
        except Exception as e:
            if isinstance(e, MONAILabelException) and e.error == MONAILabelError.INVALID_INPUT:
                raise HTTPException(status_code=422, detail=e.msg) from e
            broken = _model_error(e)
            if broken is not None:  # the served model file was replaced by one that does not load
                raise HTTPException(status_code=500, detail=f"the served model cannot be loaded: {broken}") from e
            bad = _bad_input(e)
            if bad is None:
                raise
            raise HTTPException(status_code=422, detail=str(bad)) from e

    # -- human preference pairs (bundle/human_pairs.py) ------------------------------------------------------------
    def _record_proposal(self, request, result, datastore) -> None:
        """Keep what the model answered to a datastore image's clicks (2D images); never fails the request."""
        image = request.get("image")
        path = (result or {}).get("file")
        if self.pair_store is None or not isinstance(image, str) or os.path.exists(image) or not path:
            return  # an uploaded file, not a datastore image: nothing to pair a saved label with
        try:
            import numpy as np
            from PIL import Image

            from bundle.clicks import check_click_list
            from bundle.labeling import is_2d_image

            uri = datastore.get_image_uri(image)
            if not (is_2d_image(uri) and is_2d_image(path)):
                return
            with Image.open(path) as im:
                mask = np.asarray(im)
            with Image.open(uri) as im:
                size = (im.size[1], im.size[0])
            if mask.shape[:2] != size:
                logger.warning("SAMPO: answer for %s has size %s, its image %s: not kept as a proposal", image,
                               mask.shape, size)
                return
            model = os.path.join(self.sampo_bundle, "models", _first(request.get("model_filename")) or "model.pt")
            self.pair_store.record_proposal(
                image, uri, mask if mask.ndim == 2 else mask[..., 0],
                check_click_list(request.get("foreground"), "foreground"),
                check_click_list(request.get("background"), "background"),
                model=f"{model} (modified {time.ctime(os.path.getmtime(model))})" if os.path.isfile(model) else model)
        except Exception as e:  # the annotator got the answer; only its pairing is lost
            logger.warning("SAMPO: the answer for image %s was not kept as a proposal: %s", image, e)

    def check_label(self, image: str, upload) -> None:
        """``HTTPException`` 404 for an image not in the datastore, 422 for a mask that is not an image of the
        image's size (bundle/labeling.py); the upload is left readable from its start."""
        from bundle.labeling import check_mask_upload, is_2d_image

        uri = self.datastore().get_image_uri(image) if image else ""
        if not uri:
            raise HTTPException(status_code=404, detail=f"no image '{image}' in the datastore: add it first "
                                                        "(PUT /datastore/image)")
        if upload is None or not is_2d_image(uri):
            return
        data = upload.file.read()
        upload.file.seek(0)
        try:
            check_mask_upload(data, uri, upload.filename or "upload", image)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    def freeze_pair(self, image: str) -> bool:
        """A final label of ``image`` was saved: freeze its latest proposal as its pair; whether it has one."""
        if self.pair_store is None:
            return False
        try:
            return self.pair_store.freeze(image, self.datastore().get_image_uri(image)) is not None
        except Exception as e:  # the label is saved; it trains as a plain label
            logger.warning("SAMPO: label of %s saved, but its human pair was not stored: %s", image, e)
            return False
