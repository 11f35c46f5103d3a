"""Preference mining and the SAMPO loss on small hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from bundle.metrics import overlap
from bundle.dpo import bernoulli_log_likelihood
from bundle.preference import SAMPOLoss, mine_pairs

LOG2 = math.log(2.0)


def test_bernoulli_log_likelihood_by_hand():
    z = torch.tensor([[0.0, math.log(3)], [-math.log(3), 0.0]])
    y = torch.tensor([[1, 1], [0, 0]])
    total = 2 * math.log(0.5) + 2 * math.log(0.75)
    assert bernoulli_log_likelihood(z, y, "sum").item() == pytest.approx(total)
    assert bernoulli_log_likelihood(z, y, "mean").item() == pytest.approx(total / 4)
    with pytest.raises(ValueError, match="reduction"):
        bernoulli_log_likelihood(z, y, "max")


def test_bernoulli_log_likelihood_equals_the_two_log_sigmoids_and_their_gradient_at_extreme_logits():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(2, 3, 8, 8, generator=g) * 30).requires_grad_()  # |z| up to ~100: saturated sigmoids
    y = torch.rand(2, 3, 8, 8, generator=g) > 0.5
    ll = bernoulli_log_likelihood(z, y, "mean")
    yf = y.float()
    ref = (yf * torch.nn.functional.logsigmoid(z) + (1 - yf) * torch.nn.functional.logsigmoid(-z)).flatten(-2).mean(-1)
    assert torch.isfinite(ll).all() and torch.allclose(ll, ref, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(ll.sum(), z)
    (ref_grad,) = torch.autograd.grad(ref.sum(), z)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-8)
    # one mask against several candidates broadcasts, as the two log-sigmoids did
    one = y[:, :1]
    assert torch.allclose(bernoulli_log_likelihood(z, one), bernoulli_log_likelihood(z, one.expand_as(z)))
    assert torch.allclose(bernoulli_log_likelihood(z[:, :1], y), bernoulli_log_likelihood(z[:, :1].expand_as(y), y))


def test_batched_overlap_by_hand():
    a = torch.tensor([[1, 1], [0, 0]]).bool()
    g = torch.tensor([[1, 0], [1, 0]]).bool()
    dice, iou = overlap(a, g)
    assert iou.item() == pytest.approx(1 / 3) and dice.item() == pytest.approx(0.5)
    assert overlap(torch.zeros(2, 2), torch.zeros(2, 2))[1].item() == 1.0
    assert overlap(torch.zeros(2, 2), g)[1].item() == 0.0
    # batched: masks (2, 2, 2) against one target broadcast
    assert overlap(torch.stack([a, g]), g)[1].tolist() == pytest.approx([1 / 3, 1.0])


def test_mine_pairs_by_hand():
    iou = torch.tensor([[0.1, 0.5, 0.3], [0.4, 0.2, 0.3]])  # N=2 prompt sets, M=3 slots
    inter, intra = mine_pairs(iou)
    # slot 0: set 1 beats set 0; slot 1: set 0 beats set 1; slot 2: a tie
    assert inter.winner[:2].tolist() == [3, 1] and inter.loser[:2].tolist() == [0, 4]
    assert inter.valid.tolist() == [True, True, False]
    # set 0: slot 1 beats slot 0; set 1: slot 0 beats slot 1
    assert intra.winner.tolist() == [1, 3] and intra.loser.tolist() == [0, 4]
    assert intra.valid.tolist() == [True, True]
    # a batch of two images: the second image's indices are offset by N * M
    inter2, intra2 = mine_pairs(torch.stack([iou, iou]))
    assert inter2.winner.tolist() == inter.winner.tolist() + [w + 6 for w in inter.winner.tolist()]
    assert intra2.valid.tolist() == intra.valid.tolist() * 2


def _halves(n=4):
    left = torch.zeros(n, n)
    left[:, : n // 2] = 1
    return left, left.T.clone()


def _two_sets(mask0, mask1, a0=2.0, a1=1.0, m=3):
    """Actor logits: set 0 predicts mask0 with confidence a0 in every slot, set 1 predicts mask1 with a1."""
    s0 = (mask0 * 2 - 1) * a0
    s1 = (mask1 * 2 - 1) * a1
    return torch.stack([s0.expand(m, -1, -1), s1.expand(m, -1, -1)])


def test_identical_actor_and_reference_give_log2_per_pair():
    left, top = _halves()
    logits = _two_sets(left, top)
    out = SAMPOLoss(beta=5.0, use_iou_head=False)(logits, logits.clone(), left)
    assert out["po1"].item() == pytest.approx(LOG2, abs=1e-7)
    assert out["margins"].item() == 0.0 and out["accuracies"].item() == 0.0


def test_swapping_winner_and_loser_flips_the_margin():
    left, top = _halves()
    logits, ref = _two_sets(left, top), torch.zeros(2, 3, 4, 4)
    beta = 3.0
    expected = beta * (F.logsigmoid(torch.tensor(2.0)) - F.logsigmoid(torch.tensor(1.0))).item()
    loss = SAMPOLoss(beta=beta, use_po2=False, use_iou_head=False)
    as_left = loss(logits, ref, left)  # set 0 (IoU 1) wins over set 1 (IoU 1/3)
    as_top = loss(logits, ref, top)  # now set 1 wins
    assert as_left["margins"].item() == pytest.approx(expected, rel=1e-5)
    assert as_top["margins"].item() == pytest.approx(-expected, rel=1e-5)
    assert as_left["accuracies"].item() == 1.0 and as_top["accuracies"].item() == 0.0
    assert as_left["po1"].item() == pytest.approx(-math.log(1 / (1 + math.exp(-expected))), rel=1e-5)


def test_equal_iou_pairs_are_left_out_of_the_mean():
    left, top = _halves()
    logits, ref = _two_sets(left, top), torch.zeros(2, 3, 4, 4)
    logits[1, 2] = logits[0, 2]  # slot 2: both prompt sets give the same mask -> equal IoU, no preference
    beta = 2.0
    out = SAMPOLoss(beta=beta, use_iou_head=False)(logits, ref, left)
    margin = beta * (F.logsigmoid(torch.tensor(2.0)) - F.logsigmoid(torch.tensor(1.0)))
    pair = -F.logsigmoid(margin).item()
    assert out["po1"].item() == pytest.approx(pair, rel=1e-6)  # mean over the 2 valid slots, not 2/3 of it
    # PO2: set 0's three slots are the same mask (tie); set 1 has IoU 1 in slot 2 vs 1/3 in slots 0, 1
    r_w = F.logsigmoid(torch.tensor(2.0)) - math.log(0.5)
    r_l = F.logsigmoid(torch.tensor(1.0)) - math.log(0.5)
    assert out["po2"].item() == pytest.approx(-F.logsigmoid(beta * (r_w - r_l)).item(), rel=1e-6)
    assert out["pairs"].item() == 3  # 2 inter + 1 intra


def test_sup_is_bce_on_winner_and_loser_logits():
    g = torch.ones(2, 2)
    z0, z1 = 1.5, -0.5
    logits = torch.stack([torch.full((1, 2, 2), z0), torch.full((1, 2, 2), z1)])  # N=2, M=1
    out = SAMPOLoss(use_iou_head=False)(logits, torch.zeros_like(logits), g)
    b0, b1 = -math.log(1 / (1 + math.exp(-z0))), -math.log(1 / (1 + math.exp(-z1)))
    # pairs: inter (set 0 over set 1) and the two single-slot intra "pairs" (ties: no preference, still supervised)
    expected = (b0 + b0 + b1) / 3 + (b1 + b0 + b1) / 3
    assert out["sup"].item() == pytest.approx(expected, rel=1e-6)


def test_switches_and_weights_compose_the_total():
    left, top = _halves()
    logits, ref = _two_sets(left, top, 1.5, 0.5), torch.zeros(2, 3, 4, 4)
    logits[0, 1] *= 0.5  # make slots differ so PO2 has pairs
    iou_pred = torch.full((2, 3), 0.5)
    full = SAMPOLoss(beta=2.0, lam=0.5, lambda_dw=3.0, lambda_iou=2.0)(logits, ref, left, iou_pred)
    assert full["loss"].item() == pytest.approx(
        3.0 * (full["po1"] + 0.5 * full["po2"]).item() + full["sup"].item() + 2.0 * full["iou_head"].item(), rel=1e-6)
    no_po1 = SAMPOLoss(beta=2.0, lam=0.5, lambda_dw=3.0, lambda_iou=2.0, use_po1=False)(logits, ref, left, iou_pred)
    assert no_po1["loss"].item() == pytest.approx(
        1.5 * full["po2"].item() + full["sup"].item() + 2.0 * full["iou_head"].item(), rel=1e-6)
    sup_only = SAMPOLoss(use_po1=False, use_po2=False, use_iou_head=False)(logits, ref, left)
    assert sup_only["loss"].item() == pytest.approx(full["sup"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        SAMPOLoss(use_po1=False, use_po2=False, use_sup=False)
    # switches given on the command line arrive as strings: "false" must not count as true
    assert SAMPOLoss(use_po1="false", use_po2="False").use_po1 is False
    with pytest.raises(ValueError, match="use_po2 must be true or false, got 'no'"):
        SAMPOLoss(use_po2="no")
    with pytest.raises(ValueError, match="needs iou_pred"):
        SAMPOLoss()(logits, ref, left)


@pytest.mark.parametrize("key,value", [("beta", 0.0), ("beta", -1.0), ("lam", -0.5), ("lambda_dw", -1.0),
                                       ("lambda_iou", -1.0), ("beta", float("nan")), ("beta", "abc")])
def test_weights_that_break_the_objective_are_refused(key, value):
    name = "lambda" if key == "lam" else key
    with pytest.raises(ValueError, match=name):
        SAMPOLoss(**{key: value})


def test_iou_head_term_is_the_mse_to_the_true_iou():
    left, top = _halves()
    logits = _two_sets(left, top)  # set 0 predicts left (IoU 1 with left), set 1 predicts top (IoU 1/3)
    iou_pred = torch.tensor([[0.5, 1.0, 0.0], [0.0, 1 / 3, 1.0]], requires_grad=True)
    out = SAMPOLoss()(logits, torch.zeros_like(logits), left, iou_pred)
    true = torch.tensor([[1.0, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    assert out["iou_head"].item() == pytest.approx(((iou_pred.detach() - true) ** 2).mean().item(), rel=1e-6)
    torch.testing.assert_close(out["iou"], true[None])
    out["loss"].backward()
    assert iou_pred.grad is not None and iou_pred.grad.abs().sum() > 0


def test_an_all_tie_image_adds_no_pair_and_does_not_dilute_the_batch():
    """METHOD.md "Pooling": preference terms are means over the valid pairs of the whole batch."""
    left, top = _halves()
    logits = _two_sets(left, top, 1.5, 0.5)
    logits[0, 1] *= 0.5  # slots differ so PO2 has pairs
    ref = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    tie = torch.full((2, 3, 4, 4), -3.0)  # every candidate empty: all IoUs equal, no preference anywhere
    iou_pred = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"use_sup": False, "use_iou_head": False}):
        loss = SAMPOLoss(beta=2.0, **kwargs)
        alone = loss(logits, ref, left, iou_pred)
        batch = loss(torch.stack([logits, tie]), torch.stack([ref, tie]), torch.stack([left, left]),
                     torch.stack([iou_pred, iou_pred]))
        assert batch["pairs"].item() == alone["pairs"].item() > 0
        for key in ("po1", "po2", "margins", "accuracies"):
            assert batch[key].item() == pytest.approx(alone[key].item(), rel=1e-6), key
    # with only the preference terms on, the loss itself is that of the image alone
    assert batch["loss"].item() == pytest.approx(alone["loss"].item(), rel=1e-6)


def test_gradient_flows_through_actor_only():
    left, top = _halves()
    logits = _two_sets(left, top).requires_grad_(True)
    ref = torch.zeros(2, 3, 4, 4, requires_grad=True)
    SAMPOLoss(beta=2.0, use_iou_head=False)(logits, ref, left)["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert ref.grad is None
