"""The network: SAM sizes, the single-tensor contract, checkpoint loading, LoRA and the reference policy."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bundle.guidance import guidance_to_points, points_to_guidance
from bundle.networks import CheckpointError, PromptableSAM, build_sam, load_sam_checkpoint
from bundle.networks.sam_builder import _resize_pos_embed, _resize_rel_pos


def _input(batch, size, clicks):
    """(B, 5, size, size) input with the given per-image (x, y, label) clicks."""
    image = torch.rand(batch, 3, size, size)
    p = max(len(c) for c in clicks)
    points = torch.zeros(batch, p, 2)
    labels = torch.full((batch, p), -1)
    for b, cl in enumerate(clicks):
        for i, (x, y, lab) in enumerate(cl):
            points[b, i] = torch.tensor([x, y])
            labels[b, i] = lab
    return torch.cat([image, points_to_guidance(points, labels, (size, size))], 1)


@pytest.mark.parametrize(
    "size,image_size,channels",
    [("tiny", 224, 256), ("vit_b", 224, 256), ("vit_l", 64, 256), ("vit_h", 64, 256)],
)
def test_output_shapes_for_each_size(size, image_size, channels):
    torch.manual_seed(0)
    net = PromptableSAM(size, image_size=image_size, lora_rank=0 if size in ("vit_l", "vit_h") else 4).eval()
    x = _input(2, 96, [[(10, 20, 1), (50, 60, 0)], [(70, 30, 1)]])
    with torch.no_grad():
        y = net(x)
        emb = net.encode(x[:, :3])
        low, iou = net.decode(emb[:1], torch.tensor([[[[5.0, 5.0]]]]), torch.tensor([[[1]]]))
    assert y.shape == (2, 1, 96, 96)
    grid = image_size // 16
    assert emb.shape == (2, 32 if size == "tiny" else channels, grid, grid)
    assert low.shape == (1, 1, 3, 4 * grid, 4 * grid) and iou.shape == (1, 1, 3)


def test_single_tensor_contract_matches_trainer_api(tiny_net):
    """net(x) equals decoding the clicks through encode/decode and taking the best predicted-IoU slot."""
    net = tiny_net.eval()
    x = _input(2, 64, [[(10, 20, 1), (40, 50, 0)], [(30, 30, 1), (5, 60, 1)]])
    with torch.no_grad():
        y = net(x)
        for b in range(2):
            points, labels = guidance_to_points(x[b : b + 1, 3:])
            low, iou = net.decode(net.encode(x[b : b + 1, :3]), points[None], labels[None])
            best = low[0, 0, iou[0, 0].argmax()][None, None]
            assert torch.allclose(y[b : b + 1], F.interpolate(best, size=(64, 64), mode="bilinear"), atol=1e-5)
        # each image's output depends on its own clicks only
        alone = net(x[1:2])
    assert torch.allclose(alone, y[1:2], atol=1e-5)


def test_single_tensor_contract_rejects_wrong_channels(tiny_net):
    with pytest.raises(ValueError, match=r"expected input \(B, 5, H, W\)"):
        tiny_net(torch.rand(1, 3, 64, 64))


def test_guidance_round_trip_and_padding():
    points = torch.tensor([[[3.0, 7.0], [20.0, 11.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])
    g = points_to_guidance(points, labels, (32, 32))
    assert g.shape == (1, 2, 32, 32) and g[0, 0, 7, 3] == 1 and g[0, 1, 11, 20] == 1 and g.sum() == 2
    back, back_labels = guidance_to_points(g, max_points=4)
    fg = back[0][back_labels[0] == 1]
    bg = back[0][back_labels[0] == 0]
    assert fg.tolist() == [[3.0, 7.0]] and bg.tolist() == [[20.0, 11.0]]
    assert (back_labels == -1).sum() == 6
    # a Gaussian-smoothed click reads as one click at its peak
    smooth = torch.zeros(1, 2, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth[0, 0] = torch.exp(-((xx - 12) ** 2 + (yy - 9) ** 2) / 8)
    p, lab = guidance_to_points(smooth, max_points=4)
    assert p[0][lab[0] == 1].tolist() == [[12.0, 9.0]]


def _official_tiny_checkpoint(path):
    """A tiny SAM in the official key layout at the official 1024 input size."""
    torch.manual_seed(1)
    sam = build_sam("tiny", 1024)
    torch.save(sam.state_dict(), path)
    return sam.state_dict()


def test_checkpoint_resizing(tmp_path):
    path = tmp_path / "sam_tiny_1024.pth"
    official = _official_tiny_checkpoint(path)
    sam = load_sam_checkpoint(build_sam("tiny", 224), path)
    state = sam.state_dict()
    assert official["image_encoder.pos_embed"].shape == (1, 64, 64, 64)
    assert state["image_encoder.pos_embed"].shape == (1, 14, 14, 64)
    assert torch.allclose(state["image_encoder.pos_embed"], _resize_pos_embed(official["image_encoder.pos_embed"], 14))
    # the global-attention block (index 1) spans the whole grid: 2*64-1 -> 2*14-1 rows
    assert official["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 127
    assert state["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 27
    assert torch.allclose(
        state["image_encoder.blocks.1.attn.rel_pos_w"], _resize_rel_pos(official["image_encoder.blocks.1.attn.rel_pos_w"], 27)
    )
    # windowed blocks and everything else are copied unchanged
    for key in ("image_encoder.blocks.0.attn.rel_pos_h", "image_encoder.blocks.0.attn.qkv.weight", "mask_decoder.iou_token.weight"):
        assert torch.equal(state[key], official[key])
    # a resized table is the identity when the size does not change
    assert torch.allclose(_resize_rel_pos(official["image_encoder.blocks.1.attn.rel_pos_h"], 127), official["image_encoder.blocks.1.attn.rel_pos_h"], atol=1e-6)


def test_network_loads_checkpoint_and_reports_initialisation(tmp_path, caplog):
    path = tmp_path / "sam_tiny.pth"
    _official_tiny_checkpoint(path)
    assert PromptableSAM("tiny", 224, sam_checkpoint=str(path), lora_rank=4).initialisation == "sam_tiny.pth"
    with caplog.at_level("WARNING"):
        net = PromptableSAM("tiny", 224, sam_checkpoint=str(tmp_path / "absent.pth"), lora_rank=4)
    assert net.initialisation == "random" and "RANDOM INITIALISATION" in caplog.text
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        PromptableSAM("tiny", 224, sam_checkpoint=str(tmp_path / "absent.pth"), require_checkpoint=True)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    path = tmp_path / "sam_tiny_1024.pth"
    _official_tiny_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"sam_tiny_1024\.pth.*(missing|do not fit)"):
        load_sam_checkpoint(build_sam("vit_b", 224), path)


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"\x80\x02 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth: not a readable PyTorch checkpoint"):
        load_sam_checkpoint(build_sam("tiny", 224), path)


def test_checkpoint_with_missing_keys_is_refused(tmp_path):
    path = tmp_path / "partial.pth"
    state = build_sam("tiny", 1024).state_dict()
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"partial\.pth: keys do not match.*mask_decoder\.iou_token\.weight"):
        load_sam_checkpoint(build_sam("tiny", 224), path)


def test_only_adapters_and_chosen_parts_train(tiny_net):
    trainable = {n for n, p in tiny_net.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    assert any("lora_" in n and "image_encoder" in n for n in trainable)
    assert any("modules_to_save" in n and "mask_decoder" in n for n in trainable)
    frozen = [n for n, p in tiny_net.named_parameters() if not p.requires_grad]
    assert any("image_encoder.blocks.0.attn.qkv.base_layer.weight" in n for n in frozen)


def test_reference_is_the_initial_model_without_a_copy(tiny_net):
    """After training steps the actor moves, but the reference (adapters off) still equals the initial model."""
    initial = copy.deepcopy(tiny_net)
    x = torch.rand(1, 3, 64, 64)
    pts, lab = torch.tensor([[[[20.0, 20.0]]]]), torch.tensor([[[1]]])
    opt = torch.optim.SGD([p for p in tiny_net.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        low, iou = tiny_net.decode(tiny_net.encode(x), pts, lab)
        (low.square().mean() + iou.sum()).backward()
        opt.step()
    with torch.no_grad():
        actor, _ = tiny_net.decode(tiny_net.encode(x), pts, lab)
        start, _ = initial.decode(initial.encode(x), pts, lab)
    with tiny_net.reference():
        ref, _ = tiny_net.decode(tiny_net.encode(x), pts, lab)
    assert not torch.allclose(actor, start, atol=1e-4)
    assert torch.allclose(ref, start, atol=1e-5)
    # no second copy of the image encoder: its frozen weights exist once
    encoder_weights = [n for n, _ in tiny_net.named_parameters() if "image_encoder" in n and "lora_" not in n]
    assert len(encoder_weights) == len([n for n, _ in build_sam("tiny", 64).image_encoder.named_parameters()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_rank": -1}, r"lora_rank must be an integer >= 0, got -1.*0 means no adapters"),
        ({"lora_rank": 2.5}, r"lora_rank must be an integer >= 0, got 2.5"),
        ({"lora_rank": "8"}, r"lora_rank must be an integer >= 0, got '8'"),
        ({"lora_rank": 4, "lora_alpha": 0}, r"lora_alpha must be a number > 0 or null \(= lora_rank\), got 0"),
        ({"lora_rank": 4, "lora_targets": ["qkvv"]}, r"lora_targets must be a non-empty list among \['qkv', 'proj', 'lin1', 'lin2'\].*unknown: \['qkvv'\]"),
        ({"lora_rank": 4, "lora_targets": "qkv"}, r"lora_targets must be a list of layer names"),
        ({"lora_rank": 4, "lora_targets": []}, r"lora_targets must be a non-empty list"),
        ({"lora_rank": 4, "trainable_parts": ["image_encoder"]}, r"trainable parts must be among prompt_encoder, mask_decoder"),
    ],
)
def test_bad_lora_settings_say_what_is_allowed(kwargs, match):
    from bundle.networks import PromptableSAM

    with pytest.raises(ValueError, match=match):
        PromptableSAM("tiny", image_size=32, **kwargs)


def test_rank_zero_has_no_reference_policy_and_says_so():
    from bundle.networks import PromptableSAM

    net = PromptableSAM("tiny", image_size=32, lora_rank=0)
    with pytest.raises(RuntimeError, match="lora_rank 0 means no LoRA adapters, so there is no reference policy"):
        with net.reference():
            pass


def test_activation_checkpointing_keeps_gradients_names_and_the_reference(monkeypatch):
    """Checkpointed encoder blocks give the same loss and gradients, parameter names and reference outputs; the
    backward pass recomputes the blocks (their forward runs twice per training step)."""
    from segment_anything.modeling.image_encoder import Block

    from bundle.networks.activation_checkpointing import CheckpointedBlock

    calls, block_forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, x: (calls.append(1), block_forward(self, x))[1])

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pts, lab = torch.tensor([[[[20.0, 20.0], [40.0, 12.0]]]] * 2), torch.tensor([[[1, 0]]] * 2)
    results = {}
    for on in (False, True):
        torch.manual_seed(0)  # peft draws LoRA A from the global RNG
        net = PromptableSAM("tiny", 64, lora_rank=4, seed=0, activation_checkpointing=on).train()
        with torch.no_grad():  # LoRA B starts at zero: move it so that the adapters' gradients are not trivial
            for n, p in net.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        blocks = net._sam.image_encoder.blocks
        calls.clear()
        low, iou = net.decode(net.encode(x), pts, lab)
        loss = low.square().mean() + iou.sum()
        loss.backward()
        n_calls = len(calls)
        with net.reference():
            ref, _ = net.decode(net.encode(x), pts, lab)
        results[on] = {"loss": loss.detach(), "ref": ref, "calls": n_calls, "n_blocks": len(blocks),
                       "grads": {n: p.grad for n, p in net.named_parameters() if p.requires_grad},
                       "types": {type(b) for b in blocks}, "keys": list(net.state_dict())}
    off, on = results[False], results[True]
    assert on["types"] == {CheckpointedBlock} and CheckpointedBlock not in off["types"]
    assert on["keys"] == off["keys"]
    assert off["calls"] == off["n_blocks"] and on["calls"] == 2 * on["n_blocks"]
    torch.testing.assert_close(on["loss"], off["loss"])
    torch.testing.assert_close(on["ref"], off["ref"])
    assert on["grads"].keys() == off["grads"].keys()
    for n in off["grads"]:
        torch.testing.assert_close(on["grads"][n], off["grads"][n], rtol=1e-5, atol=1e-7, msg=n)
