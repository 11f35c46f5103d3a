"""MONAI Label serves the bundle: a real server (scripts/monailabel_app) on 127.0.0.1 answers clicks with a mask,
bad requests with HTTP 4xx, and trains on its datastore.

MONAI Label 0.8.5 pins numpy 1.26 / jsonschema 3.2 / pydicom 2, so it lives in its own environment
(``make venv-label``: .venv-label, or the interpreter in $SAMPO_MONAILABEL_PYTHON); the test starts the server
from there and skips when it is absent.
"""

import contextlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from servers import serve

pytestmark = pytest.mark.slow

SIZE = 64


def label_python() -> str:
    candidates = [os.environ.get("SAMPO_MONAILABEL_PYTHON"), str(REPO / ".venv-label" / "bin" / "python")]
    for py in candidates:
        if py and os.path.isfile(py):
            r = subprocess.run([py, "-c", "import monailabel, bundle"], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd="/")
            if r.returncode == 0:
                return py
    pytest.skip(
        "MONAI Label environment absent: run `make venv-label` (creates .venv-label with monailabel 0.8.5) or set "
        "SAMPO_MONAILABEL_PYTHON to a Python that has monailabel and this project installed"
    )


def write_tiny_bundle(model_dir, seed=0):
    """A MONAI Label model folder: a copy of the bundle with a tiny SAM, its train config set to train briefly."""
    from bundle.checkpoints import build_network
    from bundle.export import write_bundle

    torch.manual_seed(seed)
    write_bundle(build_network("tiny", SIZE, lora_rank=0), model_dir, REPO, verify=False)
    train_yaml = model_dir / "configs" / "train.yaml"
    if train_yaml.exists():
        from monai.bundle import ConfigParser

        cfg = ConfigParser.load_config_file(str(train_yaml))
        cfg.update({"model_size": "tiny", "image_size": SIZE, "batch_size": 2, "n_prompt_sets": 2, "max_epochs": 1,
                    "synthetic": {"n_train": 2, "n_val": 1, "n_test": 1}})
        ConfigParser.export_config_file(cfg, str(train_yaml), fmt="yaml", sort_keys=False)
    return model_dir


