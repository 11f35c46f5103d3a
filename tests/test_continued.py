"""bundle/continued.py: a training run starts exactly at the served model (its reference policy too), and its export
replaces the served files atomically, the previous ones kept."""

import os

import pytest
import torch

from bundle.continued import publish, served_as_base
from bundle.checkpoints import build_network
from bundle.export import merge_lora
from bundle.guidance import points_to_guidance
from bundle.networks import CheckpointError, PromptableSAM
from test_conformance import perturbed

S = 64


def clicks_input(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    guidance = points_to_guidance(torch.tensor([[[10.0, 20.0], [40.0, 12.0]]]), torch.tensor([[1, 0]]), (S, S))
    return torch.cat([torch.rand(1, 3, S, S, generator=g), guidance], 1)


def test_training_network_starts_at_the_served_model(tmp_path):
    served = merge_lora(perturbed("tiny", S))  # a trained, merged model as models/model.pt holds it
    torch.save(served.state_dict(), tmp_path / "model.pt")
    base = served_as_base(tmp_path / "model.pt", tmp_path / "run" / "served_start.pth", "tiny", S)
    torch.manual_seed(3)
    net = PromptableSAM("tiny", S, sam_checkpoint=base, require_checkpoint=True, lora_rank=4).eval()  # as train.yaml
    x = clicks_input()
    with torch.no_grad():
        expected = served(x)
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)
        with net.reference():  # SAMPO's reference policy is the served model, not SAM
            torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)
    assert net.initialisation == "served_start.pth"


def test_a_served_model_of_another_size_is_an_error_naming_the_file(tmp_path):
    torch.save(build_network("tiny", 32, lora_rank=0).state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt"):
        served_as_base(tmp_path / "model.pt", tmp_path / "base.pth", "tiny", S)
    assert not (tmp_path / "base.pth").exists()


def test_publish_replaces_the_served_files_and_keeps_the_previous(tmp_path):
    run, served, backup = tmp_path / "run" / "models", tmp_path / "bundle" / "models", tmp_path / "run" / "before"
    run.mkdir(parents=True)
    served.mkdir(parents=True)
    for name, text in (("model.pt", b"new pt"), ("model.ts", b"new ts"), ("best_model.pt", b"run's best")):
        (run / name).write_bytes(text)
    for name, text in (("model.pt", b"old pt"), ("model.ts", b"old ts"), ("best_model.pt", b"cli best")):
        (served / name).write_bytes(text)
    replaced = publish(run, served, backup)
    assert [os.path.basename(p) for p in replaced] == ["model.ts", "model.pt"]  # model.pt last: the reload trigger
    assert {p.name: p.read_bytes() for p in served.iterdir()} == {
        "model.pt": b"new pt", "model.ts": b"new ts", "best_model.pt": b"cli best"}
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == {"model.pt": b"old pt", "model.ts": b"old ts"}


def test_publish_without_an_export_changes_nothing(tmp_path):
    run, served = tmp_path / "run", tmp_path / "served"
    run.mkdir()
    served.mkdir()
    (run / "model.ts").write_bytes(b"new ts")
    (served / "model.pt").write_bytes(b"old pt")
    with pytest.raises(FileNotFoundError, match="exported no model.pt; the served model is unchanged"):
        publish(run, served, tmp_path / "before")
    assert [p.name for p in served.iterdir()] == ["model.pt"] and (served / "model.pt").read_bytes() == b"old pt"
