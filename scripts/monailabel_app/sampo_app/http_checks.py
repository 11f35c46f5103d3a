"""HTTP request checks of the SAMPO MONAI Label app: every id, tag, file name, ``params`` and model file a request
gives is checked, and a bad request answered 4xx (422 naming the field, 404 for an unknown model or image, 400 for
nothing to work on, 409 while a training runs) before anything is read, written or run.

What MONAI Label offers a hook for is used as such: :class:`CheckedDatastore` is the app's datastore
(``MONAILabelApp.init_datastore``), and ``SAMPOApp.infer`` checks a request (:func:`check_infer_request`) and turns
the bundle's errors into answers (:func:`infer_error`). MONAI Label has no hook that runs before its endpoint
functions parse ``params`` and write an upload to a temporary file, nor one that can refuse a label before it is
saved (``on_save_label`` runs after ``datastore().save_label``), nor one before a training is started in the
background; so :func:`_check_requests` (called once from ``SAMPOApp.on_init_complete``) still replaces these
MONAI Label internals, each with a wrapper that checks and then calls the original (kept as ``__wrapped__``, so a
second app start wraps nothing twice). The FastAPI route handlers (``api_run_inference``, ...) look these
module globals up when they are called, so the replacement takes effect on the running server:

- ``monailabel.endpoints.infer.run_inference`` (``POST /infer/{model}``), :func:`_checked_inference`: MONAI Label
  writes the uploads to temporary files and then ``json.loads`` ``params``; ``params`` that is not a JSON object
  and a request without an image would be a 500.
- ``monailabel.endpoints.train.run_model`` (``POST /train/{model}``), :func:`_checked_training`: the request is
  checked (``SAMPOTrainTask.check_request``) before MONAI Label starts the background run, where nothing to train
  on would only be a failed task; 409 while a training runs (MONAI Label answers a background request 429, and a
  ``run_sync`` one would train beside it).
- ``monailabel.endpoints.datastore.save_label`` (``PUT /datastore/label``), :func:`_checked_label_save`: the mask
  is checked against its image before it is saved, and a final label freezes the image's human pair
  (``"human_pair"`` in the answer).
- ``monailabel.endpoints.datastore.add_image`` (``PUT /datastore/image``), :func:`_checked_image_add`: the id and
  the upload's file name are checked before the upload is written to a temporary file.
- the exception handlers of the FastAPI app ``monailabel.app.app``, :func:`_answer_invalid_json_with_422`: a
  ``json.JSONDecodeError`` of ``params`` parsed in an endpoint is answered 422 (FastAPI's default: 500). The handler
  is also written into the ``_exception_handlers`` of the middleware stack (a Starlette private attribute), which
  was built at startup, before the app is initialised.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)


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


def _model_error(exc: BaseException):
    """The bundle's CheckpointError in ``exc``'s chain (a served model that cannot be loaded)."""
    from bundle.networks import CheckpointError

    return _in_chain(exc, CheckpointError)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


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


def _checked_training(run_model, train_task: type):
    """MONAI Label's ``run_model`` (``POST /train/{model}``) with the request checked before a background run
    starts, so that nothing to train on is a 4xx answer, not a failed background task, and one training at a time
    (409 while one runs). ``train_task``: the app's train task class (``SAMPOTrainTask``), whose tasks check."""

    def run(model, params=None, run_sync=False, enqueue=False):
        from monailabel.interfaces.utils.app import app_instance

        instance = app_instance()
        task = getattr(instance, "_trainers", {}).get(model)
        if isinstance(task, train_task):
            request = {**instance.info().get("config", {}).get("train", {}), **(params or {})}
            task.check_request(request, instance.datastore())
        _training_busy(enqueue)
        return run_model(model, params, run_sync, enqueue)

    run.__wrapped__ = run_model
    return run


