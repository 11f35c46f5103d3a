"""Human preference pairs (bundle/pair_store.py, bundle/human_pairs.py): the store's proposals and pairs, the clicks under which a pair is
trained, the DPO + SUP term, and the trainer adding it beside SAMPO's simulated pairs."""

import json
import math
import threading

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from conftest import REPO


def _image(path, seed=0, size=(20, 30)):
    Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def _mask(size=(20, 30), box=(2, 10, 3, 12)):
    m = np.zeros(size, np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = 1
    return m


def test_a_saved_label_freezes_the_latest_proposal_and_an_unanswered_image_has_none(tmp_path):
    from bundle.pair_store import PairStore, attach_pairs

    store = PairStore(tmp_path / "pairs")
    a, b = _image(tmp_path / "a.png", 0), _image(tmp_path / "b.png", 1)
    store.record_proposal("a", a, _mask(box=(0, 4, 0, 4)), [[1, 2]])
    store.record_proposal("a", a, _mask() * 255, [[5, 6], [7, 8]], [[1, 1]], model="m.pt")  # the latest answer
    assert store.pair("a") is None  # nothing saved yet
    pair = store.freeze("a", a)
    assert pair.clicks == {"foreground": [[5.0, 6.0], [7.0, 8.0]], "background": [[1.0, 1.0]]}
    assert np.array_equal(np.load(pair.mask_path), _mask()) and pair.shape == (20, 30) and pair.model == "m.pt"
    # a later click on the image does not change the frozen pair
    store.record_proposal("a", a, _mask(box=(0, 2, 0, 2)), [[0, 0]])
    assert store.pair("a", a).clicks["foreground"] == [[5.0, 6.0], [7.0, 8.0]]
    # b was never answered: its label is a plain label
    assert store.freeze("b", b) is None and store.pair("b", b) is None
    items = attach_pairs([{"image": a, "label": "la.png"}, {"image": b, "label": "lb.png"}], ["a", "b"], store,
                         tmp_path / "run" / "human_pairs")
    assert items[0]["proposal"] == str(tmp_path / "run" / "human_pairs" / "a.npy")
    assert np.array_equal(np.load(items[0]["proposal"]), _mask()) and items[0]["clicks"] == pair.clicks
    assert items[1] == {"image": b, "label": "lb.png"}
    json.dumps(items)  # the datalist travels as JSON (MONAI Label's multi-GPU config)


def test_a_torn_write_or_a_changed_image_gives_no_pair(tmp_path, caplog):
    from bundle.pair_store import PairStore

    store = PairStore(tmp_path / "pairs")
    a = _image(tmp_path / "a.png", 0)
    store.record_proposal("a", a, _mask(), [[5, 6]])
    np.save(tmp_path / "pairs" / "a.proposal.npy", _mask(box=(0, 1, 0, 1)))  # the mask without its record
    assert store.freeze("a", a) is None
    assert "does not match its record" in caplog.text
    store.record_proposal("a", a, _mask(), [[5, 6]])
    _image(tmp_path / "a.png", 7)  # the image replaced after the model answered
    assert store.freeze("a", a) is None
    assert "changed since the model's proposal" in caplog.text
    with pytest.raises(ValueError, match="not a datastore image id"):
        store.record_proposal("../x", a, _mask(), [[1, 1]])


def test_concurrent_proposals_on_two_images_stay_with_their_image(tmp_path):
    from bundle.pair_store import PairStore

    store = PairStore(tmp_path / "pairs")
    paths = {k: _image(tmp_path / f"{k}.png", i) for i, k in enumerate("ab")}
    errors = []

    def answer(k, r):
        try:
            box = (r % 9, r % 9 + 5, 0, 4) if k == "a" else (0, 4, r % 11, r % 11 + 6)
            store.record_proposal(k, paths[k], _mask(box=box), [[r, 1 if k == "a" else 2]])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    for r in range(20):
        threads = [threading.Thread(target=answer, args=(k, r)) for k in "ab"]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for k in "ab":
            p = store.proposal(k, paths[k])
            box = (r % 9, r % 9 + 5, 0, 4) if k == "a" else (0, 4, r % 11, r % 11 + 6)
            assert p is not None and p.clicks["foreground"] == [[float(r), 1.0 if k == "a" else 2.0]]
            assert np.array_equal(np.load(p.mask_path), _mask(box=box))
    assert not errors


def test_a_pair_is_trained_under_the_clicks_the_served_network_reads(tmp_path):
    """HumanPaird maps an item's clicks as inference maps a request's (PromptImaged, then the network's reading of its
    click channels), and its proposal as the label is resized."""
    from monai.data import MetaTensor

    from bundle.guidance import guidance_to_points
    from bundle.human_pairs import HumanPaird
    from bundle.inference import PromptImaged

    h, w, s = 37, 53, 64
    clicks = {"foreground": [[0, 0], [52, 36], [17.4, 9.6]], "background": [[30, 20]]}
    image = torch.rand(3, w, h)  # (C, X, Y), as MONAI loads a PNG for inference
    served = PromptImaged(image_size=s)({"image": MetaTensor(image), **clicks})["image"]
    want_points, want_labels = guidance_to_points(served[None, 3:], 16)
    proposal = np.zeros((h, w), np.uint8)
    proposal[5:20, 10:40] = 1
    np.save(tmp_path / "p.npy", proposal)
    out = HumanPaird(image_size=s)({"image": image.permute(0, 2, 1), "proposal": str(tmp_path / "p.npy"),
                                    "clicks": clicks})
    assert torch.equal(out["human_points"], want_points[0].float())
    assert torch.equal(out["human_point_labels"], want_labels[0].long())
    assert int((out["human_point_labels"] == 1).sum()) == 3 and int((out["human_point_labels"] == 0).sum()) == 1
    from monai.transforms import Resize

    assert torch.equal(out["human_loser"], Resize((s, s), mode="nearest")(torch.from_numpy(proposal[None]).float()))
    assert float(out["human_pair"]) == 1.0


def test_items_with_and_without_a_pair_collate_into_one_batch(tmp_path):
    """A MONAI Label datastore mixes labels with and without a human pair; a batch of both must collate (it
    failed with "'Tensor' object has no attribute 'meta'" when the loser of a pair was a MetaTensor)."""
    from monai.data import MetaTensor, list_data_collate

    from bundle.human_pairs import KEYS, HumanPaird

    proposal = np.zeros((37, 53), np.uint8)
    proposal[5:20, 10:40] = 1
    np.save(tmp_path / "p.npy", proposal)
    t = HumanPaird(image_size=64)
    paired = t({"image": MetaTensor(torch.rand(3, 37, 53)), "proposal": str(tmp_path / "p.npy"),
                "clicks": {"foreground": [[12, 8]]}})
    plain = t({"image": MetaTensor(torch.rand(3, 37, 53))})
    assert float(paired["human_pair"]) == 1.0 and float(plain["human_pair"]) == 0.0
    paired, plain = ({k: item[k] for k in ("image", *KEYS)} for item in (paired, plain))  # as train.yaml selects
    for first, second in ((paired, plain), (plain, paired)):
        batch = list_data_collate([first, second])
        assert batch["human_loser"].shape == (2, 1, 64, 64)


@pytest.mark.parametrize("change, reason", [
    ({"proposal": "missing.npy"}, "unreadable"),
    ({"shape": (10, 10)}, "has size (10, 10) but its image has size (37, 53)"),
    ({"clicks": {"foreground": [[60, 1]]}}, "are not what the server answers"),
    ({"clicks": {"background": [[1, 1]]}}, "are not what the server answers"),
    ({"clicks": [[1, 1]]}, "clicks must be"),
])
def test_an_unusable_proposal_trains_as_a_plain_label(tmp_path, caplog, change, reason):
    from bundle.human_pairs import HumanPaird

    np.save(tmp_path / "p.npy", np.ones(change.get("shape", (37, 53)), np.uint8))
    item = {"image": torch.rand(3, 37, 53), "proposal": str(tmp_path / change.get("proposal", "p.npy")),
            "clicks": change.get("clicks", {"foreground": [[3, 4]]})}
    out = HumanPaird(image_size=64)(item)
    assert float(out["human_pair"]) == 0.0 and not out["human_loser"].any()
    assert (out["human_point_labels"] == -1).all() and out["human_points"].shape == (32, 2)
    assert reason in caplog.text and "trains as a plain label" in caplog.text


def test_the_term_compares_with_the_reference_and_its_dpo_step_prefers_the_saved_label(tiny_net):
    from bundle.engines import decode_actor_and_reference
    from bundle.human_pairs import HumanPairLoss
    from bundle.networks.decoding import upsample

    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64)
    points = torch.tensor([[[[20.0, 30.0], [0.0, 0.0]]], [[[40.0, 10.0], [5.0, 5.0]]]])  # (B, N=1, P=2, 2)
    labels = torch.tensor([[[1, -1]], [[1, 0]]])
    winner = torch.zeros(2, 64, 64)
    winner[:, 20:44, 10:50] = 1
    loser = torch.zeros(2, 64, 64)
    loser[:, 0:10, 0:10] = 1
    loss_fn = HumanPairLoss(beta=1.0, lambda_human=0.5)
    index = torch.tensor([0, 1])

    def terms():
        out = decode_actor_and_reference(tiny_net, images, points, labels, (64, 64), (index, points, labels))
        low, iou, ref = out[3]
        return loss_fn(upsample(low[:, 0], (64, 64)), upsample(ref[:, 0], (64, 64)), iou[:, 0], winner, loser)

    first = terms()
    # the actor is the reference at the start: r = 0 for both masks, each pair costs log 2
    assert abs(float(first["human_dpo"]) - math.log(2)) < 1e-6 and float(first["human_margins"]) == 0.0
    assert float(first["human_pairs"]) == 2
    assert torch.isclose(first["loss"], 0.5 * (first["human_dpo"] + first["human_sup"]))
    params = [p for p in tiny_net.parameters() if p.requires_grad]
    state = {id(p): p.detach().clone() for p in params}
    # gradient steps on the DPO term raise the saved label's reward over the proposal's
    opt = torch.optim.SGD(params, lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        terms()["human_dpo"].backward()
        opt.step()
    after = terms()
    assert float(after["human_margins"]) > 0 and float(after["human_dpo"]) < math.log(2)
    # steps on the whole term (DPO + SUP) lower it and the BCE on the saved label
    with torch.no_grad():
        for p in params:
            p.copy_(state[id(p)])
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        terms()["loss"].backward()
        opt.step()
    after = terms()
    assert float(after["loss"]) < float(first["loss"]) and float(after["human_sup"]) < float(first["human_sup"])


def test_a_proposal_saved_unchanged_carries_no_preference_but_its_label_is_supervised():
    from bundle.human_pairs import HumanPairLoss

    torch.manual_seed(0)
    z, z_ref, iou = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2, 3)
    w = (torch.rand(2, 8, 8) > 0.5).float()
    loser = w.clone()
    loser[1] = 1 - loser[1]  # only the second pair differs
    out = HumanPairLoss(beta=0.1)(z, z_ref, iou, w, loser)
    assert float(out["human_pairs"]) == 1
    slot = iou.argmax(-1)
    zz = torch.stack([z[b, slot[b]] for b in range(2)])
    assert torch.isclose(out["human_sup"], torch.nn.functional.binary_cross_entropy_with_logits(zz, w))
    tied = HumanPairLoss(beta=0.1)(z, z_ref, iou, w, w)
    assert float(tied["human_pairs"]) == 0 and float(tied["human_dpo"]) == 0.0
    with pytest.raises(ValueError, match="lambda_human must be a finite number >= 0"):
        HumanPairLoss(lambda_human=-1)


