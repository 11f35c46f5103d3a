"""Command-line scripts not covered elsewhere: sample drawing and the benchmark."""

import subprocess
import sys

import pytest
from PIL import Image

from bundle.data.synthetic import make_dataset
from conftest import REPO


def _run(*args):
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, encoding="utf-8",
        errors="replace", timeout=600,
    )  # fmt: skip


def test_draw_samples_writes_one_row_per_task(tmp_path):
    make_dataset(str(tmp_path / "syn"), n_train=3, n_val=1, n_test=1, size=96)
    out = tmp_path / "samples.png"
    proc = _run(
        REPO / "scripts" / "draw_samples.py", "--row", "configs/tasks/consep_t1.yaml", tmp_path / "syn",
        "--row", "configs/tasks/consep_t2.yaml", tmp_path / "syn", "--n", 2, "--output", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    image = Image.open(out)
    assert image.width > 0 and image.height > image.width / 2  # two rows of two samples


def test_benchmark_prints_and_writes_a_table_per_option_and_keeps_other_sections(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n## Click latency\n\nkept\n", encoding="utf-8")
    proc = _run(REPO / "scripts" / "benchmark.py", "--sizes", "tiny", "--batch", 1, "--n_sets", 2, "--repeats", 1,
                "--image_size", 64, "--options", "fp32", "amp", "checkpointing", "--write", doc)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = doc.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[1] for c in cells] == ["fp32", "amp", "checkpointing"]
    assert all(len(c) == 9 and all(float(v) > 0 for v in c[2:8]) for c in cells)
    assert cells[0][4] == "1.00"  # step / fp32 step
    # computed GPU memory: weights + grads/AdamW + activations = total; checkpointing saves fewer activations (amp
    # saves bfloat16 copies, a gain only at real sizes: docs/benchmarks.md)
    parts = [[float(v.strip("* ")) for v in c[8].replace("=", "+").split("+")] for c in cells]
    assert all(abs(w + g + a - total) < 0.2 and min(w, g, a) > 0 for w, g, a, total in parts)
    assert parts[2][2] < parts[0][2]
    assert "python scripts/benchmark.py --sizes tiny" in text and "--options fp32 amp checkpointing" in text
    assert "## Training step (sampo)" in text and "## Click latency\n\nkept\n" in text


def test_benchmark_clicks_writes_its_section_and_keeps_the_rest(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\ntraining table\n", encoding="utf-8")
    for after in ("\n## Later section\n\nkept\n", ""):  # appended, then replaced in place on a rerun
        proc = _run(REPO / "scripts" / "benchmark.py", "--clicks", "--sizes", "tiny", "--repeats", 2,
                    "--image_size", 64, "--write", doc)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc.write_text(doc.read_text(encoding="utf-8") + after, encoding="utf-8")
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\ntraining table\n") and text.count("## Click latency") == 1
    assert text.endswith("## Later section\n\nkept\n")
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    first, warm = (float(c) for c in row.strip("|").split("|")[1:3])
    assert first > 0 and warm > 0
    assert "python scripts/benchmark.py --clicks --sizes tiny --repeats 2 --image_size 64" in text


def test_benchmark_compare_times_the_four_steps_in_one_process_and_writes_the_ratios(tmp_path):
    import json
    import re

    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n## Click latency\n\nkept\n", encoding="utf-8")
    proc = _run(REPO / "scripts" / "benchmark.py", "--compare", "--sizes", "tiny", "--batch", 2, "--n_sets", 2,
                "--repeats", 1, "--image_size", 64, "--write", doc)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for printed in ("sampo_over_supervised", "sampo_cached_over_supervised", "sampo_over_floor", "outside_encoders",
                    "sampo_grid_over_supervised", "sampo_cached_grid_over_supervised"):
        assert f'"{printed}": ' in proc.stdout
    text = doc.read_text(encoding="utf-8")
    assert "## Click latency\n\nkept\n" in text
    assert text.count("## SAMPO step against supervised fine-tuning (tiny, 64 px)") == 1
    assert "python scripts/benchmark.py --compare --sizes tiny --image_size 64 --batch 2 --n_sets 2 --repeats 1" in text
    assert re.search(r"load average \d+\.\d before and \d+\.\d after", text)
    rows = {c[0]: [float(x) for x in c[1:]] for c in
            ([x.strip() for x in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))
            if c[0] != "step, batch 2" and not c[0].startswith("---")}
    assert len(rows) == 8 and all(v[0] > 0 for v in rows.values())
    supervised = rows["supervised LoRA: 1 prompt set per image, BCE + Dice on the best slot"]
    assert supervised[1] == 1.0  # the column of ratios is against it
    measured = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("tiny: "))[6:])
    assert rows["SAMPO, reference cache off"][0] == pytest.approx(measured["sampo_s"], abs=6e-4)
    grid_row = rows["SAMPO, loss on a 16 x 16 grid (`loss_size`), cache off"]  # image_size // 4 by default
    assert grid_row[0] == pytest.approx(measured["sampo_grid_s"], abs=6e-4)
    assert f"**{measured['sampo_grid_over_supervised']:.2f}** without the cache" in text
    assert measured["outside_encoders"] == pytest.approx(1 - measured["floor_s"] / measured["sampo_s"], abs=1e-3)
    share = float(re.search(r"\(SAMPO - floor\) / SAMPO: \*\*(-?[\d.]+) %\*\*", text).group(1))
    assert share == pytest.approx(100 * measured["outside_encoders"], abs=0.06)
    # warm: after the first warm-up filled it, the cache served both images to the grid step's warm-up and to the two
    # timed cached steps
    assert measured["cache_hits"] == 6
    assert re.search(r"/ supervised: \*\*[\d.]+\*\* without the cache \(target <= 1\.35: (met|\*\*not met\*\*)\)", text)


def test_training_terms_reads_early_and_late_means_from_the_runs_mlflow_stores(tmp_path):
    import mlflow

    for seed, offset in ((0, 0.0), (1, 1.0)):
        folder = tmp_path / "consep_t1" / "f10" / "sampo" / f"seed{seed}" / "eval"
        folder.mkdir(parents=True)
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        run = client.create_run(client.create_experiment("sampo"), run_name=f"seed{seed}")
        # margins = step + offset: first 3 mean 2 + offset, last 3 mean 9 + offset; seed 0 is a run from before
        # bundle/dpo.py, which logged them as reward_margin
        for step in range(1, 11):
            client.log_metric(run.info.run_id, "reward_margin" if seed == 0 else "margins", step + offset, step=step)
        client.set_terminated(run.info.run_id)
    r = _run("scripts/training_terms.py", "--runs", str(tmp_path), "--task", "consep_t1", "--methods", "sampo",
             "--seeds", "0", "1", "--steps", "3")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| consep_t1 | sampo"))
    assert row.split(" | ")[2] == "2.500 / 9.500"  # mean over the two seeds
    assert "of 10 iterations" in r.stdout
    missing = _run("scripts/training_terms.py", "--runs", str(tmp_path), "--methods", "supervised")
    assert missing.returncode == 2 and "supervised/seed0/eval/mlflow.db" in missing.stderr
