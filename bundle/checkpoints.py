"""Checkpoint files: the one module that reads them, strictly loads them and finds the latest.

Every surface (training resume, evaluation, export, inference, MONAI Label, ``scripts/export.py``) and the SAM
builder's official-checkpoint reader go through here: :func:`read_file` (a torch file, ``weights_only``),
:func:`read_checkpoint` / :func:`read_training_state` (what is in it), :func:`load_weights` / :func:`load_network`
(strict load, onto the right base), :func:`latest_checkpoint` (newest complete training state). What an
adapter-sized checkpoint holds (:class:`BaseModel`, :class:`TrainedWeights`) and whether a state dict fits a network
(:func:`check_state_dict`, :func:`check_base`) are :mod:`bundle.networks.trained_weights`; their names are
re-exported here, so that a surface needs this module only. :func:`load_weights` reads adapter-sized files as
well as full state dicts (``models/model.pt``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from bundle.networks import CheckpointError, PromptableSAM
from bundle.networks.sam_builder import read_file  # noqa: F401  (the one torch-file reader; re-exported)
from bundle.networks.trained_weights import (  # noqa: F401  (re-exported: the surfaces import them from here)
    ARCHITECTURE_KEYS,
    EXPORT_KEY,
    BaseMismatchError,
    BaseModel,
    TrainedWeights,
    base_fingerprint,
    architecture,
    check_architecture,
    check_base,
    check_state_dict,
    describe_base,
    describe_layout,
    exported,
    file_sha256,
    fold_stage1,
    load_trained,
    trained_keys,
)

logger = logging.getLogger(__name__)


def read_training_state(path: str) -> dict:
    """The training state ``checkpoint_epoch=N.pt`` at ``path`` (``resume_from``): a dict with ``network``,
    ``trainer``, ...; the errors say how to start afresh instead."""
    fresh = "pass --resume_from None to start afresh"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume_from: training state not found: {path} ({fresh})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled code
        raise CheckpointError(
            f"resume_from: {path} is not a readable training state ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"resume from an earlier checkpoint_epoch=N.pt or {fresh}"
        ) from e
    if not isinstance(ckpt, dict) or "network" not in ckpt or "trainer" not in ckpt:
        keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"resume_from: {path} is not a training state (keys {keys}; expected network, "
                              f"optimizer, trainer, ... as in checkpoint_epoch=N.pt); {fresh}")
    return ckpt


def read_checkpoint(path: str | os.PathLike, key: str = "network") -> tuple[dict[str, torch.Tensor], dict | None]:
    """The network tensors in ``path`` and the base they apply to: ``(state, base)`` for an adapter-sized training
    checkpoint (``{"base": ..., key: trained tensors, ...}``), ``(state, None)`` for a full state dict
    (``models/model.pt``) or a training checkpoint holding the whole network."""
    path = os.fspath(path)
    ckpt = read_file(path)
    base = ckpt.get("base") if isinstance(ckpt, Mapping) and isinstance(ckpt.get("base"), Mapping) else None
    if isinstance(ckpt, Mapping) and key not in ckpt and isinstance(ckpt.get("architecture"), Mapping):
        key = EXPORT_KEY  # models/model.pt: {"model": merged state dict, "architecture": ...}
    if isinstance(ckpt, Mapping) and key in ckpt and isinstance(ckpt[key], Mapping):
        ckpt = ckpt[key]
    if not isinstance(ckpt, Mapping) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        keys = list(ckpt)[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a state dict or a training checkpoint with key '{key}', got {keys}")
    return dict(ckpt), dict(base) if base is not None else None


def recorded_architecture(path: str | os.PathLike) -> dict:
    """The architecture a checkpoint records (:func:`architecture`: ``models/model.pt``'s ``architecture``, a
    training checkpoint's ``base.architecture``); ``{}`` for a missing file or one written before the record.
    Reads the file memory-mapped: the tensors are not loaded."""
    path = os.fspath(path) if path else ""
    if not path or not os.path.isfile(path):
        return {}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, Mapping):
        return {}
    record = ckpt.get("architecture")
    if not isinstance(record, Mapping) and isinstance(ckpt.get("base"), Mapping):
        record = ckpt["base"].get("architecture")
    return dict(record) if isinstance(record, Mapping) else {}


def recorded(path: str | os.PathLike, key: str, default):
    """``key`` of the architecture ``path`` records (:func:`recorded_architecture`), else ``default``: the configs'
    ``model_size``, ``image_size``, ``lora_rank`` come from the checkpoint they load (``$bundle.checkpoints.recorded(
    @ckpt_path, 'model_size', 'vit_b')``), a flag overrides them."""
    value = recorded_architecture(path).get(key)
    return default if value is None else value


def read_state_dict(path: str | os.PathLike, key: str = "network") -> dict[str, torch.Tensor]:
    """The network state dict in a training checkpoint (``{key: state, ...}``, MONAI ``CheckpointSaver``) or a bare
    state dict (``models/model.pt``); raise naming the file otherwise. For an adapter-sized checkpoint these are the
    trained tensors only: :func:`load_weights` loads them onto the right base."""
    return read_checkpoint(path, key)[0]


def build_network(*args, **network_args) -> PromptableSAM:
    """``PromptableSAM(*args, **network_args)`` (its defaults, its argument names) whose weights come from a
    checkpoint next: on the base ``sam_checkpoint`` / ``seed`` when the checkpoint holds only trained tensors, else
    any (the random-init warning is silenced)."""
    net_logger = logging.getLogger("bundle.networks.promptable_sam")
    level = net_logger.level
    net_logger.setLevel(logging.ERROR)
    try:
        return PromptableSAM(*args, **network_args)
    finally:
        net_logger.setLevel(level)


def load_weights(net: nn.Module, path: str | os.PathLike, key: str = "network") -> nn.Module:
    """Load the checkpoint at ``path`` into ``net`` strictly; :class:`CheckpointError` names the file and what does
    not match (configs/inference.yaml loads models/model.pt with it). An adapter-sized checkpoint loads its trained
    tensors onto ``net``'s base, which must be the base the checkpoint names (:func:`check_base`); one written in
    stage 2 of the virtual-annotator schedule first folds its stage-1 tensors into that base."""
    state, base = read_checkpoint(path, key)
    source = os.fspath(path)
    check_architecture(recorded_architecture(source), net, source)
    if base is not None:
        check_base(base, net, source)
        stages = torch.load(source, map_location="cpu", weights_only=True).get("stages")  # adapter-sized: cheap
        if isinstance(stages, Mapping) and stages.get("folded"):  # written in stage 2 of bundle.stage_schedule
            fold_stage1(net, stages["stage1"], source)
    check_state_dict(state, net, source, partial=base is not None)
    net.load_state_dict(state, strict=base is None)
    logger.info(
        "loaded trained weights from %s (%s)", source,
        f"trained tensors on the base {describe_base(base)}" if base is not None else "all weights",
    )
    return net.eval()


def load_network(path: str | os.PathLike, key: str = "network", **network_args) -> PromptableSAM:
    """Build ``PromptableSAM(**network_args)`` and load the checkpoint at ``path`` strictly (clear error if not).

    The architecture the file records fills the arguments not given (an argument that contradicts it is refused by
    :func:`load_weights`). For an adapter-sized checkpoint the network is built on the base it names (the official
    SAM file, which must still be there, or the random initialisation of its seed)."""
    _, base = read_checkpoint(path, key)
    record = recorded_architecture(path)
    keys = [k for k in ARCHITECTURE_KEYS if record.get(k) is not None and (k != "lora_targets" or record.get("lora_rank"))]
    network_args = {**{k: record[k] for k in keys}, **network_args}
    if base is not None:
        sam = base.get("sam_checkpoint")
        if base.get("initialisation") != "random" and not (sam and os.path.isfile(sam)):
            raise CheckpointError(
                f"{os.fspath(path)}: its trained weights apply to the base SAM checkpoint {sam} (sha256 "
                f"{(base.get('sha256') or '')[:12]}…), which is not found: put that file back (or download it: "
                "README, 'Official SAM checkpoints') to rebuild the network"
            )
        network_args = {**network_args, "sam_checkpoint": sam, "seed": base.get("seed")}
    return load_weights(build_network(**network_args), path, key)


def latest_checkpoint(ckpt_dir: str, prefix: str = "checkpoint") -> str | None:
    """The newest complete ``{prefix}_epoch=N.pt`` written by MONAI's ``CheckpointSaver`` in ``ckpt_dir``, or None.

    MONAI writes checkpoints in place, so a run killed while saving leaves a truncated newest file (the previous one
    is removed only after the new one is written): such a file is skipped, with a warning.
    """
    found = glob.glob(os.path.join(ckpt_dir, f"{prefix}_epoch=*.pt"))
    for path in sorted(found, key=lambda p: int(re.search(r"epoch=(\d+)", p).group(1)), reverse=True):
        if zipfile.is_zipfile(path):  # torch.save's format; a truncated file has no central directory
            return path
        logger.warning("skipping incomplete checkpoint %s (killed while saving?)", path)
    return None
