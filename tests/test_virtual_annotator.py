"""Paper 003's virtual-annotator variant: candidates, rater, ranked DPO loss (eq. 5) on hand-computed cases, and the
two-stage schedule run from configs/semi_supervised.yaml (reference = stage-1 model, resume across the boundary,
MLflow, evaluation of stage-2 checkpoints, G seen only by the annotator)."""

import copy
import math
import shutil
from types import SimpleNamespace

import mlflow
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from bundle.data.datalist import load_semi_supervised
from bundle.engines import loss_terms
from bundle.data.synthetic import ensure_dataset
from bundle.semi_supervised import SemiSupervisedTrainer
from bundle.virtual_annotator import RankedDPOLoss, Ranking, VirtualAnnotator, check_thresholds
from conftest import REPO

LOG2 = math.log(2.0)


# ---- the loss on hand-computed cases ---------------------------------------------------------------------------
def _ll(z, y):
    """Pixel-mean Bernoulli log-likelihood, written out."""
    return sum(yi * math.log(1 / (1 + math.exp(-zi))) + (1 - yi) * math.log(1 / (1 + math.exp(zi)))
               for zi, yi in zip(z, y)) / len(z)


# one item, 4 pixels (1 x 4), candidates Y_a..Y_d nested as thresholding makes them
Z = [2.0, 1.0, -0.5, -2.0]
Z_REF = [1.0, 0.0, 0.5, -1.0]
CANDS = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
R = [_ll(Z, y) - _ll(Z_REF, y) for y in CANDS]  # r of each candidate, by hand


def _loss(order, score, beta1=1.0, beta2=0.5, rater="ranking", z=Z, z_ref=Z_REF):
    logits = torch.tensor(z).view(1, 1, 4)
    ref = torch.tensor(z_ref).view(1, 1, 4)
    cands = torch.tensor(CANDS, dtype=torch.bool).view(1, 4, 1, 4)
    ranking = Ranking(order=torch.tensor([order]), score=torch.tensor([score], dtype=torch.float))
    return RankedDPOLoss(beta1, beta2, rater)(logits, ref, cands, ranking)


def test_identical_actor_and_reference_cost_log2():
    out = _loss([0, 1, 2, 3], [0.9, 0.6, 0.3, 0.1], z_ref=Z)
    assert float(out["loss"]) == pytest.approx(LOG2, abs=1e-6)
    assert float(out["margins"]) == pytest.approx(0.0, abs=1e-7) and float(out["pairs"]) == 1


def test_beta_weights_enter_as_written_in_eq5():
    for beta1, beta2 in ((1.0, 0.5), (2.0, 0.25), (3.0, 3.0), (1.0, 0.0)):
        out = _loss([0, 1, 2, 3], [0.9, 0.6, 0.3, 0.1], beta1, beta2)
        inside = beta1 * R[0] + beta2 * R[1] - beta2 * R[2] - beta1 * R[3]  # eq. 5, ungrouped
        assert float(out["margins"]) == pytest.approx(inside, abs=1e-6)
        assert float(out["loss"]) == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), abs=1e-6)
        assert float(out["chosen_rewards"]) == pytest.approx(beta1 * R[0], abs=1e-6)
        assert float(out["rejected_rewards"]) == pytest.approx(beta1 * R[3], abs=1e-6)
        assert float(out["accuracies"]) == float(inside > 0)


def test_swapping_y1_and_y4_flips_the_margin():
    score = [0.9, 0.6, 0.3, 0.1]
    # beta2 = 0: the margin is beta1 (r(Y1) - r(Y4)), swapping Y1 and Y4 flips it
    m = float(_loss([0, 1, 2, 3], score, 1.0, 0.0)["margins"])
    swapped = float(_loss([3, 1, 2, 0], score, 1.0, 0.0)["margins"])
    assert m != 0 and swapped == pytest.approx(-m, abs=1e-6)
    # with beta2: the beta1 part flips, the beta2 part stays; the reversed ranking flips all of it
    m = float(_loss([0, 1, 2, 3], score)["margins"])
    swapped = float(_loss([3, 1, 2, 0], score)["margins"])
    assert swapped == pytest.approx(-(R[0] - R[3]) + 0.5 * (R[1] - R[2]), abs=1e-6)
    assert float(_loss([3, 2, 1, 0], score)["margins"]) == pytest.approx(-m, abs=1e-6)


