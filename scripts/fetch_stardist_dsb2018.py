#!/usr/bin/env python
"""Get the DSB2018 test image that the `stardist` package ships (stardist/data/images/img2d.tif + mask2d.tif: one
512 x 512 16-bit fluorescence image of the 2018 Data Science Bowl, Caicedo et al., Nature Methods 2019, with its
instance mask) as an image folder + label folder for scripts/prepare_folder.py:

    python scripts/fetch_stardist_dsb2018.py --output /tmp/ext_data/dsb2018_raw
    python scripts/prepare_folder.py --images /tmp/ext_data/dsb2018_raw/images \
        --labels /tmp/ext_data/dsb2018_raw/labels --output /tmp/ext_data/dsb2018 --name dsb2018

Only this command reaches the network, and only the package registry: it runs `pip download stardist==VERSION
--no-deps` into a temporary folder (stardist is not installed, nor a dependency of the bundle). `--package FILE`
uses a wheel or sdist already downloaded instead.
"""

import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.9.2"
MEMBERS = {"images/dsb2018.tif": "stardist/data/images/img2d.tif", "labels/dsb2018.tif": "stardist/data/images/mask2d.tif"}


def download(folder: Path, version: str = VERSION) -> Path:
    """`pip download stardist==version --no-deps` into ``folder``; the file it saved."""
    cmd = [sys.executable, "-m", "pip", "download", f"stardist=={version}", "--no-deps", "-d", str(folder)]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = sorted(p for p in folder.iterdir() if p.name.startswith("stardist"))
    if not found:
        raise FileNotFoundError(f"pip saved no stardist package in {folder}")
    return found[0]


def read_members(package: Path) -> dict[str, bytes]:
    """The two files of ``MEMBERS`` from a wheel (zip) or an sdist (tar.gz), by the end of their path."""
    if zipfile.is_zipfile(package):
        with zipfile.ZipFile(package) as z:
            names = {n: (lambda n=n: z.read(n)) for n in z.namelist()}
            return _pick(names, package)
    with tarfile.open(package) as t:
        names = {m.name: (lambda m=m: t.extractfile(m).read()) for m in t.getmembers() if m.isfile()}
        return _pick(names, package)


def _pick(names: dict, package: Path) -> dict[str, bytes]:
    out = {}
    for target, member in MEMBERS.items():
        hits = [n for n in names if n.endswith(member)]
        if not hits:
            raise FileNotFoundError(f"{package}: no {member} inside (another stardist version?)")
        out[target] = names[hits[0]]()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write images/dsb2018.tif and labels/dsb2018.tif")
    p.add_argument("--package", default=None, help="a stardist wheel / sdist already downloaded (no network)")
    p.add_argument("--version", default=VERSION, help=f"stardist version to download (default {VERSION})")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(a.package) if a.package else download(Path(tmp), a.version)
        files = read_members(package)
    for target, data in files.items():
        path = Path(a.output) / target
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        partial.replace(path)
        print(f"wrote {path} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
