"""Checkpoints: the one module that reads, checks, strictly loads and finds them.

Every surface (training resume, evaluation, export, inference, MONAI Label, ``scripts/export.py``) and the SAM
builder's official-checkpoint reader go through here: :func:`read_file` (a torch file, ``weights_only``),
:func:`read_checkpoint` / :func:`read_training_state` (what is in it), :func:`check_state_dict` (does it fit the
network: the error names the file and the layout the checkpoint looks like), :func:`load_weights` /
:func:`load_network` (strict load, onto the right base), :func:`latest_checkpoint` (newest complete training state).

Adapter-sized training checkpoints: the weights training changes, and the base SAM they apply to.

Training changes only the LoRA adapters and the trained copies of the prompt encoder / mask decoder (peft
``modules_to_save``); the SAM image encoder and the reference copies stay as they were built. A checkpoint
(``checkpoint_epoch=N.pt``, ``best_model.pt``) therefore holds, as peft adapters do:

* ``network``: :class:`TrainedWeights`, the trained tensors only (:func:`trained_keys`);
* ``base``: :class:`BaseModel`, the base they apply to: the official SAM checkpoint (path and sha256 of the file)
  or ``random`` initialisation with its seed, and a fingerprint (sha256) of the base tensors themselves.

Loading into a network whose base differs fails with a :class:`~bundle.networks.CheckpointError` that says which
base the checkpoint wants and which one the network has. Both classes have ``state_dict`` / ``load_state_dict``,
so Ignite's ``Checkpoint`` and MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` save and load them like modules.
:func:`load_weights` reads these files as well as full state dicts (``models/model.pt``).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from bundle.networks import SAM_SIZES, CheckpointError, PromptableSAM

logger = logging.getLogger(__name__)


class BaseMismatchError(CheckpointError):
    """Trained weights loaded onto a network built from another base."""


def trained_keys(net: nn.Module) -> list[str]:
    """State-dict keys of what training changes: trainable parameters, and everything in the LoRA adapters and the
    trained (peft ``modules_to_save``) copies, buffers included."""
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    return [k for k in net.state_dict() if k in trainable or "lora_" in k or ".modules_to_save." in k]


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def base_fingerprint(net: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of the base tensors (everything :func:`trained_keys` leaves out)."""
    trained = set(trained_keys(net))
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        if key in trained:
            continue
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def describe_base(record: Mapping) -> str:
    """``SAM checkpoint /x/sam_vit_b_01ec64.pth (sha256 ec2df62f…)`` or ``random initialisation (seed 0)``."""
    if record.get("initialisation") == "random":
        seed = record.get("seed")
        return "random initialisation" + (f" (seed {seed})" if seed is not None else " (unseeded)")
    sha = record.get("sha256")
    return f"SAM checkpoint {record.get('sam_checkpoint') or record.get('initialisation')}" + (
        f" (sha256 {sha[:12]}…)" if sha else "")


class BaseModel:
    """The base a checkpoint's trained weights apply to; ``load_state_dict`` refuses another base.

    Args:
        network: the :class:`~bundle.networks.PromptableSAM` being trained.
        sam_checkpoint: the official checkpoint it was built from (configs: ``sam_checkpoint``); ignored when the
            network says it starts from random initialisation.
        seed: the seed of a random base (``PromptableSAM(seed=...)``).
    """

    def __init__(self, network: nn.Module, sam_checkpoint: str | None = None, seed: int | None = None) -> None:
        self.network, self.sam_checkpoint, self.seed = network, sam_checkpoint, seed
        self._record: dict | None = None

    def state_dict(self) -> dict:
        if self._record is None:  # the base is frozen: computed once (about a second for vit_b)
            init = getattr(self.network, "initialisation", "random")
            from_file = init != "random" and bool(self.sam_checkpoint) and os.path.isfile(self.sam_checkpoint)
            self._record = {
                "initialisation": init,
                "sam_checkpoint": os.path.abspath(self.sam_checkpoint) if from_file else None,
                "sha256": file_sha256(self.sam_checkpoint) if from_file else None,
                "seed": self.seed if init == "random" else None,
                "model_size": getattr(self.network, "model_size", None),
                "image_size": getattr(self.network, "image_size", None),
                "fingerprint": base_fingerprint(self.network),
            }
        return dict(self._record)

    def load_state_dict(self, record: Mapping, source: str = "checkpoint") -> None:
        check_base(record, self.network, source, own=self.state_dict())