def write_studies(studies, n=4):
    studies.mkdir(exist_ok=True)
    for i in range(n):
        img = (np.random.default_rng(i).random((48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(studies / f"img{i}.png")
    return studies


@contextlib.contextmanager
def monailabel_server(root, studies, bundle, conf=(), env=None, timeout=180):
    """A real MONAI Label server of scripts/monailabel_app on 127.0.0.1 serving ``bundle`` (a folder or a
    ``models:/`` reference) on ``studies``; ``conf``: more ``--conf`` pairs. Yields the fixture dict."""
    py = label_python()
    env = dict(os.environ, MONAI_LABEL_TASKS_TRAIN="true", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               GLOO_SOCKET_IFNAME="lo", **(env or {}))
    # MONAI Label starts multi-GPU training with the `torchrun` of its environment (the PATH of an activated venv)
    env["PATH"] = os.path.dirname(py) + os.pathsep + env.get("PATH", "")

    def command(port):
        extra = [a for k, v in conf for a in ("--conf", k, str(v))]
        return [py, "-m", "monailabel.main", "start_server", "--app", str(REPO / "scripts" / "monailabel_app"),
                "--studies", str(studies), "--conf", "bundle", str(bundle), *extra, "--host", "127.0.0.1",
                "--port", str(port)]

    with serve("MONAI Label", command, "/info/", root / "server.log", root, env, timeout=timeout) as (url, proc):
        yield {"url": url, "root": root, "studies": studies, "model_dir": bundle, "proc": proc}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    label_python()  # skip before building anything when MONAI Label is absent
    root = tmp_path_factory.mktemp("monailabel")
    studies = write_studies(root / "studies")
    model_dir = write_tiny_bundle(root / "sampo_model")
    # training files beside the export, as a command-line run leaves them: not loadable by the inference network
    from bundle.checkpoints import build_network

    lora_state = build_network("tiny", SIZE, lora_rank=4).state_dict()
    torch.save(lora_state, model_dir / "models" / "best_model.pt")
    torch.save({"network": lora_state}, model_dir / "models" / "checkpoint_epoch=1.pt")
    with monailabel_server(root, studies, model_dir) as fixture:
        yield fixture


def infer(server, params, image="img0", model="sampo", raw_params=None, output="image"):
    import requests

    data = {"params": (None, raw_params if raw_params is not None else json.dumps(params))}  # a form field
    return requests.post(f"{server['url']}/infer/{model}", params={"image": image, "output": output}, files=data,
                         timeout=300)


def test_info_lists_the_interactive_model(server):
    import requests

    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    model = info["models"]["sampo"]
    assert model["type"] == "deepgrow" and model["dimension"] == 2 and model["labels"] == {"target": 1}


def test_clicks_give_a_mask_equal_to_the_bundle_run(server, tmp_path):
    from monai.bundle import run

    clicks = {"foreground": [[10, 20], [50, 30]], "background": [[5, 5]]}
    r = infer(server, clicks)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/png")
    (tmp_path / "label.png").write_bytes(r.content)
    label = np.array(Image.open(tmp_path / "label.png"))
    assert label.shape == (48, 64) and set(np.unique(label)) <= {0, 1}
    # the same image and clicks through the bundle's own inference (eager model.pt) give the same mask
    (tmp_path / "c.json").write_text(json.dumps(clicks), encoding="utf-8")
    shutil.copy(server["studies"] / "img0.png", tmp_path / "img0.png")
    run("run", config_file=str(server["model_dir"] / "configs" / "inference.yaml"),
        bundle_root=str(server["model_dir"]), device="$torch.device('cpu')",
        input_image=str(tmp_path / "img0.png"), clicks=str(tmp_path / "c.json"))
    mine = np.array(Image.open(tmp_path / "img0_seg.png"))
    assert np.array_equal(mine > 0, label > 0)


def test_infer_result_carries_the_nuclei_count_and_instances_of_the_bundle_run(server, tmp_path):
    """output=json: the result holds the count, the nuclei table and the instances as MONAI Label's viewers take
    annotations (``annotation.elements[].contours``), the same nuclei as the bundle's own inference writes."""
    import csv

    from monai.bundle import run

    clicks = {"foreground": [[10, 20], [50, 30]], "background": [[5, 5]]}
    r = infer(server, clicks, output="json")
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["n_nuclei"] == len(result["nuclei"]) and result["class_name"]
    assert result["annotation"]["size"] == [64, 48]
    contours = [c for e in result["annotation"]["elements"] for c in e["contours"]]
    assert len(contours) == result["n_nuclei"] and all(0 <= x < 64 and 0 <= y < 48 for c in contours for x, y in c)
    (tmp_path / "c.json").write_text(json.dumps(clicks), encoding="utf-8")
    shutil.copy(server["studies"] / "img0.png", tmp_path / "img0.png")
    run("run", config_file=str(server["model_dir"] / "configs" / "inference.yaml"),
        bundle_root=str(server["model_dir"]), device="$torch.device('cpu')",
        input_image=str(tmp_path / "img0.png"), clicks=str(tmp_path / "c.json"))
    with open(tmp_path / "img0_nuclei.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["n_nuclei"]
    assert result["n_nuclei"] > 0  # 3 with this seed: the comparison is not of two empty lists
    assert sorted(float(r["area"]) for r in rows) == sorted(float(n["area"]) for n in result["nuclei"])


def test_clicks_give_sam_predictors_mask(server, tmp_path):
    """METHOD.md "Tokens": the served mask is what segment_anything.SamPredictor gives on the same weights and clicks
    (a square image at the model's size, so no resizing comes between)."""
    import io

    import requests
    from segment_anything import SamPredictor

    from bundle.checkpoints import load_network

    image = (np.random.default_rng(5).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    r = requests.put(f"{server['url']}/datastore/image", params={"image": "square"},
                     files={"file": ("square.png", buf.getvalue())}, timeout=60)
    assert r.status_code == 200, r.text
    try:
        clicks = {"foreground": [[10, 20], [50, 30], [33, 40]], "background": [[5, 5]]}
        r = infer(server, clicks, image="square")
        assert r.status_code == 200, r.text
        (tmp_path / "label.png").write_bytes(r.content)
        served = np.array(Image.open(tmp_path / "label.png")) > 0
    finally:
        requests.delete(f"{server['url']}/datastore/image", params={"id": "square"}, timeout=60)
    net = load_network(server["model_dir"] / "models" / "model.pt", model_size="tiny", image_size=SIZE, lora_rank=0)
    predictor = SamPredictor(net._sam.eval())
    predictor.set_image(image)
    points = np.array(clicks["foreground"] + clicks["background"], np.float32)
    labels = np.array([1] * 3 + [0])
    with torch.no_grad():
        masks, scores, _ = predictor.predict(points, labels, multimask_output=True)
    assert served.shape == (SIZE, SIZE) and served.any()
    assert np.array_equal(served, masks[scores.argmax()])


@pytest.mark.parametrize(
    "params,raw,status,detail",
    [
        ({"background": [[5, 5]]}, None, 422, "no foreground click"),
        ({"foreground": [[100, 20]]}, None, 422, "outside the image"),
        ({"foreground": "x"}, None, 422, "not a JSON list"),
        ({"foreground": [[1, 2, 3, 4]]}, None, 422, "is not [x, y]"),
        (None, "{not json", 422, "not valid JSON"),
        (None, "[1, 2, 3]", 422, "params must be a JSON object"),
        ({"foreground": [[10, 20]], "model_filename": "best_model.pt"}, None, 422, "files that load: ['model.pt']"),
        ({"foreground": [[10, 20]], "model_filename": "checkpoint_epoch=1.pt"}, None, 422, "cannot be used for inference"),
    ],
)
def test_malformed_requests_are_4xx(server, params, raw, status, detail):
    r = infer(server, params, raw_params=raw)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"]


def test_info_offers_only_loadable_models_and_no_image_is_400(server):
    import requests

    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert info["models"]["sampo"]["config"]["model_filename"] == ["model.pt"]
    assert "model_filename" not in info["trainers"]["sampo"]["config"]  # training starts from the train config
    assert infer(server, {"foreground": [[10, 20]], "model_filename": "model.pt"}).status_code == 200
    r = infer(server, {"foreground": [[10, 20]]}, image="")
    assert r.status_code == 400 and "no image" in r.json()["detail"]


def served_mask(server, clicks, image="img0"):
    r = infer(server, clicks, image=image)
    assert r.status_code == 200, r.text
    import io

    return np.array(Image.open(io.BytesIO(r.content))) > 0


def bundle_run_mask(server, clicks, tmp_path, image="img0"):
    """The mask of the bundle's own inference (configs/inference.yaml, eager models/model.pt as it is now)."""
    from monai.bundle import run

    (tmp_path / "c.json").write_text(json.dumps(clicks), encoding="utf-8")
    shutil.copy(server["studies"] / f"{image}.png", tmp_path / f"{image}.png")
    run("run", config_file=str(server["model_dir"] / "configs" / "inference.yaml"),
        bundle_root=str(server["model_dir"]), device="$torch.device('cpu')",
        input_image=str(tmp_path / f"{image}.png"), clicks=str(tmp_path / "c.json"))
    return np.array(Image.open(tmp_path / f"{image}_seg.png")) > 0


def test_later_clicks_decode_only_and_concurrent_clicks_stay_correct(server):
    """bundle/predictor.py in the server: one encoding per image and served model, each request its own image's
    mask when two images are clicked at once."""
    from concurrent.futures import ThreadPoolExecutor

    log = server["root"] / "server.log"
    start = len(log.read_text(encoding="utf-8"))
    masks = [served_mask(server, {"foreground": [[10 + 5 * k, 20]], "background": [[5, 5]]}, image="img1")
             for k in range(3)]
    assert log.read_text(encoding="utf-8")[start:].count("encoded image") == 1 and masks[0].shape == (48, 64)
    clicks = {"img1": {"foreground": [[30, 20]]}, "img2": {"foreground": [[12, 40]], "background": [[50, 5]]}}
    alone = {image: served_mask(server, c, image=image) for image, c in clicks.items()}
    with ThreadPoolExecutor(4) as pool:
        futures = [(image, pool.submit(served_mask, server, clicks[image], image)) for image in list(clicks) * 3]
        for image, future in futures:
            assert np.array_equal(future.result(), alone[image]), image


def test_a_replaced_model_is_served_without_restart(server, tmp_path):
    """models/model.pt replaced on disk (what a finished training run does): the next click gets the new model's
    mask, not a cached embedding of the old one."""
    from bundle.checkpoints import build_network
    from bundle.io import atomic_torch_save

    clicks = {"foreground": [[10, 20], [50, 30]], "background": [[5, 5]]}
    model = server["model_dir"] / "models" / "model.pt"
    original = model.read_bytes()
    before = served_mask(server, clicks)
    try:
        torch.manual_seed(123)
        atomic_torch_save(build_network("tiny", SIZE, lora_rank=0).state_dict(), model)
        expected = bundle_run_mask(server, clicks, tmp_path)
        assert not np.array_equal(expected, before)  # the two models answer these clicks differently
        assert np.array_equal(served_mask(server, clicks), expected)
    finally:
        with open(model, "wb") as f:
            f.write(original)
    assert np.array_equal(served_mask(server, clicks), before)


def _save_final_labels(server, folder, masks) -> None:
    """Save ``masks[i]`` as the final label of image ``img{i}`` through the datastore API."""
    import requests

    for i, mask in enumerate(masks):
        Image.fromarray(mask).save(folder / f"lab{i}.png")
        with open(folder / f"lab{i}.png", "rb") as f:
            r = requests.put(f"{server['url']}/datastore/label", params={"image": f"img{i}", "tag": "final"},
                             files={"label": f}, timeout=60)
        assert r.status_code == 200, r.text


def _train(server, **params):
    import requests

    return requests.post(f"{server['url']}/train/sampo", params={"run_sync": "true"}, json=params, timeout=900)


@pytest.mark.parametrize("run_sync", [True, False])
def test_training_with_nothing_to_train_on_is_400(server, run_sync):
    import requests

    r = requests.post(f"{server['url']}/train/sampo", params={"run_sync": str(run_sync).lower()},
                      json={"max_epochs": 1}, timeout=120)
    assert r.status_code == 400, r.text
    assert "nothing to train on: no image in the datastore has a final label" in r.json()["detail"]


@pytest.mark.parametrize("params, detail", [({"max_epochs": 0}, "max_epochs must be an integer >= 1, got 0"),
                                            ({"max_epochs": "2"}, "max_epochs must be an integer >= 1, got '2'"),
                                            ({"val_split": 1.5}, "val_split must be a number < 1")])
def test_bad_training_requests_are_422(server, params, detail):
    r = _train(server, **params)
    assert r.status_code == 422 and detail in r.json()["detail"], r.text


def test_unknown_model_or_image_is_404_and_the_server_lives_on(server):
    import requests

    r = infer(server, {"foreground": [[1, 2]]}, model="nomodel")
    assert r.status_code == 404 and "no model 'nomodel'" in r.json()["detail"]
    r = infer(server, {"foreground": [[1, 2]]}, image="nothere")
    assert r.status_code == 404 and "no image 'nothere'" in r.json()["detail"]
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200
    assert server["proc"].poll() is None


def test_training_starts_on_datastore_labels(server, tmp_path):
    if not (server["model_dir"] / "configs" / "train.yaml").exists():
        pytest.skip("configs/train.yaml not in the bundle yet")
    masks = []
    for i in range(3):
        mask = np.zeros((48, 64), np.uint8)
        mask[10:20, 10 + 5 * i : 25 + 5 * i] = 1
        mask[30:40, 40:50] = 1
        masks.append(mask)
    _save_final_labels(server, tmp_path, masks)
    models = server["model_dir"] / "models"
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    clicks = {"foreground": [[10, 20], [50, 30]], "background": [[5, 5]]}
    served_mask(server, clicks)  # the old model's embedding of img0 is cached now
    r = _train(server, max_epochs=1, val_split=0.34)
    assert r.status_code == 200, (r.text, (server["root"] / "server.log").read_text(encoding="utf-8")[-3000:])
    runs = sorted((server["model_dir"] / "monailabel_train").glob("train_*"))
    assert len(runs) == 1 and (runs[0] / "models" / "checkpoint_epoch=1.pt").is_file()
    assert (runs[0] / "models" / "model.pt").is_file()  # the run's own export
    # continued training: the run started from the served model (its SAM base holds the served weights) ...
    from bundle.checkpoints import build_network, read_state_dict

    assert (runs[0] / "served_before" / "model.pt").read_bytes() == before["model.pt"]  # kept to roll back
    served_before = build_network("tiny", SIZE, lora_rank=0)
    served_before.load_state_dict(read_state_dict(runs[0] / "served_before" / "model.pt"))
    start = torch.load(runs[0] / "served_start.pth", weights_only=True)
    for key, value in served_before._sam.state_dict().items():
        assert torch.equal(start[key], value), key
    # ... and its export is served now; everything else in models/ as it was (checkpoint_epoch=1.pt not resumed)
    after = {p.name: p.read_bytes() for p in models.iterdir()}
    for name in ("model.pt", "model.ts"):
        if name in before:
            assert after.pop(name) == (runs[0] / "models" / name).read_bytes() != before.pop(name), name
    assert after == before
    assert np.array_equal(served_mask(server, clicks), bundle_run_mask(server, clicks, tmp_path))
    assert not (server["model_dir"] / "data" / "synthetic").exists()  # the datastore's data, no synthetic set
    # MLflow: the request's epochs logged, one iteration per epoch (2 training images, batch 2)
    import sqlite3

    with sqlite3.connect(server["model_dir"] / "monailabel_train" / "eval" / "mlflow.db") as db:
        (run_id,) = db.execute("SELECT run_uuid FROM runs").fetchone()
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall())
        steps = db.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key = 'loss'", (run_id,)).fetchone()
    assert params["max_epochs"] == "1" and params["datalist"].startswith("MONAI Label datastore")
    assert steps == (1,)
    # still serving after training
    assert infer(server, {"foreground": [[10, 20]]}).status_code == 200


def test_multi_gpu_training_runs_the_bundle_overlay_under_torchrun(server, tmp_path):
    """MONAI Label's bundle train task finds configs/multi_gpu_train.yaml and runs it under torchrun (forced here with
    two GPU ids on a CPU machine, where the overlay picks gloo): two ranks train, rank 0 writes the run."""
    if not (server["model_dir"] / "configs" / "multi_gpu_train.yaml").exists():
        pytest.skip("configs/multi_gpu_train.yaml not in the bundle yet")
    masks = [np.zeros((48, 64), np.uint8) for _ in range(4)]  # 2 training and 2 validation images: 1 of each per rank
    for i, mask in enumerate(masks):
        mask[8 + 2 * i:22, 12:30 + 4 * i] = 1
    _save_final_labels(server, tmp_path, masks)
    log = server["root"] / "server.log"
    start = len(log.read_text(encoding="utf-8"))
    before = set((server["model_dir"] / "monailabel_train").glob("train_*"))
    r = _train(server, max_epochs=1, val_split=0.5, force_multi_gpu=True, gpus="0,1")
    text = log.read_text(encoding="utf-8")[start:]
    assert r.status_code == 200, (r.text, text[-3000:])
    assert "torchrun" in text and "multi_gpu_train.yaml" in text, text[-3000:]
    assert "rank 0 of 2 on cpu (gloo)" in text and "rank 1 of 2 on cpu (gloo)" in text, text[-3000:]
    (run,) = set((server["model_dir"] / "monailabel_train").glob("train_*")) - before
    assert (run / "models" / "checkpoint_epoch=1.pt").is_file() and (run / "models" / "model.pt").is_file()


def test_a_training_request_while_one_runs_is_409(server, tmp_path):
    """One training at a time: while a background training runs, another train request (background or run_sync)
    answers 409, where MONAI Label alone answers 429 to the first and starts the second beside it; no second run
    folder appears, and the running one ends DONE."""
    import time

    import requests

    if not (server["model_dir"] / "configs" / "train.yaml").exists():
        pytest.skip("configs/train.yaml not in the bundle yet")
    masks = [np.zeros((48, 64), np.uint8) for _ in range(3)]
    for i, mask in enumerate(masks):
        mask[10:24, 8 + 4 * i : 30] = 1
    _save_final_labels(server, tmp_path, masks)
    runs = server["model_dir"] / "monailabel_train"
    before = set(runs.glob("train_*"))
    r = requests.post(f"{server['url']}/train/sampo", params={"run_sync": "false"},
                      json={"max_epochs": 20, "val_split": 0.34}, timeout=60)
    assert r.status_code == 200, r.text
    for run_sync in ("false", "true"):
        again = requests.post(f"{server['url']}/train/sampo", params={"run_sync": run_sync},
                              json={"max_epochs": 1, "val_split": 0.34}, timeout=60)
        assert again.status_code == 409, again.text
        assert "a training is running on this server" in again.json()["detail"]
    deadline = time.time() + 600
    while time.time() < deadline:
        status = requests.get(f"{server['url']}/train/", timeout=30).json()
        if status.get("status") not in ("RUNNING", "QUEUED"):
            break
        time.sleep(1)
    assert status.get("status") == "DONE", status
    assert len(set(runs.glob("train_*")) - before) == 1
