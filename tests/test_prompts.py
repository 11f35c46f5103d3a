"""Task targets and prompt synthesis: what is prompted where, seeded and reproducible."""

import numpy as np
import pytest
import torch

from bundle.prompt_sampling import PromptSampler, evaluation_points
from bundle.transforms.prompts import ClickGuidanced, EvalPromptsd, PromptSetsd
from bundle.transforms.task import TaskTargetd


def _label():
    """3 nuclei: ids 1, 2 of class 2 and id 3 of class 3, on a 32x32 tile."""
    inst = np.zeros((32, 32), np.int32)
    inst[2:10, 2:10] = 1
    inst[20:28, 4:12] = 2
    inst[12:20, 20:30] = 3
    cls = np.zeros_like(inst)
    cls[inst == 1] = 2
    cls[inst == 2] = 2
    cls[inst == 3] = 3
    return np.stack([inst, cls])


def test_task_targets():
    label = _label()
    t1 = TaskTargetd("t1")({"label": label})
    assert t1["label"].shape == (1, 32, 32) and t1["label"].sum() == (label[0] > 0).sum()
    assert t1["target_class"] == 0 and not (t1["lookalike"].bool() & t1["label"].bool()).any()
    t2 = TaskTargetd("t2")({"label": label, "target_class": 3})
    assert t2["label"].sum() == 80 and set(np.unique(t2["target_inst"])) == {0, 3}
    assert t2["lookalike"].sum() == 128  # the two class-2 nuclei are the look-alikes
    drawn = TaskTargetd("t2")
    drawn.set_random_state(0)
    assert {drawn({"label": label})["target_class"] for _ in range(20)} == {2, 3}
    organ = TaskTargetd("organ")({"label": np.stack([label[1], label[1]]), "target_class": 2})
    assert organ["label"].sum() == 128 and organ["lookalike"].sum() == 80


def test_task_target_errors():
    with pytest.raises(ValueError, match="task must be one of"):
        TaskTargetd("t3")
    with pytest.raises(ValueError, match=r"expected a \(2, H, W\)"):
        TaskTargetd("t1")({"label": np.zeros((32, 32))})


def test_vanished_target_gives_an_empty_target_and_negative_prompts(caplog):
    """A nucleus resized away leaves no target: the sample trains on an empty G with negatives only, and says so."""
    with caplog.at_level("WARNING"):
        absent = TaskTargetd("t2")({"label": _label(), "target_class": 4})
        nothing = TaskTargetd("t2")({"label": np.zeros((2, 8, 8), np.int32)})
    assert absent["label"].sum() == 0 and nothing["label"].sum() == 0 and nothing["target_class"] == 0
    assert caplog.text.count("no pixel of the target") == 2
    t = PromptSetsd(8)
    t.set_random_state(0)
    labels = t(absent)["point_labels"].numpy()
    assert (labels == 1).sum() == 0 and ((labels == 0).sum(1) >= 1).all()


def _sample(task="t2", cls=2):
    return TaskTargetd(task)({"label": _label(), "target_class": cls})


def test_prompt_sets_respect_the_target_and_vary():
    d = _sample()
    t = PromptSetsd(n_prompt_sets=16, max_pos=3, max_neg=3)
    t.set_random_state(0)
    out = t(d)
    points, labels = out["points"].numpy(), out["point_labels"].numpy()
    assert points.shape == (16, 6, 2) and labels.shape == (16, 6)
    target, lookalike = d["label"][0].numpy() > 0, d["lookalike"][0].numpy() > 0
    n_pos = (labels == 1).sum(1)
    n_neg = (labels == 0).sum(1)
    assert n_pos.min() >= 1 and n_pos.max() <= 3 and n_neg.max() <= 3
    assert len(set(zip(n_pos, n_neg))) > 3  # sizes vary between sets
    for (x, y), lab in zip(points.reshape(-1, 2).astype(int), labels.reshape(-1)):
        if lab == 1:
            assert target[y, x]
        elif lab == 0:
            assert not target[y, x]
    hard = [lookalike[int(y), int(x)] for (x, y), lab in zip(points.reshape(-1, 2), labels.reshape(-1)) if lab == 0]
    assert any(hard) and not all(hard)  # negatives on look-alike nuclei and on plain background
    # padding slots come after the real points
    for row in labels:
        assert (row[row == -1].size == 0) or (np.argmax(row == -1) >= (row != -1).sum())


def test_prompt_sets_are_seeded():
    d = _sample()
    a, b, c = PromptSetsd(4), PromptSetsd(4), PromptSetsd(4)
    a.set_random_state(7)
    b.set_random_state(7)
    c.set_random_state(8)
    pa, pb, pc = a(d)["points"], b(d)["points"], c(d)["points"]
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    with pytest.raises(ValueError, match="n_prompt_sets must be >= 2"):
        PromptSetsd(1)


