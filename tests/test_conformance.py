"""Every surface gives what ``segment_anything.SamPredictor`` gives on the same ``Sam`` weights (METHOD.md, "Tokens").

For the same image and clicks, the trainer's ``decode``, ``net(x)``, the evaluator, the sensitivity grid and
``model.ts`` return the logits of ``SamPredictor.set_image`` + ``predict(point_coords, point_labels,
multimask_output=True)`` (best predicted IoU): the real clicks plus SAM's single padding point, whatever number of
slots the bundle stores a prompt set in. (The MONAI Label app is checked against it in ``test_monailabel.py``.)
Random weights are fine: the comparison is on identical weights; LoRA and the trained decoder copies are perturbed
so that the actor differs from the initial SAM.
"""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from bundle.guidance import points_to_guidance
from bundle.networks import PromptableSAM

SIZES = [("tiny", 64), ("vit_b", 224)]
ATOL = 2e-4


def perturbed(model_size: str, image_size: int, lora_rank: int = 4) -> PromptableSAM:
    """A network whose adapters and trained decoder copies are moved away from the initial weights."""
    torch.manual_seed(0)
    net = PromptableSAM(model_size, image_size, lora_rank=lora_rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.02 if "lora_" in name else 0.05))
    return net.eval()


def reference_logits(sam, image, points: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, ...]:
    """SamPredictor's best predicted-IoU logits (H, W) and all three masks for one image and its clicks: a uint8
    HWC array (``set_image``), or a (3, H, W) float tensor in [0, 1] already at the encoder's size
    (``set_torch_image``, for images that resizing made non-integer)."""
    predictor = SamPredictor(sam)
    if isinstance(image, np.ndarray):
        predictor.set_image(image)
    else:
        predictor.set_torch_image(image[None].float() * 255.0, tuple(image.shape[-2:]))
    keep = labels != -1
    coords, labs = (points[keep], labels[keep]) if keep.any() else (None, None)
    with torch.no_grad():
        masks, scores, _ = predictor.predict(coords, labs, multimask_output=True, return_logits=True)
    return torch.from_numpy(masks[scores.argmax()]), torch.from_numpy(masks)


def random_clicks(rng, size: int, n_fg: int, n_bg: int, slots: int | None = None):
    """``n_fg`` + ``n_bg`` clicks on distinct pixels, stored in ``slots`` slots (label -1 behind)."""
    flat = rng.choice(size * size, n_fg + n_bg, replace=False)
    points = np.zeros((slots or n_fg + n_bg, 2), np.float32)
    labels = np.full(slots or n_fg + n_bg, -1, np.int64)
    points[: n_fg + n_bg] = np.stack([flat % size, flat // size], 1)
    labels[: n_fg + n_bg] = [1] * n_fg + [0] * n_bg
    return points, labels


@pytest.fixture(scope="module", params=SIZES, ids=[s for s, _ in SIZES])
def setting(request):
    model_size, image_size = request.param
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, image_size, image_size, 3), dtype=np.uint8)
    return perturbed(model_size, image_size), images, rng


def as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def assert_batch_equals_sam_predictor(model, sam, images: np.ndarray, rng, counts) -> None:
    """``model(x)`` on a batch with (foreground, background) ``counts`` clicks per image equals SamPredictor's best
    predicted-IoU logits on ``sam``, image by image."""
    s = images.shape[1]
    clicks = [random_clicks(rng, s, *c) for c in counts]
    guidance = torch.cat([points_to_guidance(torch.from_numpy(p)[None], torch.from_numpy(lab)[None], (s, s))
                          for p, lab in clicks])
    with torch.no_grad():
        out = model(torch.cat([as_input(images[: len(counts)]), guidance], 1))
    for b, (p, lab) in enumerate(clicks):
        best, _ = reference_logits(sam, images[b], p, lab)
        torch.testing.assert_close(out[b, 0], best, atol=ATOL, rtol=0)


def test_trainer_decode_equals_sam_predictor(setting):
    """The trainer's batched decode of padded prompt sets (B=2, N=3, sets of different sizes, 0 negatives too)."""
    net, images, rng = setting
    s = net.image_size
    counts = [[(1, 0), (3, 3), (2, 1)], [(3, 0), (1, 2), (16, 16)]]
    sets = [[random_clicks(rng, s, *c, slots=32) for c in row] for row in counts]
    points = torch.tensor(np.array([[p for p, _ in row] for row in sets]))
    labels = torch.tensor(np.array([[lab for _, lab in row] for row in sets]))
    with torch.no_grad():
        low, iou = net.decode(net.encode(as_input(images[:2])), points, labels)
        logits = torch.nn.functional.interpolate(low.flatten(0, 1), size=(s, s), mode="bilinear").view(2, 3, 3, s, s)
    for b in range(2):
        for k in range(3):
            _, masks = reference_logits(net._sam, images[b], *sets[b][k])
            torch.testing.assert_close(logits[b, k], masks, atol=ATOL, rtol=0)