def test_ties_drop_their_comparison_and_all_tied_items_add_nothing():
    # Y2 = Y3: only beta1 (r(Y1) - r(Y4)) is left
    out = _loss([0, 1, 2, 3], [0.9, 0.5, 0.5, 0.1])
    assert float(out["margins"]) == pytest.approx(R[0] - R[3], abs=1e-6)
    # Y1 = Y2 or Y3 = Y4: same side, nothing changes
    assert float(_loss([0, 1, 2, 3], [0.9, 0.9, 0.1, 0.1])["margins"]) == pytest.approx(
        R[0] - R[3] + 0.5 * (R[1] - R[2]), abs=1e-6)
    # all tied: no contribution; in a batch with a valid item the mean is that item's, not halved by a zero
    tied = _loss([0, 1, 2, 3], [0.4, 0.4, 0.4, 0.4])
    assert float(tied["pairs"]) == 0 and float(tied["loss"]) == 0.0
    logits = torch.tensor([Z, Z]).view(2, 1, 4)
    ref = torch.tensor([Z_REF, Z_REF]).view(2, 1, 4)
    cands = torch.tensor(CANDS, dtype=torch.bool).view(1, 4, 1, 4).expand(2, -1, -1, -1)
    ranking = Ranking(order=torch.tensor([[0, 1, 2, 3]] * 2), score=torch.tensor([[0.9, 0.6, 0.3, 0.1], [0.4] * 4]))
    both = RankedDPOLoss(1.0, 0.5)(logits, ref, cands, ranking)
    one = _loss([0, 1, 2, 3], [0.9, 0.6, 0.3, 0.1])
    assert float(both["loss"]) == pytest.approx(float(one["loss"])) and float(both["pairs"]) == 1


def test_best_candidate_only():
    out = _loss([1, 0, 2, 3], [0.8, 0.7, 0.3, 0.1], beta1=2.0, rater="best")
    assert float(out["margins"]) == pytest.approx(2.0 * R[1], abs=1e-6)
    assert float(_loss([0, 1, 2, 3], [0.5] * 4, rater="best")["pairs"]) == 0


def test_loss_gradient_reaches_the_actor_only():
    logits = torch.tensor(Z).view(1, 1, 4).requires_grad_()
    ref = torch.tensor(Z_REF).view(1, 1, 4).requires_grad_()
    cands = torch.tensor(CANDS, dtype=torch.bool).view(1, 4, 1, 4)
    out = RankedDPOLoss()(logits, ref, cands, Ranking(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[4.0, 3, 2, 1]])))
    out["loss"].backward()
    assert logits.grad.abs().sum() > 0 and ref.grad is None


# ---- candidates and the rater ------------------------------------------------------------------------------------
def _rings():
    """A probability map of nested squares: 0.95 inside 2..6, 0.8 to 1..7, 0.6 to 0..8, 0.4 elsewhere (10 x 10)."""
    p = torch.full((10, 10), 0.4)
    p[0:8, 0:8] = 0.6
    p[1:7, 1:7] = 0.8
    p[2:6, 2:6] = 0.95
    return torch.logit(p)


def test_candidates_are_the_thresholded_probability_map():
    annotator = VirtualAnnotator()
    cands = annotator.candidates(_rings())
    assert cands.shape == (4, 10, 10) and cands.dtype == torch.bool
    assert [int(c.sum()) for c in cands] == [100, 64, 36, 16]  # > 0.3, > 0.5, > 0.7, > 0.9
    p = torch.sigmoid(_rings())
    for c, t in zip(cands, (0.3, 0.5, 0.7, 0.9)):
        assert torch.equal(c, p > t)


