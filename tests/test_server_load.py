"""A real MONAI Label server (scripts/monailabel_app, the tiny bundle) under load (scripts/benchmark_server_load.py,
docs/benchmarks.md "MONAI Label server under load"): concurrent clients each get the mask their request gets alone,
and a run of requests in a row does not grow the server's memory."""

import sys

import pytest

from conftest import REPO
from test_monailabel import label_python, monailabel_server, write_tiny_bundle

sys.path.insert(0, str(REPO / "scripts"))
import benchmark_server_load as load  # noqa: E402

pytestmark = pytest.mark.slow


def test_helpers_percentile_and_own_process_group_rss():
    import os

    assert load.percentile([4, 1, 3, 2], 50) == 2.5 and load.percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert load.percentile([7], 95) == 7
    assert load.group_rss(os.getpgrp()) > 0 and load.group_rss(2**22 + 1) == 0


def test_concurrent_clients_get_the_serial_masks_and_memory_stays_flat(tmp_path):
    label_python()  # skip before building anything when MONAI Label is absent
    images = load.write_tiles(tmp_path / "studies", n=10, size=256)  # more images than the embedding cache holds
    model_dir = write_tiny_bundle(tmp_path / "sampo_model")
    with monailabel_server(tmp_path, tmp_path / "studies", model_dir, conf=[("skip_trainers", "true")]) as server:
        url, pgid = server["url"], server["proc"].pid
        jobs = load.client_jobs(images, clients=4, requests=5, size=256)
        assert len({load.key(j) for mine in jobs for j in mine}) == 20  # every request its own image + clicks
        serial = load.serial_answers(url, jobs)
        assert load.mismatches(list(serial.values()), serial) == []
        assert all(r["mask"].shape == (256, 256) for r in serial.values())
        assert any(r["mask"].any() for r in serial.values())
        results, _ = load.fire(url, jobs)
        assert len(results) == 20 and load.mismatches(results, serial) == []
        results, rss = load.sequential(url, jobs, 60, pgid, marks=(10,))
        assert load.mismatches(results, serial) == []
        log = (tmp_path / "server.log").read_text(encoding="utf-8")
        assert sorted(rss) == [10, 60] and rss[10] > 0, log[-2000:]
        assert rss[60] - rss[10] < 50 * 2**20, {k: v / 2**20 for k, v in rss.items()}
