"""Which weights a fine-tuning run starts from (bundle/networks/bases.py, configs/train.yaml `base`)."""

import hashlib
import os
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from bundle.networks import PromptableSAM, bases

REPO = Path(__file__).resolve().parents[1]


def _resolve(tmp_path, **overrides):
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(tmp_path), **overrides})
    return {k: parser.get_parsed_content(k) for k in ("base", "model_size", "sam_checkpoint", "image_size")}


def test_without_official_weights_the_default_is_the_committed_testbed_base(tmp_path):
    got = _resolve(tmp_path)
    assert got == {"base": "testbed", "model_size": "small", "sam_checkpoint": str(REPO / "models" / "sam_small_base.pth"),
                   "image_size": 256}


def test_the_official_vit_b_is_chosen_when_its_file_is_in_models(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sam_vit_b_01ec64.pth").write_bytes(b"")
    got = _resolve(tmp_path)
    assert got == {"base": "official", "model_size": "vit_b", "image_size": 224,
                   "sam_checkpoint": str(tmp_path / "models" / "sam_vit_b_01ec64.pth")}


def test_other_sizes_look_for_their_own_file_and_a_bad_base_is_named(tmp_path):
    got = _resolve(tmp_path, model_size="tiny")
    assert got["sam_checkpoint"] == str(tmp_path / "models" / "sam_tiny.pth") and got["image_size"] == 224
    with pytest.raises(ValueError, match="base must be 'official'.*got 'vit_x'"):
        bases.base_model_size("vit_x")


def test_start_and_end_notes_name_the_starting_weights():
    assert "RANDOM INITIALISATION" in bases.describe("random")
    assert "models/sam_small_base.pth" in bases.describe("sam_small_base.pth")
    assert bases.describe("sam_vit_b_01ec64.pth") is None


@pytest.mark.skipif(not os.path.isfile(bases.TESTBED_CHECKPOINT), reason="the testbed base is not in models/")
def test_the_committed_base_loads_into_the_small_sam_and_its_md5_is_the_documented_one():
    net = PromptableSAM("small", 256, lora_rank=0, sam_checkpoint=bases.TESTBED_CHECKPOINT, require_checkpoint=True)
    assert net.initialisation == "sam_small_base.pth"
    md5 = hashlib.md5(Path(bases.TESTBED_CHECKPOINT).read_bytes()).hexdigest()
    assert md5 in (REPO / "docs" / "testbed.md").read_text(encoding="utf-8")
    assert os.path.getsize(bases.TESTBED_CHECKPOINT) < 10 * 2**20
