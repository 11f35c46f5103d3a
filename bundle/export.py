"""Export a trained network as the bundle's deployable models: ``models/model.pt`` and ``models/model.ts``.

* :func:`merge_lora` folds the LoRA adapters into the image-encoder weights (peft ``merge_and_unload`` on a copy)
  and keeps the trained prompt encoder / mask decoder; the result is a ``PromptableSAM(..., lora_rank=0)``.
  Its state dict is ``models/model.pt`` (under ``model``, beside the ``architecture`` that rebuilds it:
  :func:`bundle.checkpoints.exported`), which ``configs/inference.yaml``'s ``network_def``, built from that record,
  loads strictly.
* :func:`export_torchscript` scripts the network around traced parts (:mod:`bundle.traceable`;
  ``segment_anything`` is not scriptable) and saves it with MONAI's ``save_net_with_metadata``,
  carrying ``metadata.json`` and ``inference.json`` (the inference config as JSON) as extra files: the archive
  that ``monai.bundle`` tools, MONAI Label and MONAI Deploy's ``MonaiBundleInferenceOperator`` load.
  It works for any batch size and any number of clicks per image (up to ``max_points`` per channel); the spatial
  size is fixed at ``image_size`` x ``image_size``, which the bundle's preprocessing produces. The export checks
  the TorchScript output against the eager network on several batch sizes and click counts.
* :func:`export_bundle` does both from a training network or checkpoint; :class:`bundle.handlers.ExportBundle` is
  the Ignite handler that runs it at the end of training and logs the files to the training's MLflow run.
* Both files are written atomically (:mod:`bundle.io`): a failed write (e.g. a full disk) raises naming the file
  and the reason and leaves the previous ``model.pt`` / ``model.ts`` as they were.

Command line: ``python scripts/export.py --help``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

from bundle.checkpoints import architecture, build_network, check_state_dict, exported
from bundle.checkpoints import load_weights  # noqa: F401  (bundle.export.load_weights: inference.json of older exports)
from bundle.guidance import points_to_guidance
from bundle.io import atomic_torch_save, atomic_write
from bundle.networks import PromptableSAM
from bundle.traceable import script_network

logger = logging.getLogger(__name__)

ARTIFACT_PATH = "bundle"


# ------------------------------------------------------------------------------------------------------------------
# merge and trace
# ------------------------------------------------------------------------------------------------------------------
def merge_lora(net: PromptableSAM) -> PromptableSAM:
    """A ``lora_rank=0`` PromptableSAM computing what ``net`` computes, LoRA folded into the weights (``net`` is
    left untouched)."""
    if net.lora_rank == 0:
        return copy.deepcopy(net).eval()
    device = next(net.parameters()).device
    sam = copy.deepcopy(net.sam).cpu().merge_and_unload()  # trained modules_to_save copies replace the originals
    merged = build_network(net.model_size, net.image_size, net.in_channels, lora_rank=0, max_points=net.max_points)
    state = {f"sam.{k}": v for k, v in sam.state_dict().items()}
    check_state_dict(state, merged, "merged LoRA network")
    merged.load_state_dict(state, strict=True)
    return merged.to(device).eval()


def example_inputs(net: PromptableSAM, batch: int = 1, clicks=(1, 1), seed: int = 0) -> torch.Tensor:
    """A (batch, C + 2, S, S) input with random clicks: ``clicks`` = (foreground, background) for every image, or a
    list of such pairs, one per image."""
    g = torch.Generator().manual_seed(seed)
    s = net.image_size
    per_image = list(clicks) if isinstance(clicks[0], (tuple, list)) else [tuple(clicks)] * batch
    image = torch.rand((len(per_image), net.in_channels, s, s), generator=g)
    guidance = []
    for n_fg, n_bg in per_image:
        points = torch.randperm(s * s, generator=g)[: n_fg + n_bg]  # distinct pixels: every click is read
        points = torch.stack([points % s, points // s], -1).float()[None]
        labels = torch.tensor([[1] * n_fg + [0] * n_bg])
        guidance.append(points_to_guidance(points, labels, (s, s)))
    return torch.cat([image, torch.cat(guidance)], dim=1)


# the cases verify_torchscript runs: (batch, (foreground clicks, background clicks) per image or for all)
VERIFY_CASES = ((1, (1, 0)), (1, (3, 3)), (2, (2, 1)), (3, (16, 16)), (3, [(1, 0), (3, 3), (16, 16)]), (1, (0, 2)))


def verify_torchscript(ts: nn.Module, net: nn.Module, rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Compare TorchScript and eager outputs on :data:`VERIFY_CASES`; raise if they differ, return the max diff."""
    worst = 0.0
    net = net.eval()
    with torch.no_grad():
        for i, (batch, clicks) in enumerate(VERIFY_CASES):
            x = example_inputs(net, batch, clicks, seed=100 + i).to(next(net.parameters()).device)
            eager, script = net(x), ts(x)
            if script.shape != eager.shape or not torch.allclose(script, eager, rtol=rtol, atol=atol):
                diff = (script - eager).abs().max().item() if script.shape == eager.shape else float("nan")
                raise RuntimeError(
                    f"TorchScript output differs from the eager network (batch {batch}, clicks {clicks}): "
                    f"shapes {tuple(script.shape)} vs {tuple(eager.shape)}, max |diff| {diff:.3g}"
                )
            worst = max(worst, (script - eager).abs().max().item())
    return worst


