#!/usr/bin/env python
"""Import a folder of images + instance labels (MoNuSeg, CPM, Lizard, DSB2018, ...) as a zero-shot test set:
python scripts/prepare_folder.py --images DIR --labels DIR --output data/external (docs/external_data.md)."""

import argparse
import logging


from bundle.data.folder import LABEL_SUFFIXES, SCHEMES, prepare_folder  # noqa: E402


def pairs(text: str, value=int) -> dict:
    """'1:1,2:2,3:2' -> {1: 1, 2: 2, 3: 2} (values through ``value``)."""
    try:
        return {int(k): value(v) for k, v in (item.split(":", 1) for item in text.split(",") if item)}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected 'id:value,id:value,...', got {text!r} ({e})") from e


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (.png .jpg .tif .tiff .bmp .npy)")
    p.add_argument("--labels", required=True,
                   help="folder of instance labels (.png .tif .tiff .npy, .mat with inst_map, MoNuSeg .xml); "
                        "may be --images")
    p.add_argument("--output", required=True, help="output folder (images/, labels/, datalist.json)")
    p.add_argument("--classes", default=None, help="folder of class maps (a class id per pixel); default: labels' own")
    p.add_argument("--label_suffixes", nargs="+", default=list(LABEL_SUFFIXES),
                   help="label stem = image stem + one of these (default: '' _mask _masks _label _labels _inst "
                        "_instance); pass '' for none")
    p.add_argument("--type_scheme", choices=sorted(SCHEMES), default=None,
                   help="class preset: nuclei (every nucleus class 1), consep (7 types -> 4), lizard, pannuke")
    p.add_argument("--class_mapping", type=pairs, default=None, help="raw class -> written class, e.g. 3:3,4:3")
    p.add_argument("--class_names", type=lambda t: pairs(t, str), default=None,
                   help="written class -> name, e.g. 1:other,2:inflammatory")
    p.add_argument("--tile_size", type=int, default=256, help="tile side in pixels; smaller images are padded")
    p.add_argument("--stride", type=int, default=None, help="tile step (default: fewest tiles, evenly spread)")
    p.add_argument("--pad_mode", choices=("constant", "reflect"), default="constant",
                   help="padding of images smaller than a tile (labels are padded with 0)")
    p.add_argument("--pad_value", type=int, default=0, help="value of constant padding (255: white)")
    p.add_argument("--keep_empty", action="store_true", help="keep tiles without a nucleus (default: skip them)")
    p.add_argument("--invert", action="store_true",
                   help="invert intensities (255 - v): fluorescence nuclei become dark on white, as on H&E")
    p.add_argument("--split", default="test", choices=("training", "validation", "test"),
                   help="the split every item goes to (default test)")
    p.add_argument("--name", default="external", help="dataset name in the datalist")
    p.add_argument("--tissue", default=None, help="tissue name recorded on every item (evaluation stratum)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training fractions (only for --split training)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    prepare_folder(a.images, a.labels, a.output, a.classes, a.label_suffixes, a.type_scheme, a.class_mapping,
                   a.class_names, a.tile_size, a.stride, a.pad_mode, a.pad_value, a.keep_empty, a.invert, a.split,
                   a.name, a.tissue, a.seed)


if __name__ == "__main__":
    main()
