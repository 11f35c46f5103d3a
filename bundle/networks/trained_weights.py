"""Adapter-sized training checkpoints: the weights training changes, the base SAM they apply to, and whether a
state dict fits a network.

Training changes only the LoRA adapters and the trained copies of the prompt encoder / mask decoder (peft
``modules_to_save``); the SAM image encoder and the reference copies stay as they were built. A checkpoint
(``checkpoint_epoch=N.pt``, ``best_model.pt``) therefore holds, as peft adapters do:

* ``network``: :class:`TrainedWeights`, the trained tensors only (:func:`trained_keys`);
* ``base``: :class:`BaseModel`, the base they apply to: the official SAM checkpoint (path and sha256 of the file)
  or ``random`` initialisation with its seed, and a fingerprint (sha256) of the base tensors themselves; and the
  network's architecture (:func:`architecture`: model_size, image_size, LoRA, the task), so that every consumer
  rebuilds the network from the file instead of from flags.

The exported ``models/model.pt`` records the same architecture beside its merged state dict (:func:`exported`).
:func:`check_architecture` refuses a network that contradicts a file's record (an override such as
``--model_size vit_b`` for a ``small`` model), naming both.

Loading into a network whose base differs fails with a :class:`BaseMismatchError` that says which base the
checkpoint wants and which one the network has. Both classes have ``state_dict`` / ``load_state_dict``, so Ignite's
``Checkpoint`` and MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` save and load them like modules.
:func:`check_state_dict` says, naming the file, why a state dict does not fit a network (and what it looks like:
:func:`describe_layout`). Reading files and loading them strictly: :mod:`bundle.checkpoints`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch
from torch import nn

from bundle.networks.lora import fold_adapters
from bundle.networks.sam_builder import SAM_SIZES, CheckpointError


class BaseMismatchError(CheckpointError):
    """Trained weights loaded onto a network built from another base."""


# what a PromptableSAM is built from, as recorded in checkpoints and model.pt (its constructor's argument names)
ARCHITECTURE_KEYS = ("model_size", "image_size", "in_channels", "lora_rank", "lora_targets")
EXPORT_KEY = "model"  # the state dict of model.pt: MONAI Label's BasicInferTask reads checkpoint["model"]


def architecture(net: nn.Module, task: str | None = None) -> dict:
    """What rebuilds ``net``: ``model_size``, ``image_size``, ``in_channels``, ``lora_rank``, ``lora_targets``,
    ``max_points`` (the constructor arguments of :class:`~bundle.networks.PromptableSAM`) and the ``task``."""
    record = {k: getattr(net, k, None) for k in (*ARCHITECTURE_KEYS, "max_points")}
    record["lora_targets"] = list(record["lora_targets"] or [])
    return {**record, "task": task}


def exported(state: Mapping[str, torch.Tensor], record: Mapping) -> dict:
    """The content of ``models/model.pt``: the merged state dict under :data:`EXPORT_KEY` and its
    ``architecture``."""
    return {EXPORT_KEY: dict(state), "architecture": dict(record)}


def describe_architecture(record: Mapping) -> str:
    parts = [f"{k} {record[k]}" for k in ("model_size", "image_size", "lora_rank") if record.get(k) is not None]
    return ", ".join(parts)


def check_architecture(record: Mapping | None, net: nn.Module, source: str) -> None:
    """Raise :class:`CheckpointError` if ``net`` was built otherwise than the checkpoint ``source`` records
    (``record``: its architecture; None or empty for files written before the record: nothing to check)."""
    if not record:
        return
    own = architecture(net)
    keys = [k for k in ARCHITECTURE_KEYS if record.get(k) is not None and k != "lora_targets"]
    if int(record.get("lora_rank") or 0) and int(own["lora_rank"] or 0):
        keys.append("lora_targets")
    differ = [k for k in keys if (list(record[k]) if k == "lora_targets" else record[k]) != own[k]]
    if differ:
        said = ", ".join(f"{k} {own[k]} (the file records {record[k]})" for k in differ)
        raise CheckpointError(
            f"{source}: does not fit PromptableSAM({describe_architecture(own)}); the checkpoint records "
            f"{describe_architecture(record)}: {said}. The configs build the network from this record; drop the "
            f"--{' / --'.join(differ)} override, or pass the values it records."
        )


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
        task: the task trained (``t1`` / ``t2`` / ``organ``), recorded in the architecture.
    """

    def __init__(self, network: nn.Module, sam_checkpoint: str | None = None, seed: int | None = None,
                 task: str | None = None) -> None:
        self.network, self.sam_checkpoint, self.seed, self.task = network, sam_checkpoint, seed, task
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
                "architecture": architecture(self.network, self.task),
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

    ``partial``: ``state`` holds only the trained tensors of an adapter-sized checkpoint (module docstring);
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


def fold_stage1(network, stage1: dict, source: str, fold_seed: int = 0) -> None:
    """Put ``network`` (on the run's original base) at the start of stage 2: load the stage-1 tensors, fold them."""
    load_trained(network, stage1, f"{source} (stage-1 tensors)")
    fold_adapters(network.sam, fold_seed)
