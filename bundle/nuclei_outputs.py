"""What a pathologist counts, from the served logits: nucleus instances, their table, the count, and the files
(instance labels, CSV, QuPath GeoJSON). Part of the ``postprocessing`` of ``configs/inference.yaml``.

:class:`NucleiInstancesd` runs on the logits before :class:`bundle.masks.PromptMaskd` thresholds them:
``p = sigmoid(logits)`` in the image's own (H, W) (:mod:`bundle.tiling` already gives it at native resolution; a
resized input is upsampled first, as the mask is), then :func:`bundle.nuclei.split_instances` (distance-transform
watershed, parameters from the config). It writes into the item:

* ``instances``: (H, W) int32 instance labels, 0 background, 1..N (rows y, columns x);
* ``nuclei``: the table (id, centroid_x, centroid_y, area, mean_prob, class_name); ``n_nuclei``: N;
* ``result``: what MONAI Label's writer returns as the infer response's JSON (``output_json_key="result"``):
  ``n_nuclei``, ``class_name``, ``nuclei`` and ``annotation`` in the form of MONAI Label's own ``FindContoursd``
  (``{"location", "size", "elements": [{"label", "contours"}]}``, one exterior contour of (x, y) pixel corners per
  nucleus), which its pathology viewers draw. The mask itself is unchanged.

:class:`SaveImageNucleid` writes beside the mask (``<name>_instances.png``: 16-bit labels, ``.tif`` past 65,535 nuclei;
``<name>_nuclei.csv``; ``<name>_nuclei.geojson``: a FeatureCollection QuPath imports as classified detections).
The class is the request's ``class_name`` (MONAI Label parameter, ``--class_name``), else the configured one.
Slices of volumes get no instances (the organ tasks have none).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, SaveImaged

from bundle.image_meta import META_KIND, image_meta, source_name
from bundle.io import atomic_write, save_png
from bundle.masks import mask_path
from bundle.nuclei import nuclei_table, split_instances, write_nuclei_csv
from bundle.qupath import instance_polygons, to_geojson, write_geojson

logger = logging.getLogger(__name__)


class NucleiInstancesd(MapTransform):
    """Logits ``(1, h, w)`` of a 2D image -> ``instances``, ``nuclei``, ``n_nuclei`` and MONAI Label's ``result``
    (module docstring). ``enabled: false`` leaves the item as it is."""

    def __init__(self, keys: KeysCollection = "pred", image_key: str = "image", enabled: bool = True,
                 threshold: float = 0.5, min_distance: int = 3, min_size: int = 8, class_name: str = "Nucleus",
                 class_key: str = "class_name", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.enabled, self.class_name, self.class_key = image_key, bool(enabled), class_name, class_key
        self.split = dict(threshold=threshold, min_distance=min_distance, min_size=min_size)
        split_instances(np.zeros((2, 2), np.float32), **self.split)  # the parameter checks, at config time

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        meta = image_meta(d.get(self.image_key))
        if not self.enabled or meta.get(META_KIND) != "2d":
            return d
        x, y = [int(v) for v in np.asarray(meta.get("spatial_shape", ())).reshape(-1)[:2]]
        name = str(d.get(self.class_key) or self.class_name)
        for key in self.key_iterator(d):
            logits = torch.as_tensor(d[key]).detach().float().cpu()
            logits = logits.reshape(1, 1, *logits.shape[-2:])
            if tuple(logits.shape[-2:]) != (y, x):
                logits = F.interpolate(logits, size=(y, x), mode="bilinear", align_corners=False)
            prob = torch.sigmoid(logits[0, 0]).numpy()
            instances = split_instances(prob, **self.split)
            table = nuclei_table(instances, prob, name)
            contours = [polygons[0][0] for polygons in instance_polygons(instances).values()]
            d.update(instances=instances, nuclei=table, n_nuclei=len(table))
            d["result"] = {**dict(d.get("result") or {}), "n_nuclei": len(table), "class_name": name,
                           "nuclei": table,
                           "annotation": {"location": [0, 0], "size": [x, y],
                                          "elements": [{"label": name, "contours": contours}] if contours else []}}
            logger.info("%s: %d nuclei (%s)", source_name(meta) or self.image_key, len(table), name)
        return d


class SaveImageNucleid(SaveImaged):
    """Write the instance labels, the nuclei CSV and the QuPath GeoJSON beside the mask (or in ``output_dir``);
    their paths go to ``instances_path``, ``nuclei_csv_path`` and ``geojson_path``. A ``SaveImaged`` named so, so
    that MONAI Label (which drops ``SaveImaged`` instances) and MONAI Deploy (which drops ``*SaveImage*`` names)
    leave it out, as they do :class:`bundle.masks.SaveImageMaskd`: they return the result themselves."""

    def __init__(self, keys: KeysCollection = "instances", image_key: str = "image", output_dir: str | None = None,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, output_dir=output_dir or "./", allow_missing_keys=allow_missing_keys)
        self.image_key, self.out_dir = image_key, output_dir or None

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        source = source_name(image_meta(d.get(self.image_key)))
        for key in self.key_iterator(d):
            if not source:
                raise ValueError("SaveImageNucleid: the image has no file name in its metadata")
            instances = np.asarray(d[key])
            if instances.max(initial=0) <= np.iinfo(np.uint16).max:
                d["instances_path"] = save_png(instances.astype(np.uint16), mask_path(source, self.out_dir,
                                                                                       "instances", ".png"))
            else:
                import tifffile

                path = mask_path(source, self.out_dir, "instances", ".tif")
                with atomic_write(path, "wb") as f:
                    tifffile.imwrite(f, instances.astype(np.int32))
                d["instances_path"] = path
            table = d.get("nuclei") or []
            d["nuclei_csv_path"] = write_nuclei_csv(table, mask_path(source, self.out_dir, "nuclei", ".csv"))
            d["geojson_path"] = write_geojson(to_geojson(instances, table),
                                              mask_path(source, self.out_dir, "nuclei", ".geojson"))
            logger.info("%d nuclei written to %s, %s and %s", len(table), d["instances_path"], d["nuclei_csv_path"],
                        d["geojson_path"])
        return d