def test_rater_orders_by_iou_rates_in_buckets_and_picks_the_best():
    cands = VirtualAnnotator().candidates(_rings())
    g = torch.zeros(10, 10)
    g[1:7, 1:7] = 1  # = the 0.7 candidate: IoUs 36/100, 36/64, 1, 16/36
    ranking = VirtualAnnotator(rater="ranking")(cands, g)
    assert ranking.order.tolist() == [2, 1, 3, 0]
    assert ranking.score.tolist() == pytest.approx([1.0, 36 / 64, 16 / 36, 0.36])
    rating = VirtualAnnotator(rater="rating")(cands, g)  # buckets of 0.25: 0.36 -> 2, 0.5625 -> 3, 1 -> 4, 0.44 -> 2
    assert rating.score.tolist() == [4, 3, 2, 2] and rating.order.tolist() == [2, 1, 0, 3]  # tie: lower threshold first
    assert VirtualAnnotator(rater="best")(cands, g).order[0] == 2
    # batched: items (B, N) share their image's G
    many = VirtualAnnotator()(cands.expand(2, 3, -1, -1, -1), g.expand(2, 1, -1, -1))
    assert many.order.shape == (2, 3, 4) and (many.order == torch.tensor([2, 1, 3, 0])).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: check_thresholds([0.5, 0.3, 0.7, 0.9]), "thresholds must be strictly increasing"),
        (lambda: check_thresholds([0.3, 0.5, 0.5, 0.9]), "thresholds must be strictly increasing"),
        (lambda: check_thresholds([0.0, 0.5, 0.7, 0.9]), r"thresholds must lie strictly inside \(0, 1\)"),
        (lambda: check_thresholds([0.3, 0.5, 0.7, 1.2]), r"outside: \[1.2\]"),
        (lambda: check_thresholds("0.3,0.5"), "thresholds must be a list"),
        (lambda: VirtualAnnotator([0.3, 0.6, 0.9]), "orders exactly 4 candidates"),
        (lambda: VirtualAnnotator(rater="vote"), "rater must be one of"),
        (lambda: RankedDPOLoss(beta1=0.5, beta2=1.0), "beta1 must be >= beta2"),
        (lambda: RankedDPOLoss(beta1=0.0, beta2=0.0), "beta1 must be a finite number > 0"),
        (lambda: RankedDPOLoss(beta1=1.0, beta2=-0.1), "beta2 must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_refused_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_labelled_and_unlabelled_split(tmp_path):
    datalist = ensure_dataset(str(tmp_path / "synthetic"), n_train=10, n_val=1, n_test=1, size=32)
    labelled = load_semi_supervised(datalist, "labelled", 10)
    unlabelled = load_semi_supervised(datalist, "unlabelled", 10)
    names = lambda items: {i["image"] for i in items}  # noqa: E731
    assert len(labelled) == 1 and len(unlabelled) == 9 and not names(labelled) & names(unlabelled)
    from bundle.data.datalist import load_datalist

    assert names(labelled) == names(load_datalist(datalist, "training", fraction=10))  # = a train_fraction 10 run
    assert len(load_semi_supervised(datalist, "unlabelled", 10, alignment_fraction=30)) == 2
    for bad in (0, 100):
        with pytest.raises(ValueError, match=f"labelled_fraction must be one of .* got {bad}"):
            load_semi_supervised(datalist, "unlabelled", bad)
    with pytest.raises(ValueError, match="got 0: the supervised stage needs labelled images"):
        load_semi_supervised(datalist, "labelled", 0)
    with pytest.raises(ValueError, match="alignment_fraction must be one of"):
        load_semi_supervised(datalist, "unlabelled", 20, alignment_fraction=20)


def test_schedule_settings_are_checked(tiny_net):
    from bundle.networks import PromptableSAM
    from bundle.stage_schedule import TwoStageSchedule

    opt = torch.optim.AdamW([p for p in tiny_net.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="stage1_epochs must be an integer >= 1, got 0"):
        TwoStageSchedule(0, tiny_net, opt)
    with pytest.raises(ValueError, match="needs lora_rank >= 1"):
        TwoStageSchedule(1, PromptableSAM("tiny", image_size=64, lora_rank=0), opt)


def test_export_takes_the_trained_network_when_the_run_wrote_no_best_model(tmp_path, tiny_net):
    from bundle.stage_schedule import StagedExport

    live = copy.deepcopy(tiny_net)
    export = StagedExport(str(tmp_path), checkpoint=str(tmp_path / "best_model.pt"), base_network=tiny_net)
    assert export._network(SimpleNamespace(network=live)) is live


def test_run_experiments_evaluates_the_final_state_of_both_stages(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "scripts" / "run_experiments.py"), "--set", "va", "--bundle_root_base",
           str(tmp_path), "--max_epochs", "3", "--train_fraction", "10", "--dry_run"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True, encoding="utf-8").stdout
    for row, epoch in (("f10/va_supervised_10", 3), ("f10/va_aligned_10", 9), ("f10/sampo", 3),
                       ("f100/va_supervised_100", 3)):
        assert f"{row}/seed0/models/checkpoint_epoch={epoch}.pt" in out, (row, out[-2000:])
    assert "configs/semi_supervised.yaml" in out


# ---- the two-stage schedule from configs/semi_supervised.yaml ---------------------------------------------------
TINY = {"model_size": "tiny", "lora_rank": 4, "image_size": 64, "batch_size": 2, "num_threads": 1,
        "synthetic": {"n_train": 6, "n_val": 1, "n_test": 1}, "max_epochs": 1, "stage2_epochs": 1}


def _parser(root, data_dir, export=False, **overrides):
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.yaml"), str(REPO / "configs" / "semi_supervised.yaml")])
    parser.update({"bundle_root": str(root), "dataset_dir": str(data_dir), **TINY, **overrides})
    if not export:  # TorchScript export takes most of a tiny run's time: only where it is tested
        parser["semi#handlers"] = [h for h in parser["semi#handlers"] if h != "@train#export_handler"]
    parser.get_parsed_content("initialize")
    return parser


def _probe(net, reference=False):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 64, 64, generator=g)
    pts, lab = torch.randint(0, 64, (1, 2, 3, 2), generator=g).float(), torch.randint(0, 2, (1, 2, 3), generator=g)
    with torch.no_grad():
        if reference:
            with net.reference():
                return net.decode(net.encode(x), pts, lab)[0]
        return net.decode(net.encode(x), pts, lab)[0]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """One run of 1 supervised + 1 alignment epoch (1 labelled image, 5 unlabelled: 3 iterations), exported."""
    root = tmp_path_factory.mktemp("va_run")
    data = root / "synthetic"
    parser = _parser(root, data, export=True)
    trainer, net = parser.get_parsed_content("semi#trainer"), parser.get_parsed_content("network")
    seen = {"outputs": []}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _outputs(engine):
        seen["outputs"].append(loss_terms(engine.state.output))

    @trainer.on(Events.STARTED)
    def _after_state_handlers(engine):  # registered now: runs after the training state is saved
        @trainer.on(Events.EPOCH_COMPLETED)
        def _keep(engine):
            epoch = engine.state.epoch
            shutil.copy(root / "models" / f"checkpoint_epoch={epoch}.pt", root / f"kept_epoch={epoch}.pt")
            if epoch == 1:
                seen["stage1"] = _probe(net)

    trainer.run()
    seen.update(root=root, data=data, net=net, trainer=trainer, actor=_probe(net), reference=_probe(net, True))
    return seen


