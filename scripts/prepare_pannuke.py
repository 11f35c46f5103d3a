#!/usr/bin/env python
"""Prepare PanNuke for training: python scripts/prepare_pannuke.py --root PanNuke --output data/pannuke (docs/data.md).

Default protocol: fold 1 training, fold 2 validation, fold 3 test.
"""

import argparse


from bundle.data.pannuke import find_fold_dirs, prepare_pannuke  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="folder holding the fold folders ('Fold 1', 'Fold 2', 'Fold 3')")
    src.add_argument("--fold_dirs", nargs="+", help="one folder per fold, in fold order (fold 1 first)")
    p.add_argument("--output", required=True, help="output folder (images/, labels/, datalist.json)")
    p.add_argument("--train", type=int, nargs="+", default=[1], help="training fold(s) (default 1)")
    p.add_argument("--val", type=int, nargs="*", default=[2], help="validation fold(s) (default 2)")
    p.add_argument("--test", type=int, nargs="*", default=[3], help="test fold(s) (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training fractions")
    a = p.parse_args(argv)
    folds = find_fold_dirs(a.root) if a.root else {i + 1: d for i, d in enumerate(a.fold_dirs)}
    prepare_pannuke(folds, a.output, tuple(a.train), tuple(a.val), tuple(a.test), a.seed)


if __name__ == "__main__":
    main()
