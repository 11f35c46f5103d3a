"""The one DPO core (bundle/dpo.py) on hand-computed cases, and the reward region in the three objectives that call
it: SAMPO's PO1 / PO2, the human pairs and paper 003's ranked loss."""

import math

import pytest
import torch

from bundle.dpo import RewardRegion, bernoulli_log_likelihood, disagreement, dpo_loss, merge_terms, pair_terms
from bundle.human_pairs import HumanPairLoss
from bundle.preference import SAMPOLoss
from bundle.virtual_annotator import RankedDPOLoss, Ranking


def _l(z, y):
    """l_p(y | z) of one pixel, written out."""
    return y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 / (1 + math.exp(z)))


def _rho(z, zr, y):
    return _l(z, y) - _l(zr, y)


# one pair on a 1 x 4 map: the masks differ on pixels 1 and 2
Z, ZR = [2.0, 1.0, -0.5, -2.0], [1.0, 0.0, 0.5, -1.0]
W, L = [1, 1, 0, 0], [1, 0, 1, 0]


def _one_pair(region, beta=0.5):
    z = torch.tensor([Z, Z]).view(2, 1, 4).requires_grad_()
    zr = torch.tensor([ZR, ZR]).view(2, 1, 4)
    masks = torch.tensor([W, L], dtype=torch.float).view(2, 1, 4)
    return z, pair_terms(region, beta, z, zr, masks, torch.tensor([0]), torch.tensor([1]))


def test_the_core_matches_a_hand_computed_pair():
    beta = 0.5
    for region, r in ((RewardRegion("image"), lambda y: sum(_rho(a, b, c) for a, b, c in zip(Z, ZR, y)) / 4),
                      (RewardRegion("image", loglik_reduction="sum"),
                       lambda y: sum(_rho(a, b, c) for a, b, c in zip(Z, ZR, y))),
                      (RewardRegion("disagreement"), lambda y: sum(_rho(Z[p], ZR[p], y[p]) for p in (1, 2)) / 2)):
        _, out = _one_pair(region, beta)
        margin = beta * (r(W) - r(L))
        assert float(out["margins"]) == pytest.approx(margin, abs=1e-6), region
        assert float(out["chosen_rewards"]) == pytest.approx(beta * r(W), abs=1e-6)
        assert float(out["rejected_rewards"]) == pytest.approx(beta * r(L), abs=1e-6)
        assert float(out["loss"]) == pytest.approx(math.log(1 + math.exp(-margin)), abs=1e-6)
        assert float(out["accuracies"]) == float(margin > 0) and float(out["pairs"]) == 1
        assert float(out["disagreement_fraction"]) == pytest.approx(0.5)
    # the agreeing pixels cancel in r(y_w) - r(y_l) of one logit map: image = disagreement * |D| / P
    _, image = _one_pair(RewardRegion("image"))
    _, band = _one_pair(RewardRegion("disagreement"))
    assert float(image["margins"]) == pytest.approx(float(band["margins"]) * 2 / 4, abs=1e-6)


def test_bernoulli_log_likelihood_is_the_image_reward_of_the_core():
    z, zr = torch.tensor(Z).view(1, 4), torch.tensor(ZR).view(1, 4)
    y = torch.tensor(W, dtype=torch.float).view(1, 4)
    written = sum(_l(a, c) for a, c in zip(Z, W)) / 4
    assert float(bernoulli_log_likelihood(z, y)) == pytest.approx(written, abs=1e-6)
    r_w, _, _, _ = RewardRegion("image").rewards(z[None], zr[None], y[None], torch.tensor([0]), torch.tensor([0]))
    assert float(r_w) == pytest.approx(written - sum(_l(b, c) for b, c in zip(ZR, W)) / 4, abs=1e-6)


