"""Whole-field comparison (issue 22): recovered CoNSeP fields, resize / routed / propagate, two click placements.

    python scripts/whole_field.py --model ../sampo_runs/consep_t1/f10/sampo_disagreement/seed0/models/model.pt \
        --split Test --seeds 0 1 --output /tmp/wf.json [--confident 0.55]

``--split Train --sources train_13 train_19 train_2 train_27 train_9`` evaluates the validation fields (the
validation sources of data/consep/datalist.json), on which ``--confident`` is chosen. ``--synthetic N --size 1024``
evaluates N fields of the embedded generator instead of CoNSeP's. The table of means is printed and, with
``--table``, written as markdown. The library is
bundle/whole_field.py; this script is argument parsing and a JSON file.
"""

import argparse
import logging
import os


from bundle.checkpoints import load_network  # noqa: E402
from bundle.io import atomic_write, save_json  # noqa: E402
from bundle.whole_field import METHODS, evaluate_fields, field_table, recover_field, synthetic_fields  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models/model.pt of a trained bundle")
    p.add_argument("--data", default="../shared/data/consep", help="CoNSeP folder with Train/ and Test/")
    p.add_argument("--split", default="Test", choices=("Train", "Test"))
    p.add_argument("--sources", nargs="+", help="field stems (default: test_1 .. test_9)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--confident", type=float, default=0.55)
    p.add_argument("--synthetic", type=int, metavar="N", help="N synthetic fields instead of CoNSeP's")
    p.add_argument("--size", type=int, default=1024, help="side of the synthetic fields in px (default 1024)")
    p.add_argument("--output", required=True, help="JSON of the rows")
    p.add_argument("--table", help="markdown table of the means (default: printed only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.synthetic:
        fields = synthetic_fields(args.synthetic, args.size)
    else:
        root = os.path.join(args.data, args.split)
        sources = args.sources or [f"test_{k}" for k in range(1, 10)]
        fields = {s: recover_field(os.path.join(root, "Images"), os.path.join(root, "Labels"), s) for s in sources}
    net = load_network(args.model).eval()
    rows = evaluate_fields(net, fields, net.image_size, seeds=tuple(args.seeds), methods=tuple(args.methods),
                           confident=args.confident)
    print(save_json(rows, args.output))
    text = field_table(rows)
    print(text)
    if args.table:
        with atomic_write(args.table, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
