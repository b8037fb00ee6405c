#!/usr/bin/env python
"""Copy the CamVid 240x180 layout with the images as JPEG (quality 95) and the masks unchanged (PNG, lossless):
the form in which the data travels to the GPU machine (a 64 MiB transfer limit); distill reads .jpg images with
.png masks of the same stem.

    python bench/camvid_jpeg.py ~/.cache/distill/camvid-240x180 /tmp/camvid-jpg [--max-per-split N]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--max-per-split", type=int, default=None, help="only the first N images of each split (smoke)")
    args = p.parse_args(argv)
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if dst.exists():
        raise SystemExit(f"'{dst}' exists; choose a new folder (nothing was written).")
    for split in ("train", "val", "test"):
        (dst / split).mkdir(parents=True)
        (dst / f"{split}annot").mkdir()
        for img in sorted((src / split).glob("*.png"))[:args.max_per_split]:
            with Image.open(img) as im:
                im.convert("RGB").save(dst / split / f"{img.stem}.jpg", quality=args.quality)
            shutil.copy2(src / f"{split}annot" / img.name, dst / f"{split}annot" / img.name)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
