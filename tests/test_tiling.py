"""Native-resolution tiling (bundle/tiling.py, issue 22): one tile is the network itself, tiles are stitched where
they belong, clicks reach every tile holding them, propagation carries the intent to tiles without a click, a
nucleus across a seam stays one, and memory stays bounded on a large field."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bundle.clicks import PromptInputError
from bundle.guidance import click_channels
from bundle.inference import PromptImaged
from bundle.nuclei import split_instances
from bundle.predictor import CachedPromptInferer
from bundle.tiling import BACKGROUND_LOGIT, Tiling, blend_window, pad_to_tile, tiled_forward
from bundle.networks import PromptableSAM
from conftest import REPO


def tiny_net():
    torch.manual_seed(0)
    return PromptableSAM("tiny", image_size=64, lora_rank=0)


def field(h, w, fg=(), bg=()):
    """(3 + 2, h, w): a random image with the clicks' channels at the native resolution."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand((3, h, w), generator=g)
    pts = [list(p) for p in fg] + [list(p) for p in bg]
    return torch.cat([img, click_channels(pts, len(fg), (h, w))])


def test_one_tile_is_the_network_itself():
    net = tiny_net().eval()
    x = field(64, 64, fg=[(10, 20), (40, 41)], bg=[(3, 60)])
    with torch.no_grad():
        want = net(x[None])[0]
        got = tiled_forward(lambda t, ids: net(t), x, Tiling(tile_size=64, overlap=16), 3)
    assert torch.equal(got, want)


def test_a_smaller_field_is_padded_with_sams_mean_not_stretched():
    net = tiny_net().eval()
    x = field(40, 50, fg=[(10, 20)])
    padded = pad_to_tile(x, 64, 3)
    assert padded.shape == (5, 64, 64)
    assert torch.equal(padded[:, :40, :50], x)
    assert torch.allclose(padded[:3, 50:, :], torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1) / 255)
    assert padded[3:, 40:, :].abs().sum() == 0
    with torch.no_grad():
        got = tiled_forward(lambda t, ids: net(t), x, Tiling(tile_size=64, overlap=16), 3)
        want = net(padded[None])[0, :, :40, :50]
    assert got.shape == (1, 40, 50) and torch.equal(got, want)


@pytest.mark.parametrize("blend", ["cosine", "mean"])
def test_tiles_are_stitched_where_they_belong(blend):
    """A 'network' whose logit is a fixed function of the pixel: the stitched field equals it everywhere."""
    x = field(200, 150, fg=[(5, 5)])
    seen = []

    def forward(tiles, ids):
        seen.append(len(tiles))
        return tiles[:, :1] * 4 - 2  # logit from the image channel: position-exact

    out = tiled_forward(forward, x, Tiling(mode="propagate", tile_size=64, overlap=16, blend=blend,
                                           confident=0.6), 3)
    assert out.shape == (1, 200, 150)
    assert torch.allclose(out[0], x[0] * 4 - 2, atol=1e-5)
    assert max(seen) <= Tiling().batch_size


def test_blend_window_ramps_over_the_overlap_and_never_vanishes():
    w = blend_window(64, 16)
    assert w.min() > 0 and w[32, 32] == 1 and w[16, 16] == 1
    assert w[0, 32] < w[8, 32] < w[15, 32] < 1


def test_clicks_reach_every_tile_holding_them_in_its_coordinates():
    t, o = 64, 16  # offsets 0, 48, 96 along both axes of a 160 px field
    click = (50, 100)  # x 50 lies in the tiles at x 0 and 48; y 100 in those at y 48 and 96
    x = field(160, 160, fg=[click], bg=[(150, 10)])
    tiles = {}

    def forward(batch, ids):
        for tid, tile in zip(ids, batch):
            tiles[tid] = tile
        return torch.full((len(batch), 1, t, t), -5.0)

    tiled_forward(forward, x, Tiling(mode="routed", tile_size=t, overlap=o), 3)
    assert sorted(tiles) == ["48,0", "48,48", "96,0", "96,48"]  # routed: only the tiles holding the foreground click run
    for tid, tile in tiles.items():
        y0, x0 = map(int, tid.split(","))
        fg = torch.nonzero(tile[3]).tolist()
        assert fg == [[click[1] - y0, click[0] - x0]]
        assert tile[4].sum() == 0  # the background click (150, 10) is in neither tile


def discs_field(h, w, centres, r=9):
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w), np.float32)
    for cx, cy in centres:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 1
    return img


