"""Prompt sensitivity (METHOD.md): Dice over a grid of 1..max_pos positive x 0..max_neg negative points.

Per image, the image encoder runs once; the prompt sets of all grid cells (10 x 11 = 110 by default) go through the
prompt encoder and mask decoder in one ``decode`` call, each with exactly its clicks plus SAM's padding point; the
predicted mask per cell is the slot with the highest predicted IoU, upsampled to the target's size, ``logit > 0``.

Prompts: for every cell, :func:`bundle.prompt_sampling.evaluation_points` with a generator seeded by ``seed`` and
the item's key (``name#target_class``) -- the seed :class:`bundle.transforms.prompts.EvalPromptsd` uses, so the
cell (3 positives, 3 negatives) has exactly the prompts of the main evaluation.

Outputs: the mean grid as CSV (rows = positives, columns = negatives) and as a heatmap PNG (PIL), and the
"prompt-robustness card", a markdown page with the summary and the heatmap.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import torch

from bundle.metrics import overlap
from bundle.networks.decoding import best_slot, upsample
from bundle.prompt_sampling import evaluation_points, evaluation_rng


def grid_prompts(target: np.ndarray, key: str, seed: int = 0, max_pos: int = 10, max_neg: int = 10):
    """Prompt sets of every grid cell, row-major over (n_pos = 1..max_pos, n_neg = 0..max_neg).

    Returns points (max_pos * (max_neg + 1), max_pos + max_neg, 2) float32 and labels (same, int64; -1 where a
    cell has fewer clicks). The -1 slots only stack the cells into one tensor: the decoder sees each cell's clicks
    plus SAM's padding point (:mod:`bundle.networks.decoding`), as the single-tensor forward does.
    """
    points, labels = [], []
    for n_pos in range(1, max_pos + 1):
        for n_neg in range(0, max_neg + 1):
            p, lab = evaluation_points(target, n_pos, n_neg, evaluation_rng(seed, key), size=max_pos + max_neg)
            points.append(p)
            labels.append(lab)
    return np.stack(points), np.stack(labels)


@torch.no_grad()
def prompt_grid(network, image: torch.Tensor, target: torch.Tensor, key: str, seed: int = 0, max_pos: int = 10,
                max_neg: int = 10, device: str | torch.device | None = None) -> np.ndarray:
    """Dice of every grid cell for one image: (max_pos, max_neg + 1), [i, j] = (i + 1 positives, j negatives).

    Args:
        network: has ``encode(images)`` and ``decode(embeddings, points, labels, input_size)``
            (:class:`bundle.networks.PromptableSAM` or its reference policy).
        image: (C, H, W) image in [0, 1]; target: (1, H, W) or (H, W) binary G.
    """
    device = device or next(network.parameters()).device
    was_training = network.training
    network.eval()
    try:
        g = torch.as_tensor(target).reshape(target.shape[-2:]).to(device) > 0
        h, w = g.shape
        points, labels = grid_prompts(g.cpu().numpy(), key, seed, max_pos, max_neg)
        embedding = network.encode(torch.as_tensor(image)[None].float().to(device))
        low, iou = network.decode(embedding, torch.from_numpy(points)[None].to(device),
                                  torch.from_numpy(labels)[None].to(device), input_size=(h, w))
        pred = upsample(best_slot(low[0], iou[0]), (h, w))
        dice = overlap(pred, g)[0]
        return dice.reshape(max_pos, max_neg + 1).cpu().numpy()
    finally:
        network.train(was_training)


class PromptSensitivity:
    """Accumulates per-item grids (see :func:`prompt_grid`) and writes the mean grid, heatmap and card.

    Args:
        max_pos, max_neg: grid extent (1..max_pos positives, 0..max_neg negatives).
        seed: the evaluation seed (``eval_seed``).
        max_images: grid only the first ``max_images`` items (None: all).
    """

    def __init__(self, max_pos: int = 10, max_neg: int = 10, seed: int = 0, max_images: int | None = None) -> None:
        if max_pos < 1 or max_neg < 0:
            raise ValueError(f"need max_pos >= 1 and max_neg >= 0, got {max_pos}, {max_neg}")
        self.max_pos, self.max_neg, self.seed, self.max_images = max_pos, max_neg, seed, max_images
        self.reset()

    def reset(self) -> None:
        self.grids: list[np.ndarray] = []

    @property
    def n_images(self) -> int:
        return len(self.grids)

    def add(self, network, image, target, key: str, device=None) -> None:
        if self.max_images is not None and self.n_images >= self.max_images:
            return
        self.grids.append(prompt_grid(network, image, target, key, self.seed, self.max_pos, self.max_neg, device))

    def mean_grid(self) -> np.ndarray:
        return np.mean(self.grids, axis=0)

    def write(self, output_dir: str, summary: dict | None = None) -> tuple[list[str], dict]:
        """Write ``prompt_sensitivity.csv``, ``prompt_sensitivity.png`` and ``prompt_robustness_card.md``."""
        os.makedirs(output_dir, exist_ok=True)
        grid = self.mean_grid()
        csv_path = write_grid_csv(grid, os.path.join(output_dir, "prompt_sensitivity.csv"))
        png_path = write_heatmap(grid, os.path.join(output_dir, "prompt_sensitivity.png"),
                                 title=f"Dice vs number of prompts (mean over {self.n_images} items)")
        stats = grid_stats(grid)
        stats["n_images"] = self.n_images
        card = write_card(os.path.join(output_dir, "prompt_robustness_card.md"), summary or {}, grid, stats,
                          os.path.basename(png_path))
        return [csv_path, png_path, card], stats


def grid_stats(grid: np.ndarray) -> dict:
    """Summary numbers of a mean grid: extremes, spread, and a few reference cells."""
    out = {
        "mean_dice": float(grid.mean()),
        "min_dice": float(grid.min()),
        "max_dice": float(grid.max()),
        "std_dice": float(grid.std()),
        "dice_1pos_0neg": float(grid[0, 0]),
    }
    if grid.shape[0] >= 3 and grid.shape[1] >= 4:
        out["dice_3pos_3neg"] = float(grid[2, 3])
    out[f"dice_{grid.shape[0]}pos_{grid.shape[1] - 1}neg"] = float(grid[-1, -1])
    return out


def write_grid_csv(grid: np.ndarray, path: str) -> str:
    from bundle.io import atomic_write

    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["n_pos \\ n_neg"] + [str(j) for j in range(grid.shape[1])])
        for i, row in enumerate(grid):
            writer.writerow([str(i + 1)] + [f"{v:.4f}" for v in row])
    return path


def read_grid_csv(path: str) -> np.ndarray:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return np.array([[float(v) for v in row[1:]] for row in rows[1:]])


def _colour(v: float) -> tuple[int, int, int]:
    """Dice in [0, 1] -> a dark-blue .. yellow ramp (viridis-like, piecewise linear)."""
    stops = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)), (1.0, (253, 231, 37))]
    v = float(np.clip(v, 0.0, 1.0))
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(int(round(x + t * (y - x))) for x, y in zip(ca, cb))
    return stops[-1][1]


def write_heatmap(grid: np.ndarray, path: str, title: str = "Dice vs number of prompts") -> str:
    """:func:`render_heatmap` written as a PNG, atomically."""
    from bundle.io import save_png

    return save_png(render_heatmap(grid, title), path)


def render_heatmap(grid: np.ndarray, title: str = "Dice vs number of prompts"):
    """Heatmap of a Dice grid (a PIL image) with the value in every cell, labelled axes and a colour scale (Dice
    0 .. 1 with ticks at every 0.25) right of the grid (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    rows, cols = grid.shape
    cell, left, top, bottom, bar, bar_gap, right = 44, 70, 40, 50, 16, 16, 60
    width, height = left + cols * cell + bar_gap + bar + right, top + rows * cell + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 10), title, fill="black", font=font)
    for i in range(rows):
        for j in range(cols):
            v = float(grid[i, j])
            x0, y0 = left + j * cell, top + i * cell
            colour = _colour(v)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour)
            ink = "black" if sum(colour) > 380 else "white"
            draw.text((x0 + 6, y0 + cell // 2 - 5), f"{v:.2f}", fill=ink, font=font)
        draw.text((left - 20, top + i * cell + cell // 2 - 5), str(i + 1), fill="black", font=font)
    for j in range(cols):
        draw.text((left + j * cell + cell // 2 - 3, top + rows * cell + 5), str(j), fill="black", font=font)
    draw.text((left + cols * cell // 2 - 50, top + rows * cell + 25), "negative points", fill="black", font=font)
    label = Image.new("RGB", (120, 14), "white")
    ImageDraw.Draw(label).text((0, 0), "positive points", fill="black", font=font)
    img.paste(label.rotate(90, expand=True), (4, top + rows * cell // 2 - 60))
    # colour scale: Dice 1 at the top of the grid, 0 at its bottom
    x0, y0, y1 = left + cols * cell + bar_gap, top, top + rows * cell - 1
    for y in range(y0, y1 + 1):
        draw.line([(x0, y), (x0 + bar - 1, y)], fill=_colour(1.0 - (y - y0) / max(1, y1 - y0)))
    draw.rectangle([x0, y0, x0 + bar - 1, y1], outline="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = int(round(y1 - tick * (y1 - y0)))
        draw.line([(x0 + bar, y), (x0 + bar + 3, y)], fill="black")
        draw.text((x0 + bar + 6, y - 5), f"{tick:.2f}", fill="black", font=font)
    draw.text((x0 - 2, top - 14), "Dice", fill="black", font=font)
    return img


def write_card(path: str, summary: dict, grid: np.ndarray, stats: dict, heatmap: str) -> str:
    """The prompt-robustness card: headline metrics, strata and the sensitivity grid in one markdown page."""
    lines = ["# Prompt-robustness card", ""]
    params = summary.get("params", {})
    if params:
        lines += [f"- {k}: `{v}`" for k, v in params.items()] + [""]
    if "overall" in summary:
        o = summary["overall"]
        lines += [f"Protocol prompts (METHOD.md): Dice **{o['dice']:.4f}**, IoU **{o['iou']:.4f}** over "
                  f"{summary.get('n_items', o.get('n'))} items ({summary.get('n_images', '?')} images).", ""]
        for section in ("per_class", "per_tissue", "per_stratum"):
            if summary.get(section):
                lines += [f"| {section[4:]} | n | Dice | IoU |", "|---|---|---|---|"]
                lines += [f"| {k} | {v['n']} | {v['dice']:.4f} | {v['iou']:.4f} |" for k, v in summary[section].items()]
                lines.append("")
    lines += [
        f"## Prompt sensitivity ({stats['n_images']} items)",
        "",
        f"Dice over 1-{grid.shape[0]} positive x 0-{grid.shape[1] - 1} negative points: mean {stats['mean_dice']:.4f}, "
        f"range {stats['min_dice']:.4f} .. {stats['max_dice']:.4f} (std {stats['std_dice']:.4f}); "
        f"1+/0-: {stats['dice_1pos_0neg']:.4f}"
        + (f", 3+/3-: {stats['dice_3pos_3neg']:.4f}" if "dice_3pos_3neg" in stats else "") + ".",
        "",
        f"![prompt sensitivity]({heatmap})",
        "",
        "| pos \\ neg | " + " | ".join(str(j) for j in range(grid.shape[1])) + " |",
        "|---" * (grid.shape[1] + 1) + "|",
    ]
    lines += [f"| {i + 1} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for i, row in enumerate(grid)]
    from bundle.io import atomic_write

    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
