"""Atomic file writes: every file the bundle writes goes to a temporary name in its own folder and is renamed over
the destination only once it is complete, so that a failed write (disk full, permission, a kill) leaves the previous
file byte-identical and no truncated file behind.

* :func:`atomic_write` is the one mechanism: a context manager yielding an open temporary file beside ``path``;
  on success it is flushed, fsynced and ``os.replace``-d onto ``path``; on failure it is removed and an OS error
  is raised as :class:`WriteError`, whose message names the file and the reason ("no space left on <dir>" for a
  full disk).
* :func:`atomic_torch_save`, :func:`save_json`, :func:`save_npy`, :func:`save_png`, :func:`save_nifti_mask` are
  the writers built on it (exports, prepared data, datalists, evaluation results, figures, inference masks).
  Training checkpoints written by MONAI's ``CheckpointSaver`` can use :func:`atomic_torch_save` as its ``save``
  function.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

__all__ = ["WriteError", "atomic_write", "atomic_torch_save", "save_json", "save_nifti_mask", "save_npy", "save_png",
           "write_error"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class WriteError(OSError):
    """A file could not be written; the message names the file and the OS reason, the previous file is intact."""


def write_error(exc: BaseException, path: str | os.PathLike) -> WriteError:
    """A :class:`WriteError` for ``exc`` raised while writing ``path``: "no space left on <dir>" for ENOSPC /
    EDQUOT, else the OS reason; in every case it says that the previous file was kept."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = f"no space left on {folder}"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = f"{exc.strerror} ({folder})"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
    return WriteError(code or errno.EIO, f"cannot write {path}: {reason}; {kept}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` when the block succeeds.

    The folder is created if needed; text modes default to UTF-8. The new file gets the usual permissions (0666
    minus the umask), not ``mkstemp``'s 0600. Any exception removes the temporary file; OS errors become
    :class:`WriteError`.
    """
    if not any(m in mode for m in "wax") or "+" in mode and "r" in mode:
        raise ValueError(f"atomic_write needs a write mode ('w', 'wb'), got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise write_error(e, path) from e
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with _open(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(e, path) from e
        if isinstance(e, RuntimeError) and isinstance(e.__cause__ or e.__context__, OSError):
            inner = e.__cause__ or e.__context__  # torch's writers wrap the file object's OSError
            raise write_error(inner, path) from e
        raise


def _open(fd: int, mode: str, **kwargs) -> IO[Any]:
    """``open`` on the temporary file descriptor (a seam for the tests that simulate a full disk)."""
    return open(fd, mode, **kwargs)


def atomic_torch_save(obj: Any, path: str | os.PathLike, **kwargs) -> str:
    """``torch.save(obj, path)`` through :func:`atomic_write`; returns ``path``."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f, **kwargs)
    return os.fspath(path)


def save_json(data: Any, path: str | os.PathLike, **dump_kwargs) -> str:
    """``json.dump`` to ``path`` atomically (``indent=1`` unless given); returns ``path``."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, **dump_kwargs)
    return os.fspath(path)


def save_npy(array: np.ndarray, path: str | os.PathLike) -> str:
    """``np.save`` to ``path`` (which must end in .npy) atomically; returns ``path``."""
    with atomic_write(path, "wb") as f:
        np.save(f, array)
    return os.fspath(path)


def save_png(image, path: str | os.PathLike, **save_kwargs) -> str:
    """Save a PIL image or a uint8 array as PNG at ``path`` atomically; returns ``path``."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG", **save_kwargs)
    return os.fspath(path)


def save_nifti_mask(mask: np.ndarray, path: str | os.PathLike, reference: str | None = None, affine=None) -> str:
    """Write the uint8 ``mask`` (file index order) as NIfTI at ``path`` (``.nii`` or ``.nii.gz``) atomically.

    The geometry is the NIfTI file ``reference``'s (its header, data type uint8 without scaling) or, without one,
    ``affine`` (4x4, RAS) as qform and sform (code 1). The one NIfTI writer of inference and the MONAI Deploy app.
    """
    import nibabel as nib

    mask = np.asarray(mask).astype(np.uint8)
    if reference is not None:
        ref = nib.load(reference)
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        image = nib.Nifti1Image(mask, ref.affine, header=header)
    else:
        if hasattr(affine, "detach"):  # a torch tensor (MetaTensor meta)
            affine = affine.detach().cpu().numpy()
        affine = np.asarray(affine, dtype=np.float64)
        image = nib.Nifti1Image(mask, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    data = image.to_bytes()
    with atomic_write(path, "wb") as f:
        f.write(gzip.compress(data) if os.fspath(path).endswith(".gz") else data)
    return os.fspath(path)


def write_section(path: str, title: str, text: str) -> None:
    """Put ``text`` under the heading ``title`` of the markdown file ``path`` (replaced up to the next ``## `` heading,
    or appended), leaving the rest of the file as it was; written atomically (the benchmarks' docs/benchmarks.md)."""
    old = open(path, encoding="utf-8").read() if os.path.isfile(path) else "# Benchmarks\n"
    head, found, rest = old.partition(title + "\n")
    tail = rest[rest.find("\n## ") + 1:] if found and "\n## " in rest else ""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(head.rstrip("\n") + "\n\n" + title + "\n\n" + text + "\n" + ("\n" + tail if tail else ""))
