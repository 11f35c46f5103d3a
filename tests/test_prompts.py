"""Task targets and prompt synthesis: what is prompted where, seeded and reproducible."""

import numpy as np
import pytest
import torch

from bundle.prompts import PromptSampler, evaluation_points
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
    t = PromptSetsd(n_sets=16, max_pos=3, max_neg=3)
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
    with pytest.raises(ValueError, match="n_sets must be >= 2"):
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
