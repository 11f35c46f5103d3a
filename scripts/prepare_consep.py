#!/usr/bin/env python
"""Prepare CoNSeP for training: python scripts/prepare_consep.py --input CoNSeP --output data/consep (docs/data.md)."""

import argparse


from bundle.data.consep import SOURCE_PATTERN, prepare_consep  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True, help="CoNSeP folder with Train/ and Test/ (Images/*.png, Labels/*.mat)")
    p.add_argument("--output", required=True, help="output folder (images/, labels/, datalist.json)")
    p.add_argument("--type_scheme", type=int, choices=(7, 4), default=7,
                   help="7: official types, merged to 4; 4: labels already merged (default 7)")
    p.add_argument("--tile_size", type=int, default=256, help="tile side in pixels (default 256)")
    p.add_argument("--stride", type=int, default=None,
                   help="tile step; default: fewest tiles spread evenly (1000 px -> 0, 248, 496, 744)")
    p.add_argument("--val_fraction", type=float, default=0.2, help="share of Train source images for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and training fractions")
    p.add_argument("--source_pattern", default=SOURCE_PATTERN,
                   help="regex with group 'source' that maps a file stem to its source image")
    a = p.parse_args(argv)
    prepare_consep(a.input, a.output, a.type_scheme, a.tile_size, a.stride, a.val_fraction, a.seed, a.source_pattern)


if __name__ == "__main__":
    main()
