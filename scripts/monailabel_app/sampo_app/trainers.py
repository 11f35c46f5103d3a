"""Run management and continued training of the SAMPO MONAI Label app: ``SAMPOTrainTask``, MONAI Label's
``BundleTrainTask`` on the bundle's configs/train.yaml, each ``POST /train/<model>`` a fresh run in a folder of its
own under ``train_dir``, continuing from the served models/model.pt (bundle/continued.py), training on the
datastore's labels and human pairs, and publishing its export as the served model when it succeeds."""

from __future__ import annotations

import logging
import os
import time

from fastapi import HTTPException
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

from sampo_app.http_checks import _first, check_name

logger = logging.getLogger(__name__)


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


def _flag(value) -> bool:
    return strtobool(value) if isinstance(value, str) else bool(value)