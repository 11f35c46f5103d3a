"""MONAI Label requests stay inside the datastore: a real server (scripts/monailabel_app) refuses every id, tag or
upload name that could reach outside it (``CheckedDatastore``, ``check_name``) with 422 naming the field, an unknown
id with 404, bad clicks with 422 naming the click, and writes nothing anywhere for a refused request.

The whole test folder is listed before and after each refused request (datastore, a folder beside it, and the
server's temporary folder, $TMPDIR): nothing new, nothing changed. The server log may hold no traceback for a
request the test means to be refused.
"""

import io
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from test_monailabel import SIZE, label_python, monailabel_server, write_studies, write_tiny_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    label_python()
    root = tmp_path_factory.mktemp("datastore")
    (root / "outside").mkdir()
    (root / "tmp").mkdir()
    studies = write_studies(root / "studies", n=2)
    bundle = write_tiny_bundle(root / "sampo_model")
    with monailabel_server(root, studies, bundle, env={"TMPDIR": str(root / "tmp")}) as fixture:
        yield fixture


def tree(root) -> dict:
    """Every file under ``root`` with its size and modification time, but the server's own log."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            if f != "server.log" and os.path.exists(p):
                st = os.stat(p)
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def png(shape=(48, 64, 3)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def refused(server, method, path, status, detail, **kwargs):
    """Send the request; assert its status and detail, that no file under the test folder appeared or changed,
    and that the server logged no traceback for it."""
    import requests

    root, log = server["root"], server["root"] / "server.log"
    before, offset = tree(root), log.stat().st_size
    r = requests.request(method, server["url"] + path, timeout=120, **kwargs)
    assert r.status_code == status, (path, kwargs.get("params"), r.status_code, r.text)
    assert detail in r.json()["detail"], r.text
    after = tree(root)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}, path  # nothing new, nothing changed
    # nothing removed but the temporary files of earlier (answered) uploads, which MONAI Label deletes after answering
    assert all(k.startswith("tmp" + os.sep) for k in set(before) - set(after)), (path, set(before) - set(after))
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        new_log = f.read()
    assert "Traceback" not in new_log, new_log[-3000:]
    return r


TRAVERSALS = [
    ("../outside/x", "holds a path separator"),
    ("../../../tmp/x", "holds a path separator"),
    ("../missing_dir/x", "holds a path separator"),
    ("..\\outside\\x", "holds a path separator"),
    ("x\x00y", "holds a control character"),
    ("..", "starts with '.'"),
    ("", "is empty"),
]


@pytest.mark.parametrize("image_id, detail", TRAVERSALS + [("ABSOLUTE", "holds a path separator")])
def test_an_image_upload_with_a_traversing_id_writes_nothing(server, image_id, detail):
    if image_id == "ABSOLUTE":
        image_id = str(server["root"] / "outside" / "x")
    refused(server, "PUT", "/datastore/image", 422, f"image {image_id!r} {detail}", params={"image": image_id},
            files={"file": ("x.png", png())})
    assert not list((server["root"] / "outside").iterdir())


def test_an_encoded_traversal_is_refused(server):
    refused(server, "PUT", "/datastore/image?image=..%2F..%2Foutside%2Fx", 422, "holds a path separator",
            files={"file": ("x.png", png())})


@pytest.mark.parametrize("filename, detail", [
    ("../../outside/x.png", "holds a path separator"),
    ("..\\x.png", "holds a path separator"),
    (".x.png", "starts with '.'"),
    ("datastore_v2.json", "is not one of the datastore's file types"),
])
def test_an_upload_file_name_is_checked(server, filename, detail):
    refused(server, "PUT", "/datastore/image", 422, f"file file name {filename!r} {detail}",
            files={"file": (filename, png())})


def test_a_plain_upload_is_stored_inside_the_datastore(server):
    import requests

    r = requests.put(f"{server['url']}/datastore/image", params={"image": "added"},
                     files={"file": ("added.png", png())}, timeout=60)
    assert r.status_code == 200 and r.json() == {"image": "added"}, r.text
    assert (server["studies"] / "added.png").is_file()


@pytest.mark.parametrize("params, detail", [
    ({"image": "img0", "tag": "../../outside"}, "tag '../../outside' holds a path separator"),
    ({"image": "img0", "tag": "..\\x"}, "tag '..\\\\x' holds a path separator"),
    ({"image": "../img0", "tag": "final"}, "image '../img0' holds a path separator"),
])
def test_a_label_with_a_traversing_tag_or_image_writes_nothing(server, params, detail):
    refused(server, "PUT", "/datastore/label", 422, detail, params=params,
            files={"label": ("l.png", png((48, 64)))})


def test_a_label_upload_name_and_an_unknown_image_are_refused(server):
    refused(server, "PUT", "/datastore/label", 422, "label file name '../x.png' holds a path separator",
            params={"image": "img0", "tag": "final"}, files={"label": ("../x.png", png((48, 64)))})
    refused(server, "PUT", "/datastore/label", 404, "no image 'nothere'", params={"image": "nothere", "tag": "final"},
            files={"label": ("l.png", png((48, 64)))})


@pytest.mark.parametrize("method, path, params, status, detail", [
    ("DELETE", "/datastore/image", {"id": "../studies/img0"}, 422, "id '../studies/img0' holds a path separator"),
    ("DELETE", "/datastore/image", {"id": "nothere"}, 404, "no image 'nothere'"),
    ("DELETE", "/datastore/label", {"id": "img0", "tag": "../x"}, 422, "tag '../x' holds a path separator"),
    ("DELETE", "/datastore/label", {"id": "img0", "tag": "final"}, 404, "no label 'img0' with tag 'final'"),
    ("GET", "/datastore/image", {"image": "../../../etc/passwd"}, 422, "holds a path separator"),
    ("GET", "/datastore/image/info", {"image": "nothere"}, 404, "no image 'nothere'"),
    ("PUT", "/datastore/image/info", {"image": "/etc/passwd"}, 422, "holds a path separator"),
    ("GET", "/datastore/label/info", {"label": "img0", "tag": "..\\x"}, 422, "holds a path separator"),
])
def test_other_datastore_requests_are_checked(server, method, path, params, status, detail):
    refused(server, method, path, status, detail, params=params)
    assert (server["studies"] / "img0.png").is_file()


def infer_args(image="img0", params=None, raw=None):
    return {"params": {"image": image, "output": "image"},
            "files": {"params": (None, raw if raw is not None else json.dumps(params or {"foreground": [[10, 20]]}))}}


@pytest.mark.parametrize("image", ["../../../etc/passwd", "/etc/passwd", "..\\x"])
def test_an_infer_request_for_a_path_is_422(server, image):
    refused(server, "POST", "/infer/sampo", 422, f"image {image!r} holds a path separator", **infer_args(image))


def test_an_encoded_infer_path_is_422(server):
    refused(server, "POST", "/infer/sampo?image=..%2F..%2Fetc%2Fpasswd&output=image", 422, "holds a path separator",
            files=infer_args()["files"])


@pytest.mark.parametrize("params, raw, detail", [
    (None, '{"foreground": [[NaN, 5]]}', "foreground click [nan, 5] is not [x, y]"),
    ({"foreground": [[-3, 5]]}, None, "outside the image"),
    ({"foreground": [[1000, 5]]}, None, "outside the image"),
    ({"foreground": [[5, 5]] * 10000}, None, "at most 16 foreground"),
    ({"foreground": [["a", "b"]]}, None, "foreground click ['a', 'b'] is not [x, y]"),
    ({"foreground": "abc"}, None, "foreground clicks are not a JSON list"),
    ({"foreground": [[10, 20]], "model_filename": "../../outside/x.pt"}, None, "cannot be used for inference"),
])
def test_bad_clicks_are_422_naming_the_click(server, params, raw, detail):
    refused(server, "POST", "/infer/sampo", 422, detail, **infer_args(params=params, raw=raw))


def test_an_infer_upload_name_is_checked(server):
    refused(server, "POST", "/infer/sampo", 422, "file file name '../x.png' holds a path separator",
            params={"output": "image"},
            files={"params": (None, json.dumps({"foreground": [[10, 20]]})), "file": ("../x.png", png())})


def test_a_training_request_cannot_name_a_model_file_outside_the_bundle(server):
    refused(server, "POST", "/train/sampo", 422, "model_filename '../../outside/x.pt' holds a path separator",
            params={"run_sync": "true"}, json={"model_filename": "../../outside/x.pt", "max_epochs": 1})
    refused(server, "POST", "/train/sampo", 422, "training continues from the served models/model.pt",
            params={"run_sync": "true"}, json={"model_filename": "best_model.pt", "max_epochs": 1})


def test_the_server_still_answers_clicks_after_the_refusals(server):
    import requests

    r = requests.post(f"{server['url']}/infer/sampo", timeout=300, **infer_args())
    assert r.status_code == 200, r.text
    assert np.array(Image.open(io.BytesIO(r.content))).shape == (48, 64)
    assert "listens on 127.0.0.1 without authentication" not in (server["root"] / "server.log").read_text(encoding="utf-8")


def test_an_exposed_server_without_authentication_is_warned_about():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import main; "
            "print(repr(main.exposure_warning(main._listen_host(['monailabel', 'start_server', '--app', 'a']), False)));"
            "print(repr(main.exposure_warning('0.0.0.0', True))); print(repr(main.exposure_warning('127.0.0.1', False)));"
            "print(repr(main.exposure_warning('::1', False))); print(repr(main.exposure_warning('10.1.2.3', False)))")
    r = subprocess.run([label_python(), "-c", code, str(REPO / "scripts" / "monailabel_app")], capture_output=True,
                       text=True, encoding="utf-8", cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    default, with_auth, loopback, loopback6, lan = r.stdout.splitlines()
    assert "listens on 0.0.0.0 without authentication" in default and "docs/deploy.md" in default
    assert "listens on 10.1.2.3" in lan
    assert with_auth == loopback == loopback6 == "None"