def check_base(record: Mapping, net: nn.Module, source: str, own: Mapping | None = None) -> None:
    """Raise :class:`CheckpointError` if ``net``'s base tensors are not those the checkpoint's trained weights
    apply to (``record`` is the checkpoint's ``base`` entry)."""
    fingerprint = own["fingerprint"] if own is not None else base_fingerprint(net)
    if record.get("fingerprint") == fingerprint:
        return
    if own is None:
        own = {"initialisation": getattr(net, "initialisation", "?"), "seed": getattr(net, "seed", None)}
    fix = (
        "--sam_checkpoint " + str(record.get("sam_checkpoint"))
        if record.get("initialisation") != "random"
        else f"--sam_checkpoint pointing to no file and --seed {record.get('seed')}"
    )
    raise BaseMismatchError(
        f"{source}: its trained weights (LoRA adapters, prompt encoder, mask decoder) apply to the base "
        f"{describe_base(record)}, but the network was built from {describe_base(own)}: the weights would not "
        f"mean the same. Build the network on the checkpoint's base ({fix}), with the model_size / image_size "
        "of its training."
    )


class TrainedWeights:
    """The trained tensors of ``network`` (:func:`trained_keys`), loaded back onto the network's own base."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.network.state_dict()
        return {k: state[k] for k in trained_keys(self.network)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        load_trained(self.network, state, source)


def load_trained(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load trained tensors (or a full state dict) into ``net``: every trained key must be there, nothing else
    may be, shapes must match (:func:`check_state_dict` names what does not)."""
    check_state_dict(state, net, source, partial=set(trained_keys(net)) <= set(state))
    net.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------------------------------