def export_torchscript(
    net: PromptableSAM,
    filepath: str | os.PathLike,
    metadata: Mapping | None = None,
    inference_config: Mapping | None = None,
    verify: bool = True,
) -> str:
    """Write the TorchScript bundle model (``extra/metadata.json``, ``extra/inference.json``) and return its path."""
    from monai.data import save_net_with_metadata

    if net.lora_rank:
        net = merge_lora(net)
    net = net.cpu().eval()
    ts = script_network(net)
    if verify:
        diff = verify_torchscript(ts, net)
        logger.info("TorchScript matches the eager network (max |diff| %.3g)", diff)
    filepath = os.fspath(filepath)
    extra = {"inference.json": json.dumps(dict(inference_config)).encode()} if inference_config is not None else None
    # TorchScript names the archive's root folder after the file it writes ("archive" for a stream), and MONAI
    # Deploy's bundle operator reads <stem>/extra/metadata.json: stage the file under its own name, then copy it in
    # atomically (a failed write keeps the previous model.ts)
    with tempfile.TemporaryDirectory(prefix="sampo-export-") as tmp:
        staged = os.path.join(tmp, os.path.basename(filepath))
        save_net_with_metadata(
            ts, staged, include_config_vals=False, append_timestamp=False, meta_values=dict(metadata or {}),
            more_extra_files=extra,
        )
        with open(staged, "rb") as src, atomic_write(filepath, "wb") as f:
            shutil.copyfileobj(src, f)
    if verify:  # what is on disk, as a client loads it
        loaded = torch.jit.load(filepath, map_location="cpu")
        verify_torchscript(loaded, net)
    return filepath


# ------------------------------------------------------------------------------------------------------------------
# the bundle's models and configs
# ------------------------------------------------------------------------------------------------------------------
PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def configs_dir(bundle_root: str | os.PathLike) -> str:
    """``bundle_root/configs`` if it has the deployment configs, else the configs beside this package (a training
    run with ``--bundle_root`` elsewhere keeps its configs in the repository)."""
    own = os.path.join(os.fspath(bundle_root), "configs")
    if all(os.path.isfile(os.path.join(own, f)) for f in ("metadata.json", "inference.yaml")):
        return own
    if all(os.path.isfile(os.path.join(PACKAGE_CONFIGS, f)) for f in ("metadata.json", "inference.yaml")):
        return PACKAGE_CONFIGS
    raise FileNotFoundError(f"no configs/metadata.json + configs/inference.yaml in {own} or {PACKAGE_CONFIGS}")


def bundle_configs(bundle_root: str, model_size: str, image_size: int, in_channels: int = 3,
                   record: Mapping | None = None) -> tuple[dict, dict]:
    """``configs/metadata.json`` and ``configs/inference.yaml`` of ``bundle_root`` (:func:`configs_dir`) with the
    exported network's size; ``record`` (the exported architecture) goes into the metadata as ``architecture``."""
    from monai.bundle import ConfigParser

    folder = configs_dir(bundle_root)
    meta = ConfigParser.load_config_file(os.path.join(folder, "metadata.json"))
    infer = ConfigParser.load_config_file(os.path.join(folder, "inference.yaml"))
    infer.update({"model_size": model_size, "image_size": image_size})
    if record is not None:
        meta["architecture"] = dict(record)
    fmt = meta.get("network_data_format", {})
    for part in ("inputs", "outputs"):
        for item in fmt.get(part, {}).values():
            if isinstance(item, dict) and isinstance(item.get("spatial_shape"), list) and "*" not in item["spatial_shape"]:
                item["spatial_shape"] = [image_size, image_size]
    if "image" in fmt.get("inputs", {}):
        fmt["inputs"]["image"]["num_channels"] = in_channels + 2
    return meta, infer


