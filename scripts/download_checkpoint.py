"""Download an official SAM checkpoint listed in large_files.yml into models/, checking its md5.

    python scripts/download_checkpoint.py --model_size vit_b      # models/sam_vit_b_01ec64.pth (375 MB)

This is the only command of the bundle that contacts the network. (`python -m monai.bundle download_large_files
--bundle_path .` fetches every file in large_files.yml, ViT-H included.)
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml
from monai.apps.utils import download_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry_for(model_size: str, large_files: str) -> dict:
    with open(large_files, encoding="utf-8") as f:
        entries = yaml.safe_load(f)["large_files"]
    for entry in entries:
        if f"sam_{model_size}_" in os.path.basename(entry["path"]):
            return entry
    listed = ", ".join(os.path.basename(e["path"]) for e in entries)
    raise SystemExit(f"{large_files}: no checkpoint for model_size '{model_size}' (listed: {listed})")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="vit_b", help="vit_b (default), vit_l or vit_h")
    parser.add_argument("--bundle_root", default=REPO, help="bundle folder whose models/ receives the file")
    parser.add_argument("--large_files", default=os.path.join(REPO, "large_files.yml"), help="list of files to fetch")
    args = parser.parse_args(argv)
    entry = entry_for(args.model_size, args.large_files)
    path = os.path.join(args.bundle_root, entry["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    download_url(entry["url"], filepath=path, hash_val=entry.get("hash_val"), hash_type=entry.get("hash_type", "md5"))
    print(f"SAM {args.model_size} checkpoint: {path}")
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