def all_objects_if_prompted(batch, ids):
    """A segmenter of 'all nuclei' that needs a positive click in its tile to answer."""
    prompted = (batch[:, 3].flatten(1).amax(1) > 0.5).view(-1, 1, 1, 1)
    return torch.where(prompted, batch[:, :1] * 20 - 10, torch.full_like(batch[:, :1], -10.0))


def test_propagation_carries_the_intent_to_tiles_without_a_click():
    h = w = 256
    centres = [(cx, cy) for cy in range(20, 256, 40) for cx in range(20, 256, 40)]
    disc = torch.from_numpy(discs_field(h, w, centres))
    image = disc.expand(3, h, w)
    x = torch.cat([image, click_channels([[20, 20], [60, 20], [20, 60]], 3, (h, w))])
    tiling = dict(tile_size=64, overlap=24)
    routed = tiled_forward(all_objects_if_prompted, x, Tiling(mode="routed", **tiling), 3)[0] > 0
    spread = tiled_forward(all_objects_if_prompted, x, Tiling(mode="propagate", **tiling), 3)[0] > 0
    assert routed.sum() < 0.2 * disc.sum()  # the clicked corner only
    assert torch.equal(spread, disc > 0)  # every nucleus of the field
    assert (tiled_forward(all_objects_if_prompted, x, Tiling(mode="routed", **tiling), 3)[0, 200:, 200:]
            == BACKGROUND_LOGIT).all()


def test_a_nucleus_across_a_seam_stays_one_instance():
    h, w = 64, 112  # tiles at x 0 and 48 (overlap 16): the seam region is x 48..63
    disc = torch.from_numpy(discs_field(h, w, [(56, 32)], r=12))
    x = torch.cat([disc.expand(3, h, w), click_channels([[56, 32]], 1, (h, w))])
    logits = tiled_forward(all_objects_if_prompted, x, Tiling(mode="routed", tile_size=64, overlap=16), 3)[0]
    inst = split_instances(torch.sigmoid(logits).numpy())
    assert inst.max() == 1 and np.array_equal(inst > 0, disc.numpy() > 0)


def test_tiling_config_is_checked_by_name():
    with pytest.raises(ValueError, match="'overlap'"):
        Tiling(tile_size=64, overlap=64)
    with pytest.raises(ValueError, match="'mode'"):
        Tiling(mode="stretch")
    with pytest.raises(ValueError, match="unknown keys \\['tile'\\]"):
        Tiling.of({"tile": 64})


def test_served_path_keeps_native_resolution_and_refuses_clicks_outside():
    from monai.data import MetaTensor
    img = MetaTensor(torch.randint(0, 255, (3, 150, 100), dtype=torch.uint8),  # (C, X, Y): 150 columns, 100 rows
                     meta={"filename_or_obj": "field.png", "spatial_shape": (150, 100)})
    prep = PromptImaged(image_size=64, tiling={"mode": "propagate", "tile_size": 64, "overlap": 16})
    d = prep({"image": img, "clicks": {"foreground": [[149, 99]], "background": []}})
    assert d["image"].shape == (5, 100, 150) and d["image"][3, 99, 149] == 1
    with pytest.raises(PromptInputError, match=r"click \[150.0, 20.0\] is outside the image \(150 columns x 100 rows"):
        prep({"image": img, "clicks": {"foreground": [[150, 20]]}})
    with pytest.raises(PromptInputError, match="too small"):
        prep({"image": MetaTensor(torch.zeros((3, 1, 1)), meta={"filename_or_obj": "dot.png"}),
              "clicks": {"foreground": [[0, 0]]}})
    net = tiny_net().eval()
    inferer = CachedPromptInferer(cache_size=16, tiling={"mode": "routed", "tile_size": 64, "overlap": 16})
    d = prep({"image": img, "clicks": {"foreground": [[60, 50]], "background": []}})  # in 2 x 2 tiles
    out = inferer(d["image"][None], net)
    assert out.shape == (1, 1, 100, 150)
    served = CachedPromptInferer._served
    assert (served.misses, served.hits) == (4, 0)  # one embedding per tile
    again = inferer(d["image"][None], net)  # the next click on the field decodes only
    assert (served.misses, served.hits) == (4, 4) and torch.equal(again, out)


