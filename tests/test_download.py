"""The checkpoint download command, run against a local file:// URL (no network)."""

import hashlib
import subprocess
import sys

import yaml

from conftest import REPO


def _large_files(tmp_path, content: bytes, md5: str):
    src = tmp_path / "src.pth"
    src.write_bytes(content)
    spec = {"large_files": [{"path": "models/sam_vit_b_01ec64.pth", "url": src.as_uri(), "hash_val": md5, "hash_type": "md5"}]}
    path = tmp_path / "large_files.yml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _download(tmp_path, large_files, size="vit_b"):
    cmd = [sys.executable, str(REPO / "scripts" / "download_checkpoint.py"), "--model_size", size,
           "--bundle_root", str(tmp_path / "bundle"), "--large_files", str(large_files)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def test_download_checks_md5(tmp_path):
    content = b"weights" * 100
    good = _large_files(tmp_path, content, hashlib.md5(content).hexdigest())
    proc = _download(tmp_path, good)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "bundle" / "models" / "sam_vit_b_01ec64.pth").read_bytes() == content

    (tmp_path / "bundle" / "models" / "sam_vit_b_01ec64.pth").unlink()
    bad = _large_files(tmp_path, content, "0" * 32)
    proc = _download(tmp_path, bad)
    assert proc.returncode != 0 and "md5" in (proc.stdout + proc.stderr).lower()


def test_unknown_model_size(tmp_path):
    proc = _download(tmp_path, REPO / "large_files.yml", size="vit_x")
    assert proc.returncode != 0 and "no checkpoint for model_size 'vit_x'" in proc.stderr


def test_large_files_lists_the_official_checkpoints():
    entries = yaml.safe_load((REPO / "large_files.yml").read_text(encoding="utf-8"))["large_files"]
    names = {e["path"]: e["hash_val"] for e in entries}
    assert names["models/sam_vit_b_01ec64.pth"].startswith("01ec64")
    assert all(e["url"].startswith("https://dl.fbaipublicfiles.com/segment_anything/") for e in entries)