# reading, checking, loading
# ------------------------------------------------------------------------------------------------------------------
def read_file(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU; ``FileNotFoundError`` / :class:`CheckpointError` naming
    the file (``what`` names the kind of file in the first)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:  # truncated file, wrong format, pickle with code ...
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


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


def describe_layout(state: Mapping[str, torch.Tensor]) -> str:
    """A short guess at the network a state dict was made for (size, LoRA rank), for error messages."""
    patch = next((v for k, v in state.items() if k.endswith("image_encoder.patch_embed.proj.weight")), None)
    rank = next((v.shape[0] for k, v in state.items() if ".lora_A." in k), 0)
    depth = len({k.split("blocks.")[1].split(".")[0] for k in state if ".image_encoder.blocks." in k})
    if patch is None and rank:  # adapter-sized: trained tensors only
        dim = next((v.shape[1] for k, v in state.items() if k.endswith("attn.qkv.lora_A.default.weight")), "?")
        sizes = [n for n, c in SAM_SIZES.items() if c["embed_dim"] == dim and c["depth"] == depth]
        return f"trained tensors of model_size {sizes[0] if sizes else '?'} (embed_dim {dim}, depth {depth}), lora_rank {rank}"
    if patch is None:
        return "not a PromptableSAM state dict (no image_encoder.patch_embed.proj.weight)"
    dim = patch.shape[0]
    sizes = [n for n, c in SAM_SIZES.items() if c["embed_dim"] == dim and c["depth"] == depth]
    pos = next((v for k, v in state.items() if k.endswith("image_encoder.pos_embed")), None)
    size = f", image_size {pos.shape[1] * 16}" if pos is not None and pos.ndim == 4 else ""
    return (
        f"model_size {sizes[0] if sizes else '?'} (embed_dim {dim}, depth {depth}){size}, "
        f"lora_rank {rank}" + (" (merged)" if not rank else "")
    )


def check_state_dict(state: Mapping[str, torch.Tensor], net: nn.Module, source: str, partial: bool = False) -> None:
    """Raise :class:`CheckpointError` naming ``source`` and what does not match if ``state`` cannot load strictly.

    ``partial``: ``state`` holds only the trained tensors of an adapter-sized checkpoint (:mod:`bundle.checkpoints`);
    the keys of the network's base may then be missing, nothing else may.
    """
    target = net.state_dict()
    missing = sorted(set(target) - set(state))
    if partial:
        missing = sorted(set(missing) & set(trained_keys(net)))
    unexpected = sorted(set(state) - set(target))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        want = (
            f"model_size {getattr(net, 'model_size', '?')}, image_size {getattr(net, 'image_size', '?')}, "
            f"lora_rank {getattr(net, 'lora_rank', '?')}"
        )
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(
            f"{source}: does not fit PromptableSAM({want}); the checkpoint looks like {describe_layout(state)}. "
            "Pass the model_size / image_size / lora_rank it was trained with. Details: " + "; ".join(parts)
        )


def read_checkpoint(path: str | os.PathLike, key: str = "network") -> tuple[dict[str, torch.Tensor], dict | None]:
    """The network tensors in ``path`` and the base they apply to: ``(state, base)`` for an adapter-sized training
    checkpoint (``{"base": ..., key: trained tensors, ...}``), ``(state, None)`` for a full state dict
    (``models/model.pt``) or a training checkpoint holding the whole network."""
    path = os.fspath(path)
    ckpt = read_file(path)
    base = ckpt.get("base") if isinstance(ckpt, Mapping) and isinstance(ckpt.get("base"), Mapping) else None
    if isinstance(ckpt, Mapping) and key in ckpt and isinstance(ckpt[key], Mapping):
        ckpt = ckpt[key]
    if not isinstance(ckpt, Mapping) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        keys = list(ckpt)[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a state dict or a training checkpoint with key '{key}', got {keys}")
    return dict(ckpt), dict(base) if base is not None else None


def read_state_dict(path: str | os.PathLike, key: str = "network") -> dict[str, torch.Tensor]:
    """The network state dict in a training checkpoint (``{key: state, ...}``, MONAI ``CheckpointSaver``) or a bare
    state dict (``models/model.pt``); raise naming the file otherwise. For an adapter-sized checkpoint these are the
    trained tensors only: :func:`load_weights` loads them onto the right base."""
    return read_checkpoint(path, key)[0]


def build_network(*args, sam_checkpoint: str | None = None, **network_args) -> PromptableSAM:
    """``PromptableSAM(*args, checkpoint=sam_checkpoint, **network_args)`` (its defaults, its argument names) whose
    weights come from a checkpoint next: on the base ``sam_checkpoint`` / ``seed`` when the checkpoint holds only
    trained tensors, else any (the random-init warning is silenced)."""
    net_logger = logging.getLogger("bundle.networks.promptable_sam")
    level = net_logger.level
    net_logger.setLevel(logging.ERROR)
    try:
        return PromptableSAM(*args, checkpoint=sam_checkpoint, **network_args)
    finally:
        net_logger.setLevel(level)


def load_weights(net: nn.Module, path: str | os.PathLike, key: str = "network") -> nn.Module:
    """Load the checkpoint at ``path`` into ``net`` strictly; :class:`CheckpointError` names the file and what does
    not match (configs/inference.yaml loads models/model.pt with it). An adapter-sized checkpoint loads its trained
    tensors onto ``net``'s base, which must be the base the checkpoint names (:func:`check_base`); one written in
    stage 2 of the virtual-annotator schedule first folds its stage-1 tensors into that base."""
    state, base = read_checkpoint(path, key)
    source = os.fspath(path)
    if base is not None:
        check_base(base, net, source)
        stages = torch.load(source, map_location="cpu", weights_only=True).get("stages")  # adapter-sized: cheap
        if isinstance(stages, Mapping) and stages.get("folded"):  # written in stage 2 of bundle.stage_schedule
            from bundle.stage_schedule import fold_stage1

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

    For an adapter-sized checkpoint the network is built on the base it names (the official SAM file, which must
    still be there, or the random initialisation of its seed)."""
    _, base = read_checkpoint(path, key)
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
