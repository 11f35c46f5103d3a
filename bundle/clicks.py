"""Clicks as a user gives them -> foreground and background click lists, checked for form (not yet against an image).

:func:`clicks_of_request` / :func:`slice_of_request` say where the clicks and the slice of an inference request
come from: the request's keys (MONAI Label), a clicks source (below), or the image's metadata (MONAI Deploy).

Sources: a dict or JSON file ``{"foreground": [[x, y], ...], "background": [...], "slice_index": k}`` (clicks
``[x, y]`` or voxel indices ``[i, j, k]``; :mod:`bundle.inference` says which coordinates), or guidance channels
(an ``.npy`` file or array ``(2, *spatial)``) whose peaks are read as :func:`bundle.guidance.click_peaks` reads the
network's click channels. A malformed source raises :class:`PromptInputError`, naming the source and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bundle.guidance import click_peaks


class PromptInputError(ValueError):
    """An image or clicks that inference cannot use (the message says what and where)."""


def _source_name(source: Any) -> str:
    return source if isinstance(source, str) else "clicks"


def guidance_to_clicks(guidance: np.ndarray, threshold: float = 0.5) -> tuple[list, list]:
    """(2, *spatial) click channels, 2 or 3 spatial dims -> foreground and background clicks in index order (the
    peaks :func:`bundle.guidance.click_peaks` reads)."""
    peaks = click_peaks(torch.tensor(np.asarray(guidance, dtype=np.float32))[None], threshold)[0]
    return tuple([[int(v) for v in p] for p in torch.nonzero(channel).tolist()] for channel in peaks[:2])


def read_clicks(source: Any) -> tuple[list, list]:
    """Foreground and background clicks from a dict, a JSON file, or guidance channels (``.npy`` file or array).

    Raises :class:`PromptInputError` for a malformed source; the clicks are not yet checked against an image.
    """
    fg, bg, _ = read_prompt(source)
    return fg, bg


def read_prompt(source: Any) -> tuple[list, list, int | None]:
    """:func:`read_clicks` plus the ``slice_index`` a JSON / dict source may give (``None`` if not)."""
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise PromptInputError(f"clicks file not found: {path}")
        if path.endswith(".npy"):
            source = np.load(path)
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    source = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PromptInputError(f"{path}: not a JSON clicks file ({e})") from e
    if isinstance(source, (np.ndarray, torch.Tensor)):
        arr = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
        if arr.ndim not in (3, 4) or arr.shape[0] != 2:
            raise PromptInputError(f"{name}: guidance channels must have shape (2, *spatial), 2 or 3 spatial dims, "
                                   f"got {arr.shape}")
        return (*guidance_to_clicks(arr), None)
    if not isinstance(source, Mapping):
        raise PromptInputError(f"{name}: expected {{'foreground': [[x, y], ...], 'background': [...]}}")
    unknown = set(source) - {"foreground", "background", "slice_index"}
    if unknown:
        raise PromptInputError(f"{name}: unknown keys {sorted(unknown)} (expected 'foreground' and 'background')")
    k = source.get("slice_index")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise PromptInputError(f"{name}: slice_index must be an integer, got {k!r}")
    fg = check_click_list(source.get("foreground"), "foreground", name)
    return fg, check_click_list(source.get("background"), "background", name), k


def check_click_list(clicks: Any, kind: str, name: str = "clicks") -> list[list[float]]:
    """A list of [x, y] or [x, y, z] number lists (``None`` -> empty); raise :class:`PromptInputError` otherwise."""
    if clicks is None:
        return []
    if isinstance(clicks, (np.ndarray, torch.Tensor)):
        clicks = np.asarray(clicks).tolist()
    if isinstance(clicks, str):
        try:
            clicks = json.loads(clicks)
        except json.JSONDecodeError as e:
            raise PromptInputError(f"{name}: {kind} clicks are not a JSON list ({clicks!r})") from e
    if not isinstance(clicks, (list, tuple)):
        raise PromptInputError(f"{name}: {kind} clicks must be a list of [x, y] points, got {type(clicks).__name__}")
    out = []
    for c in clicks:
        if (
            not isinstance(c, (list, tuple))
            or len(c) not in (2, 3)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in c)
        ):
            raise PromptInputError(f"{name}: {kind} click {c!r} is not [x, y] or [x, y, z] with finite numbers")
        out.append([float(v) for v in c])
    return out


def clicks_of_request(d: Mapping, meta: Mapping, name: str, foreground_key: str = "foreground",
                      background_key: str = "background", clicks_key: str = "clicks") -> tuple[list, list, int | None]:
    """Foreground and background clicks of a request ``d`` (and the slice index its clicks source gives): from
    ``foreground_key`` / ``background_key``, else ``clicks_key`` (:func:`read_prompt`), else the image's
    metadata ``meta`` (``foreground`` / ``background``); :class:`PromptInputError` when there are none."""
    fg, bg = d.get(foreground_key), d.get(background_key)
    if fg is not None or bg is not None:
        return check_click_list(fg, "foreground", name), check_click_list(bg, "background", name), None
    source = d.get(clicks_key)
    if source is not None and not (isinstance(source, str) and not source):
        return read_prompt(source)
    if meta.get("foreground") is not None or meta.get("background") is not None:
        fg = check_click_list(meta.get("foreground"), "foreground", name)
        return fg, check_click_list(meta.get("background"), "background", name), None
    raise PromptInputError(
        f"{name}: no clicks given (request keys '{foreground_key}' / '{background_key}', or "
        f"'{clicks_key}': a JSON file {{\"foreground\": [[x, y], ...], \"background\": [...]}})"
    )


def _slice_value(k: Any) -> Any:
    """A given slice index, or None where none is given (None, an empty string, a negative number: -1 is unset)."""
    if isinstance(k, torch.Tensor):
        k = k.item()
    return None if k is None or (isinstance(k, str) and not k.strip()) or (isinstance(k, (int, float)) and k < 0) else k


def slice_of_request(d: Mapping, meta: Mapping, clicks: list, given: int | None,
                     slice_key: str = "slice_index") -> int | None:
    """The file slice index of a volume request: ``slice_key`` of the request, else ``given`` (the clicks file's),
    else the image's metadata, else the one slice of the 3D clicks; None when nothing gives one."""
    k = _slice_value(d.get(slice_key))
    if k is None:
        k = _slice_value(given if given is not None else meta.get(slice_key))
    if k is None:
        zs = {c[2] for c in clicks if len(c) == 3}
        if len(zs) > 1:
            raise PromptInputError(f"3D clicks lie on different slices {sorted(zs)}; the network segments one slice")
        return int(zs.pop()) if zs else None
    try:
        return int(k)
    except (TypeError, ValueError):
        raise PromptInputError(f"slice_index must be an integer, got {k!r}") from None