def test_stage2_reference_is_the_stage1_model_after_stage2_steps(two_stage):
    stage = [o["stage"] for o in two_stage["outputs"]]
    assert stage == [1, 2, 2, 2]
    first = two_stage["outputs"][1]  # stage 2's first step: actor = reference = stage-1 model
    assert first["pairs"] > 0 and first["loss"] == pytest.approx(LOG2, abs=1e-5)
    assert {"focal", "dice_loss", "iou_head"} <= set(two_stage["outputs"][0])
    assert torch.allclose(two_stage["reference"], two_stage["stage1"], atol=1e-5)
    assert (two_stage["actor"] - two_stage["stage1"]).abs().max() > 1e-4  # the stage-2 steps moved the actor


def test_stage2_checkpoints_load_for_evaluation_and_export(two_stage):
    from bundle.export import load_weights

    root = two_stage["root"]
    fresh = _parser(root / "other", two_stage["data"]).get_parsed_content("network_def")
    load_weights(fresh, root / "models" / "checkpoint_epoch=2.pt")
    assert torch.allclose(_probe(fresh), two_stage["actor"], atol=1e-5)
    assert torch.allclose(_probe(fresh, True), two_stage["stage1"], atol=1e-5)
    assert (root / "models" / "model.ts").is_file() and (root / "models" / "best_model.pt").is_file()


def test_resume_inside_stage2_rebuilds_the_fold_and_continues_the_mlflow_run(two_stage):
    root = two_stage["root"]
    parser = _parser(root, two_stage["data"], stage2_epochs=2)  # resumes from models/checkpoint_epoch=2.pt
    trainer, net = parser.get_parsed_content("semi#trainer"), parser.get_parsed_content("network")
    loaded = {}

    @trainer.on(Events.STARTED)
    def _state(engine):
        loaded.update(epoch=engine.state.epoch, actor=_probe(net), reference=_probe(net, True), stage=engine.stage)

    trainer.run()
    assert loaded["epoch"] == 2 and loaded["stage"] == 2 and trainer.state.epoch == 3
    assert torch.allclose(loaded["actor"], two_stage["actor"], atol=1e-6)
    assert torch.allclose(loaded["reference"], two_stage["stage1"], atol=1e-5)
    assert torch.allclose(_probe(net, True), two_stage["stage1"], atol=1e-5)  # still, after more stage-2 steps

    client = mlflow.MlflowClient(f"sqlite:///{root}/eval/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sampo").experiment_id])
    rid = run.info.run_id
    steps = lambda key: [m.step for m in client.get_metric_history(rid, key)]  # noqa: E731
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("va_")
    assert steps("loss") == list(range(1, 8))
    assert [m.value for m in client.get_metric_history(rid, "stage")] == [1, 2, 2, 2, 2, 2, 2]
    assert steps("focal") == [1] and steps("margins") == list(range(2, 8))
    assert steps("accuracies") == steps("chosen_rewards") == list(range(2, 8))
    assert steps("val_mean_dice") == [1, 2, 3]
    params = run.data.params
    assert params["rater"] == "ranking" and params["beta1"] == "1.0" and params["thresholds"] == "0.3,0.5,0.7,0.9"
    assert params["labelled_fraction"] == "10" and params["labelled_images"] == "1" and params["unlabelled_images"] == "5"


