#!/usr/bin/env python
"""Prepare Synapse / BTCV abdominal CT as 2D axial slices: python scripts/prepare_synapse.py --input RawData/Training
--output data/synapse (NIfTI imagesTr/ + labelsTr/), or --input train_npz (TransUNet .npz slices), or
--pair IMAGE LABEL (repeatable). See docs/data.md.
"""

import argparse


from bundle.data.synapse import LABEL_MAPPINGS, ORGANS, prepare_synapse  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="folder with imagesTr/ + labelsTr/ (.nii.gz), or with *.npz slices")
    src.add_argument("--pair", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                     help="one NIfTI image and its label map (repeat for more patients)")
    p.add_argument("--output", required=True, help="output folder (images/, labels/, datalist.json)")
    p.add_argument("--label_mapping", choices=sorted(LABEL_MAPPINGS),
                   help="label ids of the source (default: btcv for NIfTI, synapse for .npz)")
    p.add_argument("--organs", nargs="+", help=f"keep only these organs (default all): {', '.join(ORGANS)}")
    p.add_argument("--val_fraction", type=float, default=0.2, help="share of patients for validation")
    p.add_argument("--test_fraction", type=float, default=0.2, help="share of patients for test")
    p.add_argument("--val_patients", nargs="*", help="explicit validation patients (instead of the fractions)")
    p.add_argument("--test_patients", nargs="*", help="explicit test patients (instead of the fractions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split and training fractions")
    a = p.parse_args(argv)
    prepare_synapse(a.output, a.input, a.pair, a.label_mapping, a.organs, a.val_fraction, a.test_fraction,
                    a.val_patients, a.test_patients, a.seed)


if __name__ == "__main__":
    main()
