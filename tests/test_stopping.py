"""Faults around a real training (`python -m monai.bundle run training`, tiny SAM): an unreachable tracking server
at start, a real `mlflow server` killed in epoch 2 and restarted, SIGTERM during training, two trainings into one
bundle, a lock left by a killed training. Each rerun is checked against the MLflow run it resumes."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest
from test_training import _client, _command, _run, _runs, _steps

from conftest import REPO
from servers import free_port, serve_mlflow

pytestmark = pytest.mark.slow

ENV = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
# six iterations an epoch: the process is paused (SIGSTOP) on the log line of an epoch's first one, well before
# that epoch can end (the tiny model trains an iteration in about 0.1 s)
SIX = ["--synthetic", "{'n_train': 12, 'n_val': 2, 'n_test': 1}"]


def _start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", start_new_session=True, env=ENV)


def _read_until(proc, marker, seen):
    """Lines of ``proc`` into ``seen`` until one contains ``marker``; False if the process ended first."""
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return True
    return False


def _finish(proc, seen, timeout=600):
    rest, _ = proc.communicate(timeout=timeout)
    return "".join(seen) + rest


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_tracking_server_fails_within_20_s_naming_it(tmp_path, kind):
    listener = None
    if kind == "refused":
        uri = f"http://127.0.0.1:{free_port()}"
    else:  # accepts connections and never answers: every request runs into its timeout
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        proc = _run(tmp_path, "--max_epochs", "1", "--tracking_uri", uri, env=ENV, timeout=120)
        elapsed = time.monotonic() - start
    finally:
        if listener is not None:
            listener.close()
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"TrackingUnavailable: tracking_uri {uri}: the MLflow tracking server did not answer (GET experiments, " \
           "3 tries of 3 s" in out, out[-3000:]
    assert "Nothing was trained" in out and "Retrying" not in out.split("TrackingUnavailable")[-1]
    # the check's own time, as the message reports it: the retry policy bounds it (3 tries of 3 s plus backoff);
    # the whole command adds the interpreter start and imports, which grow with the machine's load
    checked = float(re.search(r"3 tries of 3 s, ([\d.]+) s\)", out).group(1))
    assert checked < 20, (checked, elapsed)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").glob("checkpoint_*"))
    assert not (tmp_path / "eval" / "run_name.txt").exists(), "nothing of a run was written"


def test_tracking_server_killed_in_epoch_2_stops_and_the_rerun_resumes_into_the_same_run(tmp_path):
    """Outcome chosen: stop at the end of the epoch whose metrics could not be logged, before its state is saved;
    the rerun (server back) resumes from the epoch before, into the same MLflow run, each step logged once."""
    epochs, port = 4, free_port()
    store = tmp_path / "server"
    store.mkdir()
    root = tmp_path / "bundle"
    cmd = _command(root, "--max_epochs", str(epochs), *SIX)
    with serve_mlflow(store, port=port) as uri:
        cmd += ["--tracking_uri", uri]
        proc, seen = _start(cmd), []
        try:
            assert _read_until(proc, f"Epoch: 2/{epochs}, Iter: 1/6", seen), "".join(seen)[-3000:]
            os.kill(proc.pid, signal.SIGSTOP)  # held in epoch 2 while the server stops
        except BaseException:
            _kill(proc)
            raise
    try:  # the server is gone (its process group stopped) while epoch 2 trains
        os.kill(proc.pid, signal.SIGCONT)
        out = _finish(proc, seen)
    finally:
        _kill(proc)
    assert proc.returncode != 0, out[-3000:]
    assert f"TrackingUnavailable: tracking_uri {uri}: the MLflow server stopped answering" in out, out[-3000:]
    models = root / "models"
    assert sorted(p.name for p in models.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
    assert f"The last saved state is {models / 'checkpoint_epoch=1.pt'}: the same command resumes from it" in out
    assert not (models / "training.lock").exists(), "the lock is released when the training stops"

    with serve_mlflow(store, port=port, log="mlflow_restarted.log"):
        again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace",
                               timeout=600, env=ENV)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"Resuming from {models / 'checkpoint_epoch=1.pt'}" in again.stdout + again.stderr
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("sampo").experiment_id])
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        assert _steps(client, rid, "loss") == list(range(1, 6 * epochs + 1))  # once each: none lost, none doubled
        assert _steps(client, rid, "margins") == list(range(1, 6 * epochs + 1))
        assert _steps(client, rid, "val_mean_dice") == list(range(1, epochs + 1))


def test_sigterm_ends_the_run_killed_keeps_the_state_and_a_second_training_is_refused(tmp_path):
    epochs = 3
    cmd = _command(tmp_path, "--max_epochs", str(epochs), *SIX)
    models = tmp_path / "models"
    proc, seen = _start(cmd), []
    try:
        assert _read_until(proc, f"Epoch: 2/{epochs}, Iter: 1/6", seen), "".join(seen)[-3000:]
        os.kill(proc.pid, signal.SIGSTOP)  # held in epoch 2 (alive) while a second training tries the bundle
        saved = (models / "checkpoint_epoch=1.pt").read_bytes()
        lock = json.loads((models / "training.lock").read_text(encoding="utf-8"))
        assert lock["pid"] == proc.pid and lock["host"] == socket.gethostname()

        # a second training into the same bundle refuses at once, naming the first and the lock file
        second = _run(tmp_path, "--max_epochs", str(epochs), *SIX, env=ENV, timeout=120)
        assert second.returncode != 0
        out2 = second.stdout + second.stderr
        assert f"BundleLocked: {models / 'training.lock'}: another training writes into this bundle (PID {proc.pid} " \
               f"on {socket.gethostname()}, started {lock['started']}" in out2, out2[-3000:]
        assert "Epoch: 1/" not in out2

        os.kill(proc.pid, signal.SIGTERM)  # what a cluster sends on pre-emption (delivered when it continues)
        os.kill(proc.pid, signal.SIGCONT)
        out = _finish(proc, seen, timeout=120)
    finally:
        _kill(proc)
    assert proc.returncode != 0
    assert (models / "checkpoint_epoch=1.pt").read_bytes() == saved, "the last good state is intact"
    assert sorted(p.name for p in models.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
    assert "training stopped at epoch 2, iteration" in out and "(stopped by signal SIGTERM)" in out, out[-3000:]
    assert f"The last saved state is {models / 'checkpoint_epoch=1.pt'}: the same command resumes from it" in out
    assert not (models / "training.lock").exists()
    client = _client(tmp_path)
    (run,) = _runs(client)
    assert run.info.status == "KILLED"
    assert run.data.tags["failed_at"].startswith("epoch 2, iteration ")
    assert "Terminated: stopped by signal SIGTERM" in run.data.tags["error"]

    again = _run(tmp_path, "--max_epochs", str(epochs), *SIX, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming from {models / 'checkpoint_epoch=1.pt'}" in again.stdout + again.stderr
    (same,) = _runs(client)
    assert same.info.run_id == run.info.run_id and same.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "loss") == list(range(1, 6 * epochs + 1))


def test_a_lock_left_by_a_killed_training_is_taken_over(tmp_path):
    models = tmp_path / "models"
    models.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that no longer runs
    (models / "training.lock").write_text(json.dumps({
        "pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00 UTC",
        "process_start": "1", "command": "python -m monai.bundle run training (killed)",
    }), encoding="utf-8")  # fmt: skip
    proc = _run(tmp_path, "--max_epochs", "1", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"taking over the stale training lock {models / 'training.lock'}: PID {dead.pid} on " in out
    assert "is no longer running" in out
    assert not (models / "training.lock").exists()