def _trainer(tmp_path, items, **overrides):
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(tmp_path), "model_size": "tiny", "lora_rank": 4, "image_size": 64,
                   "batch_size": 2, "max_epochs": 1, "n_prompt_sets": 2, "train#handlers": [],
                   "train#dataset#data": items, **overrides})
    parser.get_parsed_content("initialize")
    return parser.get_parsed_content("train#trainer")


def test_the_trainer_adds_the_human_term_beside_sampos_unchanged_terms(tmp_path):
    from bundle.data.datalist import load_datalist
    from bundle.data.synthetic import ensure_dataset

    plain = load_datalist(ensure_dataset(str(tmp_path / "data"), n_train=2, n_val=1, n_test=1), "training")
    paired = []
    for i, item in enumerate(plain):
        proposal = np.zeros((256, 256), np.uint8)
        proposal[:40, :40] = 1  # not the label
        np.save(tmp_path / f"p{i}.npy", proposal)
        paired.append({**item, "proposal": str(tmp_path / f"p{i}.npy"),
                       "clicks": {"foreground": [[100, 120]], "background": [[3, 3]]}})
    outputs = {}
    for name, items, extra in (("sampo", plain, {"human_pairs": False}), ("no pair", plain, {}),
                               ("pairs", paired, {"lambda_human": 0.5})):
        trainer = _trainer(tmp_path / name, items, **extra)
        trainer.run()
        outputs[name] = trainer.state.output[0]
    sampo, none, pairs = outputs["sampo"], outputs["no pair"], outputs["pairs"]
    assert "human_pairs" not in sampo
    for key in ("loss", "po1", "po2", "sup", "iou_head"):  # no pair in the batch: SAMPO exactly
        assert float(none[key]) == float(sampo[key]), key
    assert float(none["human_pairs"]) == 0
    for key in ("po1", "po2", "sup", "iou_head"):  # SAMPO's simulated pairs unchanged beside the human ones
        assert float(pairs[key]) == float(sampo[key]), key
    assert float(pairs["human_pairs"]) == 2 and abs(float(pairs["human_dpo"]) - math.log(2)) < 1e-5
    expected = float(sampo["loss"]) + 0.5 * (float(pairs["human_dpo"]) + float(pairs["human_sup"]))
    assert abs(float(pairs["loss"]) - expected) < 1e-5


def test_a_datalist_proposal_is_relative_to_the_datalist_like_image_and_label(tmp_path):
    from bundle.data.datalist import load_datalist

    entry = {"image": "images/a.png", "label": "labels/a.npy", "proposal": "pairs/a.npy",
             "clicks": {"foreground": [[1, 2]]}}
    (tmp_path / "datalist.json").write_text(json.dumps({"task_family": "nuclei", "classes": {"1": "n"},
                                                        "training": [entry, {"image": "b.png", "label": "b.npy"}]}),
                                            encoding="utf-8")
    with_pair, plain = load_datalist(tmp_path / "datalist.json", "training")
    assert with_pair["proposal"] == str(tmp_path / "pairs" / "a.npy") and with_pair["clicks"] == entry["clicks"]
    assert "proposal" not in plain
