#!/usr/bin/env python
"""Export a training checkpoint as the bundle's deployable models (docs/deploy.md).

    python scripts/export.py --checkpoint models/best_model.pt

builds the network the checkpoint records (model_size, image_size, LoRA: checkpoints written before the record need
--model_size / --image_size / --lora_rank; a flag that contradicts the record is refused) and writes models/model.pt (LoRA merged into the weights: PromptableSAM(lora_rank=0) loads it strictly, as
configs/inference.yaml does) and models/model.ts (TorchScript with extra/metadata.json and extra/inference.json:
MONAI Label, MONAI Deploy). The TorchScript output is checked against the eager network.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bundle.checkpoints import load_network, recorded_architecture  # noqa: E402
from bundle.export import export_bundle  # noqa: E402
from bundle.networks import SAM_SIZES, CheckpointError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint (a dict with key --key holding the network state, as MONAI's "
                        "CheckpointSaver writes) or a bare PromptableSAM state dict")
    p.add_argument("--key", default="network", help="key of the network state in the checkpoint (default: network)")
    recorded = " (default: what the checkpoint records, else {})".format
    p.add_argument("--model_size", choices=sorted(SAM_SIZES), help="SAM size trained" + recorded("vit_b"))
    p.add_argument("--image_size", type=int, help="input size trained" + recorded(224))
    p.add_argument("--lora_rank", type=int, help="LoRA rank trained, 0 if none" + recorded(64))
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha trained (default: the rank)")
    p.add_argument("--lora_targets", nargs="+",
                   help="image-encoder linears with adapters" + recorded("qkv proj lin1 lin2"))
    p.add_argument("--trainable_parts", "--trainable", nargs="*", default=["prompt_encoder", "mask_decoder"],
                   help="SAM parts trained in full (default: prompt_encoder mask_decoder)")
    p.add_argument("--bundle_root", default=str(ROOT), help="bundle whose configs/ go into model.ts (default: this)")
    p.add_argument("--output_dir", default=None, help="where model.pt / model.ts go (default: BUNDLE_ROOT/models)")
    p.add_argument("--no_verify", action="store_true", help="skip the merged / TorchScript output checks")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    given = {k: getattr(a, k) for k in ("model_size", "image_size", "lora_rank", "lora_targets")
             if getattr(a, k) is not None}  # the rest from the checkpoint's record (PromptableSAM's defaults without)
    try:
        net = load_network(a.checkpoint, key=a.key, lora_alpha=a.lora_alpha, trainable_parts=a.trainable_parts,
                           **given)
        task = recorded_architecture(a.checkpoint).get("task")
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = export_bundle(net, a.output_dir or str(Path(a.bundle_root) / "models"), a.bundle_root,
                        verify=not a.no_verify, task=task)
    for name, path in out.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