def test_resume_at_the_stage_boundary_folds_in_the_resumed_process(two_stage):
    root = two_stage["root"] / "boundary"
    parser = _parser(root, two_stage["data"], resume_from=str(two_stage["root"] / "kept_epoch=1.pt"))
    trainer, net = parser.get_parsed_content("semi#trainer"), parser.get_parsed_content("network")
    at = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _first(engine):
        if not at:
            at.update(epoch=engine.state.epoch, stage=engine.stage, reference=_probe(net, True), actor=_probe(net))

    trainer.run()
    assert at["epoch"] == 2 and at["stage"] == 2
    assert torch.allclose(at["reference"], two_stage["stage1"], atol=1e-5)
    assert torch.allclose(at["actor"], two_stage["stage1"], atol=1e-5)  # fresh adapters add nothing yet
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4


def test_g_reaches_stage2_only_through_the_annotator(two_stage):
    """The stage-2 loss is the same for any target that induces the same ranking, and changes with the ranking."""
    trainer = two_stage["trainer"]  # in stage 2: actor and reference differ
    holder = SimpleNamespace(network=copy.deepcopy(two_stage["net"]), annotator=trainer.annotator,
                             alignment_loss=trainer.alignment_loss, reference_cache=None, loss_size=None)
    holder.network_pass = lambda fn, *args, **kwargs: fn(holder.network, *args, **kwargs)
    align = SemiSupervisedTrainer.align
    g = torch.Generator().manual_seed(3)
    images = torch.rand(1, 3, 64, 64, generator=g)
    points = torch.tensor([[[[20.0, 20.0], [40.0, 30.0]], [[32.0, 32.0], [10.0, 50.0]]]])
    labels = torch.tensor([[[1, 0], [1, 1]]])
    with torch.no_grad():
        logits, _ = align(holder, images, torch.zeros(1, 1, 64, 64), points, labels)
        cands = trainer.annotator.candidates(logits)

    def ranking_of(target):
        r = trainer.annotator(cands, target)
        return r.order.tolist(), (r.score[..., :-1] > r.score[..., 1:]).tolist()

    # targets to try: the candidates themselves, their unions / differences, shifted and blocky masks
    flat = cands[0].flatten(0, 1).float()
    tries = [flat[i] for i in range(len(flat))] + [torch.roll(flat[i], s, -1) for i in range(len(flat)) for s in (3, 9)]
    tries += [torch.zeros(64, 64).index_fill_(0, torch.arange(a, b), 1) for a, b in ((0, 32), (16, 48), (8, 60))]
    base = tries[0][None, None]
    want = ranking_of(base)
    same = [t for t in tries[1:] if ranking_of(t[None, None]) == want and not torch.equal(t, tries[0])]
    other = [t for t in tries[1:] if ranking_of(t[None, None]) != want]
    assert same and other, "no target with the same / another ranking among the tries"
    loss = lambda target: float(align(holder, images, target[None, None], points, labels)[1]["loss"].detach())  # noqa: E731
    reference = loss(tries[0])
    for t in same:
        assert loss(t) == reference
    assert any(loss(t) != reference for t in other)


def test_a_stage2_state_refuses_another_stage1_length(two_stage):
    parser = _parser(two_stage["root"] / "other_s1", two_stage["data"], max_epochs=2,
                     resume_from=str(two_stage["root"] / "kept_epoch=2.pt"))
    trainer = parser.get_parsed_content("semi#trainer")
    message = r"kept_epoch=2.pt: stage 2 of this state began after stage1_epochs 1 \(max_epochs\), this run has 2"
    with pytest.raises(ValueError, match=message):
        trainer.run()


def test_stage2_epochs_0_is_the_supervised_stage_alone_even_on_all_labels(two_stage):
    parser = _parser(two_stage["root"] / "supervised_100", two_stage["data"], stage2_epochs=0, train_fraction=100)
    trainer = parser.get_parsed_content("semi#trainer")
    stages = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stages.append(loss_terms(e.state.output)["stage"]))
    trainer.run()
    assert trainer.state.epoch == 1 and stages == [1, 1, 1]  # 6 labelled images, batch 2
    assert len(parser.get_parsed_content("semi#unlabelled_dataset")) == 0