def _k_pixel_pair(size, k=5, seed=0):
    """A pair on a size x size map whose masks differ on the same k pixels with the same logits there; the logits
    elsewhere are random, so only the region decides what the margin sees."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(size, size, generator=g) * 2
    zr = torch.randn(size, size, generator=g)
    w = (torch.rand(size, size, generator=g) > 0.5).float()
    l = w.clone()
    for i in range(k):
        l[0, i] = 1 - w[0, i]
        z[0, i], zr[0, i] = 0.3 * i - 0.5, 0.1 * i  # the same values at every size
        w[0, i] = float(i % 2)
        l[0, i] = 1 - w[0, i]
    return torch.stack([z, z]), torch.stack([zr, zr]), torch.stack([w, l])


def _margin(region, size, k=5):
    z, zr, masks = (x.double() for x in _k_pixel_pair(size, k))  # float32 loses ~1e-3 of an image-mean margin at 64^2
    return float(pair_terms(region, 1.0, z, zr, masks, torch.tensor([0]), torch.tensor([1]))["margins"])


def test_disagreement_margin_does_not_depend_on_the_image_size_and_image_margin_scales_as_k_over_p():
    band = [_margin(RewardRegion("disagreement"), s) for s in (8, 16, 64)]
    assert band[0] != 0 and band == pytest.approx([band[0]] * 3, rel=1e-5)
    image = [_margin(RewardRegion("image"), s) for s in (8, 16, 64)]
    for s, m in zip((8, 16, 64), image):
        assert m == pytest.approx(band[0] * 5 / s ** 2, rel=1e-4)  # k / P of the pair's own margin
    assert image[2] == pytest.approx(image[0] * (8 / 64) ** 2, rel=1e-4)


@pytest.mark.parametrize("dilation", [0, 2])
def test_the_disagreement_gradient_is_zero_outside_the_dilated_region(dilation):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, 16, generator=g).requires_grad_()
    zr = torch.randn(2, 16, 16, generator=g)
    w = torch.zeros(16, 16)
    w[4:8, 4:8] = 1
    l = w.clone()
    l[6, 9] = 1  # one pixel outside the winner
    l[4, 4] = 0  # and one inside it
    masks = torch.stack([w, l])
    out = pair_terms(RewardRegion("disagreement", dilation), 1.0, z, zr, masks, torch.tensor([0]), torch.tensor([1]))
    (grad,) = torch.autograd.grad(out["loss"], z)
    band = disagreement(w, l, dilation) > 0
    assert int(band.sum()) == (2 if dilation == 0 else 2 * 25)  # two 5 x 5 squares that do not overlap
    assert grad[:, ~band].abs().max() == 0
    assert (grad[0, band].abs() > 0).all() and (grad[1, band].abs() > 0).all()
    # image: every pixel gets a gradient, the agreeing ones through the two candidates' logit maps
    out = pair_terms(RewardRegion("image"), 1.0, z, zr, masks, torch.tensor([0]), torch.tensor([1]))
    (grad,) = torch.autograd.grad(out["loss"], z)
    assert (grad[:, ~band].abs() > 0).all()


def test_an_empty_region_or_a_tie_is_left_out_and_does_not_dilute_the_mean():
    z, zr, masks = _k_pixel_pair(8)
    z = z.requires_grad_()
    masks = torch.stack([masks[0], masks[1], masks[0]])  # candidate 2 equals candidate 0: an empty region
    z3, zr3 = torch.cat([z, z[:1]]), torch.cat([zr, zr[:1]])
    for region in (RewardRegion("image"), RewardRegion("disagreement", 1)):
        one = pair_terms(region, 1.0, z3, zr3, masks, torch.tensor([0]), torch.tensor([1]))
        both = pair_terms(region, 1.0, z3, zr3, masks, torch.tensor([0, 0]), torch.tensor([1, 2]))
        assert float(both["pairs"]) == 1 and float(both["loss"]) == pytest.approx(float(one["loss"]))
        assert float(both["disagreement_fraction"]) == pytest.approx(5 / 64)
        tie = pair_terms(region, 1.0, z3, zr3, masks, torch.tensor([0, 0]), torch.tensor([1, 2]),
                         tie=torch.tensor([True, False]))
        assert float(tie["pairs"]) == 0 and float(tie["loss"]) == 0.0 and float(tie["margins"]) == 0.0
        assert tie["loss"].requires_grad  # zero with a gradient: an objective without pairs adds nothing
    none = dpo_loss(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert float(none["loss"]) == 0.0 and float(none["pairs"]) == 0 and float(none["accuracies"]) == 0.0


def test_merged_terms_are_means_weighted_by_pairs():
    a = dpo_loss(torch.tensor([1.0, 3.0]), torch.tensor([True, True]), fraction=torch.tensor([0.1, 0.3]))
    b = dpo_loss(torch.tensor([-2.0]), torch.tensor([True]), fraction=torch.tensor([0.6]))
    merged = merge_terms([a, b, dpo_loss(torch.zeros(1), torch.tensor([False]))])
    assert float(merged["pairs"]) == 3 and float(merged["margins"]) == pytest.approx(2 / 3)
    assert float(merged["accuracies"]) == pytest.approx(2 / 3)
    assert float(merged["disagreement_fraction"]) == pytest.approx(1.0 / 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"reward_region": "band"}, "reward_region must be one of ('image', 'disagreement')"),
    ({"region_dilation": -1}, "region_dilation must be an integer >= 0"),
    ({"region_dilation": 1.5}, "region_dilation must be an integer >= 0"),
    ({"loglik_reduction": "max"}, "loglik_reduction must be 'mean' or 'sum'"),
])
def test_bad_region_settings_are_refused_in_every_objective(kwargs, message):
    for make in (SAMPOLoss, HumanPairLoss, RankedDPOLoss):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            make(**kwargs)
    with pytest.raises(ValueError, match="rater 'best' rewards one candidate"):
        RankedDPOLoss(rater="best", reward_region="disagreement")


# ---- the three objectives with reward_region: disagreement, by hand ------------------------------------------
def test_sampo_pairs_get_the_mean_over_their_own_disagreement():
    # one image, N = 2 prompt sets, M = 1 slot, 1 x 4 pixels: PO1 compares set 0 (IoU 1) with set 1
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).view(1, 1, 4)
    z0, z1 = [2.0, 1.0, -0.5, -2.0], [1.5, -0.3, 0.7, -1.0]  # set 1's mask [1, 0, 1, 0]
    logits = torch.tensor([z0, z1]).view(1, 2, 1, 1, 4)
    ref = torch.tensor([ZR, ZR]).view(1, 2, 1, 1, 4)
    beta = 0.7
    out = SAMPOLoss(beta=beta, use_iou_head=False, use_po2=False, reward_region="disagreement")(logits, ref, target)
    r_w = (_rho(z0[1], ZR[1], 1) + _rho(z0[2], ZR[2], 0)) / 2
    r_l = (_rho(z1[1], ZR[1], 0) + _rho(z1[2], ZR[2], 1)) / 2
    assert float(out["margins"]) == pytest.approx(beta * (r_w - r_l), abs=1e-6)
    assert float(out["po1"]) == pytest.approx(math.log(1 + math.exp(-beta * (r_w - r_l))), abs=1e-6)
    assert float(out["disagreement_fraction"]) == pytest.approx(0.5) and float(out["pairs"]) == 1


def test_human_pairs_reward_the_region_the_annotator_changed():
    z = torch.tensor(Z).view(1, 1, 1, 4).requires_grad_()
    zr = torch.tensor(ZR).view(1, 1, 1, 4)
    winner, loser = torch.tensor([W], dtype=torch.float).view(1, 1, 4), torch.tensor([L], dtype=torch.float).view(1, 1, 4)
    beta = 0.5
    out = HumanPairLoss(beta, 1.0, reward_region="disagreement")(z, zr, torch.ones(1, 1), winner, loser)
    margin = beta * sum(_rho(Z[p], ZR[p], W[p]) - _rho(Z[p], ZR[p], L[p]) for p in (1, 2)) / 2
    assert float(out["human_margins"]) == pytest.approx(margin, abs=1e-6)
    assert float(out["human_dpo"]) == pytest.approx(math.log(1 + math.exp(-margin)), abs=1e-6)
    assert float(out["human_disagreement_fraction"]) == pytest.approx(0.5) and float(out["human_pairs"]) == 1
    (grad,) = torch.autograd.grad(out["human_dpo"], z)
    assert grad[..., [0, 3]].abs().max() == 0 and (grad[..., [1, 2]].abs() > 0).all()
    image = HumanPairLoss(beta, 1.0)(z, zr, torch.ones(1, 1), winner, loser)
    assert float(image["human_margins"]) == pytest.approx(margin * 2 / 4, abs=1e-6)  # one map: diluted by |D| / P


def test_each_ranked_comparison_uses_its_own_band():
    cands = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # Y1..Y4, nested as thresholding makes them
    logits, ref = torch.tensor(Z).view(1, 1, 4), torch.tensor(ZR).view(1, 1, 4)
    ranking = Ranking(order=torch.tensor([[0, 1, 2, 3]]), score=torch.tensor([[0.9, 0.6, 0.3, 0.1]]))
    candidates = torch.tensor(cands, dtype=torch.bool).view(1, 4, 1, 4)
    out = RankedDPOLoss(1.0, 0.5, reward_region="disagreement")(logits, ref, candidates, ranking)

    def band(a, b):
        d = [p for p in range(4) if cands[a][p] != cands[b][p]]
        return sum(_rho(Z[p], ZR[p], cands[a][p]) - _rho(Z[p], ZR[p], cands[b][p]) for p in d) / len(d)

    margin = 1.0 * band(0, 3) + 0.5 * band(1, 2)  # Y1 / Y4 differ on pixels 0-2, Y2 / Y3 on pixel 1 only
    assert float(out["margins"]) == pytest.approx(margin, abs=1e-6)
    assert float(out["disagreement_fraction"]) == pytest.approx(3 / 4) and float(out["pairs"]) == 1
    tied = Ranking(order=ranking.order, score=torch.tensor([[0.9, 0.5, 0.5, 0.1]]))
    assert float(RankedDPOLoss(1.0, 0.5, reward_region="disagreement")(logits, ref, candidates, tied)["margins"]) == \
        pytest.approx(band(0, 3), abs=1e-6)


def test_the_gradient_ratio_diagnostic_is_off_by_default_and_measures_the_logits_gradients():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 2, 8, 8, generator=g).requires_grad_()
    ref = torch.randn(1, 3, 2, 8, 8, generator=g)
    target = (torch.rand(1, 8, 8, generator=g) > 0.5).float()
    assert "gradient_ratio" not in SAMPOLoss(beta=0.1, use_iou_head=False)(logits, ref, target)
    loss = SAMPOLoss(beta=0.1, lambda_dw=2.0, use_iou_head=False, log_gradient_ratio=True)
    out = loss(logits, ref, target)
    (g_pref,) = torch.autograd.grad(2.0 * (out["po1"] + out["po2"]), logits, retain_graph=True)
    (g_sup,) = torch.autograd.grad(out["sup"], logits, retain_graph=True)
    assert float(out["gradient_ratio"]) == pytest.approx(float(g_pref.norm() / g_sup.norm()), rel=1e-5)
    assert 0 < float(out["gradient_ratio"]) and not out["gradient_ratio"].requires_grad
    with pytest.raises(ValueError, match="log_gradient_ratio must be true or false"):
        SAMPOLoss(log_gradient_ratio="sometimes")
