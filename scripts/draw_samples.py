#!/usr/bin/env python
"""Draw prepared samples as training sees them: image, target mask G (cyan outline) and one sampled prompt set
(positives green, negatives red), one row per (task config, prepared dataset folder). Example (docs/data.md):

  python scripts/draw_samples.py --row configs/tasks/consep_t1.yaml data/consep \\
      --row configs/tasks/consep_t2.yaml data/consep --row configs/tasks/synapse.yaml data/ct --output docs/samples.png

Each row runs the config's ``load`` and ``resize`` transforms (bundle.transforms.task.TaskTargetd) and
bundle.transforms.prompts.PromptSetsd from configs/train.yaml + the overlay, without augmentation.
"""

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.transforms import Compose  # noqa: E402

from bundle.data.datalist import load_datalist  # noqa: E402
from bundle.transforms.prompts import PromptSetsd  # noqa: E402


def row_pipeline(task_config: str, dataset_dir: str, seed: int):
    """(transform, datalist path, task) of a task overlay on configs/train.yaml, pointed at ``dataset_dir``."""
    parser = ConfigParser(ConfigParser.load_config_files([str(ROOT / "configs" / "train.yaml"), task_config]))
    parser["dataset_dir"] = str(Path(dataset_dir).resolve())
    transform = Compose(
        parser.get_parsed_content("load") + parser.get_parsed_content("resize") + [PromptSetsd(n_prompt_sets=2)]
    )
    transform.set_random_state(seed)
    return transform, parser.get_parsed_content("datalist"), parser.get_parsed_content("task")


def pick(items: list[dict], n: int) -> list[dict]:
    """``n`` items spread evenly over the list (deterministic)."""
    if len(items) <= n:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", nargs=2, action="append", required=True, metavar=("TASK_CONFIG", "DATASET_DIR"),
                   help="a configs/tasks/*.yaml overlay and the prepared dataset folder it should read")
    p.add_argument("--n", type=int, default=4, help="samples per row")
    p.add_argument("--split", default="training", choices=("training", "validation", "test"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "docs" / "samples.png"))
    a = p.parse_args(argv)

    fig, axes = plt.subplots(len(a.row), a.n, figsize=(2.6 * a.n, 2.9 * len(a.row)), squeeze=False)
    for r, (config, dataset_dir) in enumerate(a.row):
        transform, datalist, task = row_pipeline(config, dataset_dir, a.seed)
        with open(datalist, encoding="utf-8") as f:
            classes = json.load(f)["classes"]
        items = pick(load_datalist(datalist, a.split), a.n)
        if not items:
            raise ValueError(f"{datalist}: no {a.split} items to draw")
        for c in range(a.n):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(items):
                continue
            d = transform(items[c])
            image = np.moveaxis(np.asarray(d["image"]), 0, -1).clip(0, 1)
            target = np.asarray(d["label"])[0] > 0
            points, labels = np.asarray(d["points"])[0], np.asarray(d["point_labels"])[0]
            ax.imshow(image, cmap="gray" if image.shape[-1] == 1 else None)
            ax.contour(target, levels=[0.5], colors="cyan", linewidths=0.8)
            for label, colour, marker in ((1, "lime", "o"), (0, "red", "X")):
                sel = points[labels == label]
                ax.scatter(sel[:, 0], sel[:, 1], c=colour, marker=marker, s=40, edgecolors="black", linewidths=0.7)
            what = "all nuclei" if task == "t1" else classes.get(str(int(d["target_class"])), "?")
            ax.set_title(f"{items[c]['name']}\n{task}: {what}", fontsize=8)
    fig.suptitle("target G (cyan outline), prompt set 0: positives green, negatives red", fontsize=9)
    fig.tight_layout()
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.output, dpi=90)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