def test_memory_stays_bounded_on_a_large_field():
    """A 3000 x 3000 field through the tiler with a network-sized forward: the peak resident memory grows by a few
    field-sized float maps, not by the tiles (about 1.6 GB if all 3,969 tiles of 64 px were held at once)."""
    code = """
import json, resource, torch
from bundle.tiling import Tiling, tiled_forward
from bundle.guidance import click_channels
h = w = 3000
x = torch.cat([torch.rand(3, h, w), click_channels([[10, 10]], 1, (h, w))])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seen = []
def forward(t, ids):
    seen.append(len(t))
    return t[:, :1] * 20 - 10
out = tiled_forward(forward, x, Tiling(tile_size=64, overlap=16, confident=0.6), 3)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown_mb": (after - before) / 1024, "max_batch": max(seen), "tiles": sum(seen),
                  "shape": list(out.shape)}))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shape"] == [1, 3000, 3000] and got["max_batch"] <= 4 and got["tiles"] == 63 * 63
    field_map_mb = 3000 * 3000 * 4 / 2**20  # one float32 map of the field: 34 MB
    assert got["grown_mb"] < 12 * field_map_mb, got


def test_whole_consep_fields_are_recovered_from_tiles_that_abut_and_a_wrong_grid_is_refused(tmp_path):
    """The shared tiles' layout is measured, not assumed: tiles 000..008 of a source abut as a 3 x 3 grid."""
    from conftest import needs_shared_data
    from bundle.whole_field import field_clicks, recover_field

    root = needs_shared_data("consep", "Test")
    image, inst = recover_field(root / "Images", root / "Labels", "test_2")
    assert image.shape == (768, 768, 3) and inst.shape == (768, 768)
    first = np.array(__import__("PIL.Image", fromlist=["Image"]).open(root / "Images" / "test_2_004.png"))
    assert np.array_equal(image[256:512, 256:512], first)  # tile 4 is the centre of the block
    clicks = field_clicks(inst, "corner", 0, 256)
    assert all(x < 256 and y < 256 for x, y in clicks["foreground"] + clicks["background"])
    assert all(inst[y, x] > 0 for x, y in clicks["foreground"]) and all(inst[y, x] == 0 for x, y in clicks["background"])
    import shutil
    shuffled = tmp_path / "Images"
    shuffled.mkdir()
    for k in range(16):  # tiles 1 and 3 swapped: tile 0's right neighbour is no longer tile 1
        src = {1: 3, 3: 1}.get(k, k)
        shutil.copy(root / "Images" / f"test_2_{src:03d}.png", shuffled / f"test_2_{k:03d}.png")
    with pytest.raises(ValueError, match="test_2"):
        recover_field(shuffled, root / "Labels", "test_2")


def test_synthetic_fields_keep_a_tiles_density_and_are_evaluated_by_every_method(tmp_path):
    """Fields of the embedded generator larger than the model's input: the tile's nuclei density over the whole
    field, field k the same however many are drawn, and the whole-field evaluation runs every method on them and
    writes its table through the script."""
    from bundle.data.synthetic import generate_tile
    from bundle.whole_field import METHODS, evaluate_fields, field_table, synthetic_fields

    fields = synthetic_fields(2, 512, seed=3)
    (image, inst), (image1, _) = fields["synthetic_0"], fields["synthetic_1"]
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8 and inst.shape == (512, 512)
    assert not np.array_equal(image, image1)
    assert np.array_equal(synthetic_fields(1, 512, seed=3)["synthetic_0"][0], image)
    tiles = [generate_tile(np.random.default_rng(s))[1] for s in range(8)]
    tile_density = np.mean([t.max() / 256 ** 2 for t in tiles])
    assert 0.5 < (inst.max() / 512 ** 2) / tile_density < 2, (inst.max(), tile_density)
    # a 160 x 200 crop (3 x 4 tiles of the tiny model's 64 px) whose top-left 64 px hold 3 nuclei for the corner clicks
    y, x = next((y, x) for y in range(0, 352, 16) for x in range(0, 312, 16)
                if len(np.unique(inst[y:y + 64, x:x + 64])) > 3)
    crop = inst[y:y + 160, x:x + 200]
    rows = evaluate_fields(tiny_net(), {"s": (image[y:y + 160, x:x + 200], crop)}, 64, seeds=(0,))
    assert {(r["placement"], r["method"]) for r in rows} == {(p, m) for p in ("spread", "corner") for m in METHODS}
    assert all(0 <= r["dice"] <= 1 and r["true_count"] == len(np.unique(crop)) - 1 for r in rows)
    table = field_table(rows)
    assert table.count("\n") == 2 + 6 and "| corner | propagate |" in table
    with pytest.raises(ValueError, match="size 1 px"):
        synthetic_fields(1, 1)
