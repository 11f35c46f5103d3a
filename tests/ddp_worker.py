"""Run by ``tests/test_distributed.py`` under torchrun (gloo, CPU): two SAMPO trainer steps of the tiny network on
this rank's share of fixed batches, through DDP, once with the SUP + IoU-head objective and once with the full SAMPO
loss; writes this rank's trained parameters to ``<out>/<objective>_rank<r>.pt``. Then two epochs of the full loss
with and without the reference-embedding cache (``sampo2`` / ``sampo2_cached``; the cached run also saves its
cache's hit / miss counts under ``_cache``)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, PER_STEP = 2, 4  # union batch of 4 images per step, split over the ranks


def union_batches() -> list[dict]:
    """The batches one process would train on: STEPS batches of PER_STEP images with targets and 4 prompt sets."""
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        target = torch.zeros(PER_STEP, 1, 64, 64)
        for i in range(PER_STEP):
            target[i, :, 8 + 4 * i:36 + 2 * i, 10:44 - 3 * i] = 1
        out.append({"image": torch.rand(PER_STEP, 3, 64, 64, generator=g), "label": target,
                    "points": torch.randint(0, 64, (PER_STEP, 4, 6, 2), generator=g).float(),
                    "point_labels": torch.randint(0, 2, (PER_STEP, 4, 6), generator=g)})
    return out


def train(batches: list[dict], objective: str, epochs: int = 1, **kwargs) -> dict:
    """The trained parameters after ``epochs`` epochs over ``batches`` (SGD, tiny network, seeded)."""
    from bundle.engines import SAMPOTrainer
    from bundle.networks import PromptableSAM
    from bundle.preference import SAMPOLoss

    torch.manual_seed(0)
    net = PromptableSAM("tiny", 64, lora_rank=4, seed=0)
    with torch.no_grad():  # LoRA B starts at zero; move it so every adapter gets a gradient in the first step
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    loss = SAMPOLoss(use_po1=objective == "sampo", use_po2=objective == "sampo")
    if batches:
        SAMPOTrainer("cpu", epochs, batches, net, opt, loss, decollate=False, **kwargs).run()
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def main(out: str) -> None:
    from bundle import distributed

    distributed.init()
    r, w = distributed.rank(), distributed.world_size()
    share = PER_STEP // w
    mine = [{k: v[r * share:(r + 1) * share] for k, v in b.items()} for b in union_batches()]
    for objective in ("sup", "sampo"):
        torch.save(train(mine, objective, distributed=True), os.path.join(out, f"{objective}_rank{r}.pt"))
    from bundle.reference_cache import ReferenceEmbeddingCache

    cache = ReferenceEmbeddingCache()
    cached = train(mine, "sampo", 2, distributed=True, reference_cache=cache)
    cached["_cache"] = torch.tensor([cache.hits, cache.misses])
    torch.save(cached, os.path.join(out, f"sampo2_cached_rank{r}.pt"))
    torch.save(train(mine, "sampo", 2, distributed=True), os.path.join(out, f"sampo2_rank{r}.pt"))
    distributed.finalize()


if __name__ == "__main__":
    main(sys.argv[1])
