"""A MONAI Label server of scripts/monailabel_app under load: concurrent clients, then many requests in a row.

    OMP_NUM_THREADS=1 python scripts/benchmark_server_load.py --clients 8 --requests 25 --sequential 500 --write-docs
    python scripts/benchmark_server_load.py --url http://127.0.0.1:8000 --pid <server pid> --image_ids img0 img1

Without ``--url`` it serves, with the MONAI Label environment (``$SAMPO_MONAILABEL_PYTHON`` or ``.venv-label``) on
127.0.0.1, a bundle exported from the testbed's base ``models/sam_small_base.pth`` (``small``, 256 px; where that file
is absent the ``tiny`` random SAM at 64 px) on ``--images`` synthetic ``--tile`` px RGB PNG tiles. A serial pass
answers every request alone; then ``--clients`` threads send ``--requests`` each at once (client c, request r: image
(c + r) mod images, 1-3 foreground and 0-2 background clicks seeded by (c, r)) and every answer must be 200 and equal
to the serial mask; then ``--sequential`` requests in a row (the same ones in turn, also compared), with the VmRSS of
the server's process group after ``--rss_at`` of them and at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SECTION = "## MONAI Label server under load"
logger = logging.getLogger("benchmark_server_load")


def write_tiles(studies: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """``n`` synthetic ``size`` px RGB tiles (noise and bright discs) as ``studies/tile{i}.png``; their image ids."""
    studies.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        img = rng.normal(60, 20, (size, size, 3))
        for _ in range(6):
            cx, cy, r = rng.uniform(0.1 * size, 0.9 * size, 2).tolist() + [rng.uniform(0.04, 0.12) * size]
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] += rng.uniform(80, 160, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(studies / f"tile{i}.png")
    return [f"tile{i}" for i in range(n)]


def client_jobs(images: list[str], clients: int, requests: int, size: int, seed: int = 0) -> list[list[tuple]]:
    """Per client its ``requests`` ``(image id, clicks)``: image (c + r) mod len(images), clicks seeded by (c, r)."""
    def job(c, r):
        g = np.random.default_rng([seed, c, r])
        fg, bg = g.integers(0, size, (int(g.integers(1, 4)), 2)), g.integers(0, size, (int(g.integers(0, 3)), 2))
        return images[(c + r) % len(images)], {"foreground": fg.tolist(), "background": bg.tolist()}

    return [[job(c, r) for r in range(requests)] for c in range(clients)]


def infer(session, url: str, image: str, clicks: dict, model: str = "sampo") -> dict:
    """One ``POST /infer/<model>``: ``status``, ``seconds`` and the ``mask`` (a 2D array; None unless 200)."""
    start = time.perf_counter()
    r = session.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                     files={"params": (None, json.dumps(clicks))}, timeout=600)
    seconds = time.perf_counter() - start
    mask = np.array(Image.open(io.BytesIO(r.content))) if r.status_code == 200 else None
    return {"status": r.status_code, "seconds": seconds, "mask": mask, "detail": "" if mask is not None else r.text}


def fire(url: str, jobs: list[list[tuple]]) -> tuple[list[dict], float]:
    """Each client (one thread, one HTTP session) sends its jobs in turn, all clients at once; results in job order
    (each with ``job``) and the wall time from the common start to the last answer."""
    barrier = threading.Barrier(len(jobs) + 1)

    def client(mine):
        with requests.Session() as s:
            barrier.wait()
            return [{**infer(s, url, image, clicks), "job": (image, clicks)} for image, clicks in mine]

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(client, mine) for mine in jobs]
        barrier.wait()
        start = time.perf_counter()
        results = [r for f in futures for r in f.result()]
    return results, time.perf_counter() - start


def key(job) -> str:
    return json.dumps(job, sort_keys=True)


def serial_answers(url: str, jobs: list[list[tuple]]) -> dict:
    """The answer each distinct ``(image, clicks)`` of ``jobs`` gets alone, keyed by :func:`key`."""
    with requests.Session() as s:
        distinct = {key(j): j for mine in jobs for j in mine}
        return {k: {**infer(s, url, *job), "job": job} for k, job in distinct.items()}


def mismatches(results: list[dict], serial: dict) -> list[str]:
    """What is wrong with ``results`` against the serial answers: a status other than 200, or another mask."""
    return [f"request {i} {r['job']}: HTTP {r['status']} {r['detail'][:300]}" if r["status"] != 200 else
            f"request {i} {r['job']}: mask differs from the serial answer" for i, r in enumerate(results)
            if r["status"] != 200 or not np.array_equal(r["mask"], serial[key(r["job"])]["mask"])]


def percentile(values, q: float) -> float:
    """The ``q``-th percentile of ``values``, linearly interpolated (numpy's default)."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def group_rss(pgid: int) -> int:
    """Bytes of VmRSS summed over the processes of process group ``pgid`` (a server started in its own session)."""
    total = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:  # pid (comm) state ppid pgrp ...
                if int(f.read().rsplit(b")", 1)[1].split()[2]) != pgid:
                    continue
            with open(f"/proc/{entry}/status", encoding="utf-8") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not a process
            continue
    return total


def sequential(url: str, jobs, n: int, pgid: int | None, marks=()) -> tuple[list[dict], dict]:
    """``n`` requests in a row, cycling through ``jobs``; results and ``{k: group RSS after k requests}``."""
    flat = [j for mine in jobs for j in mine]
    results, rss = [], {}
    with requests.Session() as s:
        for k in range(1, n + 1):
            image, clicks = flat[(k - 1) % len(flat)]
            results.append({**infer(s, url, image, clicks), "job": (image, clicks)})
            if pgid and (k in marks or k == n):
                rss[k] = group_rss(pgid)
    return results, rss


@contextlib.contextmanager
def bundle_server(root: Path, studies: Path, size: str, image_size: int, sam_checkpoint: str | None):
    """Export a merged bundle of ``size`` at ``image_size`` into ``root`` and serve it on ``studies``; yields
    ``(url, pid)`` (pid: the server, leader of its process group)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from servers import serve

    from bundle.checkpoints import build_network
    from bundle.export import write_bundle

    model_dir = root / "sampo_model"
    write_bundle(build_network(size, image_size, lora_rank=0, sam_checkpoint=sam_checkpoint, seed=0), model_dir, REPO,
                 verify=False)
    py = os.environ.get("SAMPO_MONAILABEL_PYTHON") or str(REPO / ".venv-label" / "bin" / "python")
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", MONAI_LABEL_TASKS_TRAIN="false")

    def command(port):
        return [py, "-m", "monailabel.main", "start_server", "--app", str(REPO / "scripts" / "monailabel_app"),
                "--studies", str(studies), "--conf", "bundle", str(model_dir), "--conf", "skip_trainers", "true",
                "--host", "127.0.0.1", "--port", str(port)]

    with serve("MONAI Label", command, "/info/", root / "server.log", root, env, timeout=300) as (url, proc):
        yield url, proc.pid


def measure(args, url: str, images: list[str], pid: int | None) -> dict:
    jobs = client_jobs(images, args.clients, args.requests, args.tile, args.seed)
    logger.info("serial pass: %d requests", sum(map(len, jobs)))
    serial = serial_answers(url, jobs)
    bad = mismatches(list(serial.values()), serial)
    results, wall = fire(url, jobs)
    bad += mismatches(results, serial)
    logger.info("concurrent: %d requests from %d clients in %.1f s", len(results), args.clients, wall)
    start = time.perf_counter()
    seq, rss = sequential(url, jobs, args.sequential, pid, marks=(args.rss_at,))
    in_a_row = len(seq) / (time.perf_counter() - start)
    logger.info("%d requests in a row; RSS (MB) %s", len(seq), {k: round(v / 2**20) for k, v in rss.items()})
    bad += mismatches(seq, serial)
    seconds = [r["seconds"] for r in results]
    return {"p50_s": percentile(seconds, 50), "p95_s": percentile(seconds, 95), "requests_per_s": len(results) / wall,
            "in_a_row_per_s": in_a_row,
            "serial_p50_s": percentile([r["seconds"] for r in serial.values()], 50), "rss": rss, "failures": bad}


def docs_text(args, numbers: dict, model: str, encodes: str = "") -> str:
    rss = numbers["rss"]
    mb = {k: f"{v / 2**20:.0f}" for k, v in rss.items()}
    growth = (rss[args.sequential] - rss[args.rss_at]) / 2**20 if len(rss) == 2 else float("nan")
    return "\n".join([
        f"Measured with `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python "
        f"scripts/benchmark_server_load.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPU cores "
        f"({time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f} after): {model}, "
        f"{args.images} synthetic {args.tile} x {args.tile} RGB PNG tiles; one server (one uvicorn worker).", "",
        "| clients x requests | p50 (ms) | p95 (ms) | requests / s | serial p50 (ms) | in a row: requests / s "
        f"| answers 200 and equal to serial | RSS after {args.rss_at} / {args.sequential} in a row (MB) | growth (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.clients} x {args.requests} | {numbers['p50_s'] * 1e3:.0f} | {numbers['p95_s'] * 1e3:.0f} "
        f"| {numbers['requests_per_s']:.1f} | {numbers['serial_p50_s'] * 1e3:.0f} | {numbers['in_a_row_per_s']:.1f} "
        f"| {'all' if not numbers['failures'] else '**%d failed**' % len(numbers['failures'])} "
        f"| {mb.get(args.rss_at, '-')} / {mb.get(args.sequential, '-')} | {growth:.1f} |", "",
        "Latency is per request at the client (HTTP round trip, reading the tile, inference, writing the label PNG; "
        "the clients run on the same cores). MONAI Label's infer endpoint (`async def`) runs the inference on the "
        "server's event loop, so concurrent requests queue and are answered one at a time: the p50 under load is "
        f"{numbers['p50_s'] / numbers['serial_p50_s']:.1f} x the serial p50. RSS is VmRSS summed over the server's "
        f"process group; growth is between the two readings (limit 50 MB). {encodes}".rstrip(),
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server; default: start one")
    p.add_argument("--pid", type=int, help="with --url: the server's process group id (for RSS; default: none)")
    p.add_argument("--image_ids", nargs="+", help="with --url: datastore images of --tile x --tile px to click on")
    for name, default in (("clients", 8), ("requests", 25), ("sequential", 500), ("rss_at", 50), ("images", 8),
                          ("tile", 256), ("image_size", 256), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--model_size", default="small")
    p.add_argument("--sam_checkpoint", default=str(REPO / "models" / "sam_small_base.pth"))
    p.add_argument("--workdir", help="where the bundle, tiles and server log go (default: a temporary folder)")
    p.add_argument("--write-docs", action="store_true", help=f"write '{SECTION}' in docs/benchmarks.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid, images, model = args.url.rstrip("/"), args.pid, args.image_ids, "the server's model"
            args.images = len(images)
        else:
            root = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
            images = write_tiles(root / "studies", args.images, args.tile, args.seed)
            ckpt = args.sam_checkpoint if os.path.isfile(args.sam_checkpoint) else None
            size, image_size = (args.model_size, args.image_size) if ckpt else ("tiny", 64)
            model = f"`{size}` SAM at {image_size} px " + (f"from `{os.path.relpath(ckpt, REPO)}`" if ckpt else
                                                           f"with random weights ({args.sam_checkpoint} absent)")
            logger.info("serving the %s", model)
            url, pid = stack.enter_context(bundle_server(root, root / "studies", size, image_size, ckpt))
        numbers = measure(args, url, images, pid)
        log = "" if args.url else (root / "server.log").read_text(encoding="utf-8")
        encodes = (f"The server encoded an image {log.count('encoded image')} times in all; every other click "
                   "decoded a cached embedding (bundle/predictor.py)." if log else "")
    for line in numbers["failures"]:
        logger.error(line)
    text = docs_text(args, numbers, model, encodes)
    print(text)
    if args.write_docs:
        from bundle.io import write_section

        write_section(str(REPO / "docs" / "benchmarks.md"), SECTION, text)
    return 1 if numbers["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