def export_record(net: PromptableSAM, task: str | None = None) -> dict:
    """The architecture ``model.pt`` records for the merged form of ``net`` (``lora_rank`` 0), with what it was
    trained as: ``task``, ``trained_lora_rank`` / ``trained_lora_targets`` and the base (``initialisation``,
    ``seed``)."""
    record = architecture(net, task)
    return {**record, "lora_rank": 0, "lora_targets": [], "trained_lora_rank": net.lora_rank,
            "trained_lora_targets": record["lora_targets"], "initialisation": getattr(net, "initialisation", None),
            "seed": getattr(net, "seed", None)}


def export_bundle(
    net: PromptableSAM,
    output_dir: str | os.PathLike,
    bundle_root: str | os.PathLike = ".",
    verify: bool = True,
    task: str | None = None,
) -> dict[str, str]:
    """Merge ``net``'s adapters and write ``model.pt`` and ``model.ts`` to ``output_dir``; return their paths.

    ``model.pt`` records the architecture (:func:`export_record`, ``task`` included). The metadata and inference
    config put into ``model.ts`` are ``bundle_root``'s, with ``model_size`` and ``image_size`` set to ``net``'s and
    the record in the metadata (see :func:`bundle_configs`).
    """
    bundle_root, output_dir = os.fspath(bundle_root), os.fspath(output_dir)
    merged = merge_lora(net).cpu()
    if verify and net.lora_rank:
        x = example_inputs(merged, batch=1, clicks=(2, 1))
        with torch.no_grad():
            ref, out = net.eval()(x.to(next(net.parameters()).device)).cpu(), merged(x)
        if not torch.allclose(ref, out, rtol=1e-3, atol=1e-3):
            raise RuntimeError(f"merged network differs from the LoRA network (max |diff| {(ref - out).abs().max():.3g})")
    record = export_record(net, task)
    pt = atomic_torch_save(exported(merged.state_dict(), record), os.path.join(output_dir, "model.pt"))
    meta, infer = bundle_configs(bundle_root, merged.model_size, merged.image_size, merged.in_channels, record)
    ts = export_torchscript(merged, os.path.join(output_dir, "model.ts"), meta, infer, verify=verify)
    out = {"model.pt": pt, "model.ts": ts}
    logger.info("exported %s", ", ".join(out.values()))
    return out


def write_configs(dest: str | os.PathLike, bundle_root: str | os.PathLike, model_size: str, image_size: int,
                  record: Mapping | None = None) -> None:
    """Copy ``bundle_root/configs`` to ``dest/configs``, with metadata and inference config set to the model's size
    (and ``record``, its architecture, in the metadata)."""
    from monai.bundle import ConfigParser

    src, dst = configs_dir(bundle_root), os.path.join(os.fspath(dest), "configs")
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    meta, infer = bundle_configs(os.fspath(bundle_root), model_size, image_size, record=record)
    ConfigParser.export_config_file(meta, os.path.join(dst, "metadata.json"), fmt="json", indent=4)
    ConfigParser.export_config_file(infer, os.path.join(dst, "inference.yaml"), fmt="yaml", sort_keys=False)


def write_bundle(
    net: PromptableSAM, dest: str | os.PathLike, bundle_root: str | os.PathLike = ".", verify: bool = True,
    task: str | None = None,
) -> dict[str, str]:
    """A self-contained bundle folder at ``dest`` (e.g. a MONAI Label model folder): ``configs/`` of
    ``bundle_root`` set to ``net``'s size and ``models/model.pt`` + ``models/model.ts`` exported from ``net``."""
    dest = os.fspath(dest)
    out = export_bundle(net, os.path.join(dest, "models"), bundle_root, verify=verify, task=task)
    write_configs(dest, bundle_root, net.model_size, net.image_size, export_record(net, task))
    return out
