"""Atomic writes (bundle/io.py): a write that fails half-way (a full disk, simulated by a file whose write raises
ENOSPC after part of the data) leaves the previous file byte-identical and no temporary file, and the error names
the folder ("no space left on <dir>")."""

import errno
import os

import numpy as np
import pytest
import torch

import bundle.io


class FullDisk:
    """A writable file that accepts ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        data = bytes(data) if not isinstance(data, str) else data
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    real = bundle.io._open
    monkeypatch.setattr(bundle.io, "_open", lambda fd, mode, **kw: FullDisk(real(fd, mode, **kw), room=100))


def assert_untouched(path, before: bytes):
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "a temporary file was left behind"


def _rows():
    return [{"name": f"img{i}", "target_class": 0, "dice": 0.5, "iou": 0.3} for i in range(50)]


WRITERS = {
    "torch": lambda p: bundle.io.atomic_torch_save({"w": torch.arange(1000.0)}, p),
    "results.csv": lambda p: __import__("bundle.evaluation").evaluation.write_rows(_rows(), str(p)),
    "summary.json": lambda p: bundle.io.save_json({"rows": _rows()}, p),
    "npy": lambda p: bundle.io.save_npy(np.zeros((64, 64), np.float32), p),
    "png": lambda p: bundle.io.save_png((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8), p),
    "heatmap": lambda p: __import__("bundle.sensitivity").sensitivity.write_heatmap(np.full((3, 4), 0.5), str(p)),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_failed_write_keeps_the_previous_file(tmp_path, full_disk, kind):
    path = tmp_path / f"out_{kind}"
    path.write_bytes(b"previous content")
    with pytest.raises(OSError, match=f"no space left on {tmp_path}") as e:
        WRITERS[kind](path)
    assert str(path) in str(e.value) and "previous file is unchanged" in str(e.value)
    assert_untouched(path, b"previous content")


def test_successful_write_replaces_with_usual_permissions(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old", encoding="utf-8")
    bundle.io.save_json({"a": 1}, path)
    assert path.read_text(encoding="utf-8").replace(" ", "").replace("\n", "") == '{"a":1}'
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_export_on_a_full_disk_keeps_model_pt_and_model_ts(tmp_path, monkeypatch):
    """export_bundle: a failing model.pt (then model.ts) write names the folder and keeps both previous files."""
    from bundle.checkpoints import build_network
    from bundle.export import export_bundle, export_torchscript

    torch.manual_seed(0)
    net = build_network("tiny", 32, lora_rank=0)
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"old pt")
    (models / "model.ts").write_bytes(b"old ts")
    real = bundle.io._open
    monkeypatch.setattr(bundle.io, "_open", lambda fd, mode, **kw: FullDisk(real(fd, mode, **kw), room=4096))
    with pytest.raises(OSError, match=f"cannot write {models / 'model.pt'}: no space left on {models}"):
        export_bundle(net, models, verify=False)
    with pytest.raises(OSError, match=f"cannot write {models / 'model.ts'}: no space left on {models}"):
        export_torchscript(net, models / "model.ts", verify=False)
    assert (models / "model.pt").read_bytes() == b"old pt" and (models / "model.ts").read_bytes() == b"old ts"
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", "model.ts"]