def _checked_label_save(save_label, app: type):
    """MONAI Label's ``save_label`` (``PUT /datastore/label``): the mask checked against its image first (404 for an
    unknown image, 422 for a mask that is not an image of the image's size: nothing is saved), and, for a final
    label, the image's latest proposal frozen as its human preference pair (bundle/pair_store.py). ``app``: the
    app class (``SAMPOApp``, with ``check_label`` and ``freeze_pair``) whose instances do both."""

    def run(background_tasks, image, params="{}", tag="final", label=None, user=None):
        from monailabel.interfaces.utils.app import app_instance

        check_name(image, "image")
        if tag:
            check_name(tag, "tag")
        check_file_name(getattr(label, "filename", None), "label", _datastore_patterns())
        instance = app_instance()
        sampo = isinstance(instance, app)
        if sampo:
            instance.check_label(image, label)
        res = save_label(background_tasks, image, params, tag, label, user)
        if sampo and (tag or "final") == "final":
            res = {**(res or {}), "human_pair": instance.freeze_pair(image)}
        return res

    run.__wrapped__ = save_label
    return run


def _check_requests(app: type, train_task: type) -> None:
    """Route MONAI Label's infer, train, label-save and image-add endpoints through the checks above (the endpoints
    look these functions up in their modules at call time); ``app`` and ``train_task``: the app and train task
    classes whose instances check labels and train requests (``SAMPOApp``, ``SAMPOTrainTask``)."""
    import monailabel.endpoints.datastore as datastore_endpoint
    import monailabel.endpoints.infer as infer_endpoint
    import monailabel.endpoints.train as train_endpoint

    if not hasattr(infer_endpoint.run_inference, "__wrapped__"):
        infer_endpoint.run_inference = _checked_inference(infer_endpoint.run_inference)
    if not hasattr(train_endpoint.run_model, "__wrapped__"):
        train_endpoint.run_model = _checked_training(train_endpoint.run_model, train_task)
    if not hasattr(datastore_endpoint.save_label, "__wrapped__"):
        datastore_endpoint.save_label = _checked_label_save(datastore_endpoint.save_label, app)
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

def check_infer_request(infers: dict, request, datastore) -> None:
    """``HTTPException`` 404 for an unknown model (``infers``: the app's infer tasks) or image, 422 for a
    ``model_filename`` the model's files that load do not hold (:func:`loadable_models`)."""
    model = request.get("model")
    if model not in infers:
        raise HTTPException(status_code=404, detail=f"no model '{model}'; available: {sorted(infers)}")
    wanted = _first(request.get("model_filename"))
    offered = infers[model].config().get("model_filename") or []
    if wanted and wanted not in offered:
        raise HTTPException(
            status_code=422,
            detail=f"model_filename '{wanted}' cannot be used for inference (a training checkpoint, or not in "
            f"models/); files that load: {offered}",
        )
    image = request.get("image")
    if isinstance(image, str) and not os.path.exists(image):
        if not datastore.get_image_uri(image):
            raise HTTPException(status_code=404, detail=f"no image '{image}' in the datastore")


def infer_error(e: Exception) -> HTTPException | None:
    """The answer to an infer request that raised ``e`` (not an ``HTTPException``): 422 for bad input (MONAI Label's
    INVALID_INPUT, the bundle's PromptInputError), 500 naming the cause for a served model that does not load; None
    for any other error (raised as it is)."""
    if isinstance(e, MONAILabelException) and e.error == MONAILabelError.INVALID_INPUT:
        return HTTPException(status_code=422, detail=e.msg)
    broken = _model_error(e)
    if broken is not None:  # the served model file was replaced by one that does not load
        return HTTPException(status_code=500, detail=f"the served model cannot be loaded: {broken}")
    bad = _bad_input(e)
    if bad is None:
        return None
    return HTTPException(status_code=422, detail=str(bad))


def check_label(datastore, image: str, upload) -> None:
    """``HTTPException`` 404 for an image not in ``datastore``, 422 for a mask that is not an image of the
    image's size (bundle/labeling.py); the upload is left readable from its start."""
    from bundle.labeling import check_mask_upload, is_2d_image

    uri = datastore.get_image_uri(image) if image else ""
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
