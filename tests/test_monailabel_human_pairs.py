"""Human preference pairs through a real MONAI Label server (scripts/monailabel_app, bundle/human_pairs.py): the
server keeps what it answered to each image's clicks, a saved final label freezes that answer as the image's pair,
and the train task trains on the pairs (saved label preferred to the proposal) beside plain labels; MLflow says how
many pairs were used. Bad inputs: a label of another size (422, nothing lost), a label for an image never answered
(a plain label), concurrent clicks on two images (each proposal stays with its image)."""

import io
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml
from PIL import Image

from test_monailabel import infer, label_python, monailabel_server, write_studies, write_tiny_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    label_python()
    root = tmp_path_factory.mktemp("monailabel_pairs")
    studies = write_studies(root / "studies")
    model_dir = write_tiny_bundle(root / "sampo_model")
    with monailabel_server(root, studies, model_dir) as fixture:
        yield fixture


def _mask_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return (np.array(Image.open(io.BytesIO(response.content))) > 0).astype(np.uint8)


def _stored(server, image, kind="proposal"):
    folder = server["studies"] / "sampo_pairs"
    meta = folder / f"{image}.{kind}.json"
    if not meta.exists():
        return None, None
    return json.loads(meta.read_text(encoding="utf-8")), np.load(folder / f"{image}.{kind}.npy")


def _save_label(server, image, mask=None, data=None, name="label.png"):
    import requests

    if data is None:
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
    return requests.put(f"{server['url']}/datastore/label", params={"image": image, "tag": "final"},
                        files={"label": (name, data)}, timeout=60)


def test_each_answer_is_kept_with_its_image_when_two_images_are_clicked_at_once(server):
    def answer(image, clicks):
        return image, clicks, _mask_of(infer(server, clicks, image=image))

    for r in range(3):
        requests = [("img1", {"foreground": [[10 + 7 * r, 20]], "background": [[5, 5 + r]]}),
                    ("img2", {"foreground": [[40 - 5 * r, 30], [12, 40]]})]
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda a: answer(*a), requests))
        for image, clicks, mask in done:
            record, stored = _stored(server, image)
            assert record["clicks"] == {"foreground": [[float(v) for v in c] for c in clicks["foreground"]],
                                        "background": [[float(v) for v in c] for c in clicks.get("background", [])]}
            assert record["image_id"] == image and record["shape"] == [48, 64]
            assert np.array_equal(stored, mask), (image, r)  # the mask this request was answered with
    assert _stored(server, "img1", "pair") == (None, None)  # no label saved yet: no pair


def test_a_label_of_another_size_is_422_and_nothing_is_lost(server):
    plain = np.zeros((48, 64), np.uint8)
    plain[5:15, 5:25] = 1
    r = _save_label(server, "img3", plain)  # img3 was never answered: a plain label
    assert r.status_code == 200 and r.json()["human_pair"] is False, r.text
    saved = server["studies"] / "labels" / "final" / "img3.png"
    before = saved.read_bytes()
    r = _save_label(server, "img3", np.ones((40, 30), np.uint8))
    assert r.status_code == 422, r.text
    assert "has size 30 x 40 (width x height) but image 'img3'" in r.json()["detail"]
    assert "has size 64 x 48" in r.json()["detail"] and "nothing was saved" in r.json()["detail"]
    r = _save_label(server, "img3", data=b"not an image", name="label.png")
    assert r.status_code == 422 and "is not a readable image" in r.json()["detail"], r.text
    assert saved.read_bytes() == before  # the saved label is untouched
    assert _stored(server, "img3") == (None, None) and _stored(server, "img3", "pair") == (None, None)
    r = _save_label(server, "nothere", plain)
    assert r.status_code == 404 and "no image 'nothere'" in r.json()["detail"], r.text


def test_training_prefers_the_saved_labels_to_the_proposals(server):
    import requests

    corrected = {}
    for image, clicks in (("img0", {"foreground": [[20, 20], [40, 30]], "background": [[5, 5]]}),
                          ("img1", {"foreground": [[30, 25]]})):
        proposal = _mask_of(infer(server, clicks, image=image))
        label = proposal.copy()
        label[10:30, 10:40] = 1 - label[10:30, 10:40]  # the annotator's correction
        r = _save_label(server, image, label)
        assert r.status_code == 200 and r.json()["human_pair"] is True, r.text
        record, stored = _stored(server, image, "pair")
        assert np.array_equal(stored, proposal) and record["clicks"]["foreground"] == [
            [float(v) for v in c] for c in clicks["foreground"]]
        corrected[image] = label
    # a click after the save does not change the pair
    infer(server, {"foreground": [[3, 3]]}, image="img0")
    assert _stored(server, "img0", "pair")[0]["clicks"]["foreground"] == [[20.0, 20.0], [40.0, 30.0]]

    r = requests.post(f"{server['url']}/train/sampo", params={"run_sync": "true"},
                      json={"max_epochs": 1, "val_split": 0.34}, timeout=900)
    assert r.status_code == 200, (r.text, (server["root"] / "server.log").read_text(encoding="utf-8")[-3000:])
    run = r.json()["output"]
    train_dir = server["model_dir"] / "monailabel_train"
    executed = yaml.safe_load((train_dir / "eval" / "executed_config.yaml").read_text(encoding="utf-8"))
    items = executed["train"]["dataset"]["data"]
    by_image = {item["image"].rsplit("/", 1)[-1]: item for item in items}
    assert len(items) == 2 and set(by_image) <= {"img0.png", "img1.png", "img3.png"}
    if "img3.png" in by_image:  # the label of the image never answered is a plain label
        assert "proposal" not in by_image["img3.png"] and "clicks" not in by_image["img3.png"]
    paired = [name for name, item in by_image.items() if "proposal" in item]
    assert paired and set(paired) <= {"img0.png", "img1.png"}
    for name in paired:  # the run keeps the proposals it trained on
        assert by_image[name]["proposal"].startswith(run)
        assert np.array_equal(np.load(by_image[name]["proposal"]), _stored(server, name[:-4], "pair")[1])
    with sqlite3.connect(train_dir / "eval" / "mlflow.db") as db:
        (run_id,) = db.execute("SELECT run_uuid FROM runs ORDER BY start_time DESC").fetchone()
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall())
        used = db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'human_pairs'",
                          (run_id,)).fetchall()
        dpo = db.execute("SELECT value FROM metrics WHERE run_uuid = ? AND key = 'human_dpo'", (run_id,)).fetchall()
    assert params["human_pairs"] == "True" and params["human_pair_items"] == str(len(paired))
    assert used == [(1, float(len(paired)))]  # one iteration (2 images, batch 2), every pair of it used
    assert len(dpo) == 1 and abs(dpo[0][0] - np.log(2)) < 1e-4  # the first step compares the served model with itself