def test_the_trainer_and_net_x_decode_the_same_tokens(setting):
    """The same clicks through the trainer's storage (6 slots) and through click channels (2 x 16 slots)."""
    net, images, rng = setting
    s = net.image_size
    p, lab = random_clicks(rng, s, 2, 2, slots=6)
    p, lab = torch.from_numpy(p), torch.from_numpy(lab)
    x = torch.cat([as_input(images[:1]), points_to_guidance(p[None], lab[None], (s, s))], 1)
    with torch.no_grad():
        low, iou = net.decode(net.encode(x[:, :3]), p[None, None], lab[None, None])
        best = low[0, 0, iou[0, 0].argmax()]
        trainer = torch.nn.functional.interpolate(best[None, None], size=(s, s), mode="bilinear")
        torch.testing.assert_close(net(x), trainer, atol=1e-5, rtol=0)


def test_net_x_equals_sam_predictor_for_any_click_counts(setting):
    """``net(x)`` on a batch of 3 with different click counts per image (1 to 16 per channel, 0 negatives)."""
    net, images, rng = setting
    assert_batch_equals_sam_predictor(net, net._sam, images, rng, [(1, 0), (3, 2), (16, 16)])


def test_sensitivity_grid_equals_sam_predictor(setting):
    from bundle.metrics import dice_iou
    from bundle.sensitivity import grid_prompts, prompt_grid

    net, images, _ = setting
    s = net.image_size
    target = np.zeros((s, s), bool)
    target[s // 4 : s // 2, s // 8 : s // 2] = True
    grid = prompt_grid(net, as_input(images[:1])[0], torch.from_numpy(target)[None], "img#0", max_pos=3, max_neg=3)
    points, labels = grid_prompts(target, "img#0", max_pos=3, max_neg=3)
    for cell in (0, 3 * 4 - 1, 5):  # (1+, 0-), (3+, 3-), (2+, 1-)
        best, _ = reference_logits(net._sam, images[0], points[cell], labels[cell])
        assert grid.flat[cell] == pytest.approx(dice_iou(best > 0, target)[0], abs=1e-6)


def test_evaluator_equals_sam_predictor(setting, tmp_path):
    """The validation / evaluation ``SupervisedEvaluator`` of configs/train.yaml (EvalPromptsd -> click channels ->
    net(x) -> threshold) predicts SamPredictor's mask for the protocol's 3+ / 3- prompts."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from conftest import REPO

    net, _, _ = setting
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(tmp_path), "model_size": net.model_size, "image_size": net.image_size,
                   "synthetic": {"n_train": 1, "n_val": 1, "n_test": 1}, "validate#handlers": []})
    parser.get_parsed_content("initialize")
    parser["network"] = net  # the perturbed network, not a fresh random one
    evaluator = parser.get_parsed_content("validate#evaluator")
    preds = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"]))
    evaluator.run()
    # the same item loaded by the same transforms, and the prompts EvalPromptsd gives it
    raw = parser.get_parsed_content("validate#dataset").data[0]
    loaded = Compose(parser.get_parsed_content("load") + parser.get_parsed_content("resize"))(raw)
    prompts = parser.get_parsed_content("validate#prompts")[0](loaded)
    assert prompts["point_labels"].tolist() == [1, 1, 1, 0, 0, 0] and len(preds) == 1
    best, _ = reference_logits(net._sam, torch.as_tensor(loaded["image"]), prompts["points"].numpy(),
                               prompts["point_labels"].numpy())
    assert torch.equal(preds[0][0].bool(), best > 0)


def test_torchscript_equals_sam_predictor(setting, tmp_path):
    """``models/model.ts`` (merged weights, scripted + traced) on a batch with different click counts per image."""
    from bundle.export import export_torchscript, merge_lora

    net, images, rng = setting
    merged = merge_lora(net)
    ts = torch.jit.load(export_torchscript(merged, tmp_path / "model.ts", verify=False))
    assert_batch_equals_sam_predictor(ts, merged._sam, images, rng, [(2, 0), (1, 1), (16, 5)])