def test_interior_and_edge_points():
    d = _sample("t1")
    sampler = PromptSampler(d["label"][0].numpy() > 0, d["target_inst"][0].numpy(), d["lookalike"][0].numpy() > 0)
    rng = np.random.default_rng(0)
    interior = [sampler.positive(3, True, rng) for _ in range(20)]
    edge = [sampler.positive(3, False, rng) for _ in range(20)]
    depth = lambda p: sampler.depth[int(p[1]), int(p[0])]  # noqa: E731
    assert min(depth(p) for p in interior) >= 2 and max(depth(p) for p in edge) <= 1


def test_evaluation_prompts_fixed_per_image():
    d = _sample()
    t = EvalPromptsd(3, 3, seed=0)
    first = t(dict(d, name="img_7"))
    again = t(dict(d, name="img_7"))
    other = t(dict(d, name="img_8"))
    assert torch.equal(first["points"], again["points"]) and not torch.equal(first["points"], other["points"])
    assert first["point_labels"].tolist() == [1, 1, 1, 0, 0, 0]
    target = d["label"][0].numpy() > 0
    for (x, y), lab in zip(first["points"].numpy().astype(int), first["point_labels"].numpy()):
        assert target[y, x] == (lab == 1)
    points, labels = evaluation_points(np.zeros((8, 8), bool), 2, 1, np.random.default_rng(0))
    assert labels.tolist() == [0, -1, -1]  # no positive can be drawn in an empty G


def test_click_guidance_appends_two_channels():
    d = EvalPromptsd(2, 1)(dict(_sample(), name="x", image=torch.rand(3, 32, 32)))
    out = ClickGuidanced("image")(d)
    assert out["image"].shape == (5, 32, 32)
    positives = {tuple(p) for p in d["points"][:2].int().tolist()}
    assert out["image"][3].sum() == len(positives) and out["image"][4].sum() == 1
    x, y = d["points"][2].int().tolist()
    assert out["image"][4, y, x] == 1


def _set_qualities(sampler, points, labels):
    """What a prompt set actually is: interior or edge positives, how many instances, negatives on look-alikes."""
    out = []
    for pts, labs in zip(points, labels):
        pos = [(int(x), int(y)) for (x, y), lab in zip(pts, labs) if lab == 1]
        neg = [(int(x), int(y)) for (x, y), lab in zip(pts, labs) if lab == 0]
        out.append({
            "interior": all(sampler.depth[y, x] > 1 for x, y in pos),
            "edge": all(sampler.depth[y, x] <= 1 for x, y in pos),
            "instances": {int(sampler.inst[y, x]) for x, y in pos},
            "lookalike": [bool(sampler.lookalike[y, x]) for x, y in neg],
        })
    return out


@pytest.mark.parametrize("seed", range(5))
def test_within_one_sample_the_sets_differ_in_quality(seed):
    """METHOD.md: the N sets of one sample mix interior vs edge, one vs many instances, background vs look-alike
    negatives -- every sample, not only by chance."""
    d = TaskTargetd("t1")({"label": _label()})
    target, inst, lookalike = d["label"][0].numpy() > 0, d["target_inst"][0].numpy(), d["lookalike"][0].numpy() > 0
    sampler = PromptSampler(target, inst, lookalike)
    points, labels = sampler.prompt_sets(4, np.random.default_rng(seed))
    q = _set_qualities(sampler, points, labels)
    assert any(s["interior"] for s in q) and any(s["edge"] for s in q)
    assert any(len(s["instances"]) == 1 for s in q) and any(len(s["instances"]) >= 2 for s in q)
    with_neg = [s["lookalike"] for s in q if s["lookalike"]]
    hard_sets = [all(n) for n in with_neg]
    assert sum(hard_sets) <= 2 and len(with_neg) - sum(hard_sets) <= 2  # balanced: at most half of each
    # a model that segments exactly the clicked objects scores these sets differently against G (all nuclei)
    clicked = [np.isin(inst, list(s["instances"])) for s in q]
    ious = [(c & target).sum() / (c | target).sum() for c in clicked]
    assert len(set(np.round(ious, 6))) > 1


def test_the_sets_give_a_network_candidates_to_prefer(tiny_net):
    """On a fixture the N sets' candidate masks do not all tie, so PO1 mines pairs with a preference."""
    from bundle.metrics import overlap
    from bundle.preference import mine_pairs

    d = TaskTargetd("t1")({"label": _label()})
    t = PromptSetsd(n_prompt_sets=4)
    t.set_random_state(0)
    out = t(d)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        low, _ = tiny_net.decode(tiny_net.encode(image), out["points"][None].float(), out["point_labels"][None],
                                 input_size=(32, 32))
    masks = torch.nn.functional.interpolate(low[0], size=(32, 32), mode="bilinear") > 0
    iou = overlap(masks, d["label"][0])[1]
    assert iou.unique().numel() > 1
    inter, _ = mine_pairs(iou)
    assert inter.valid.any()
