"""Time the feature-cache data key over N files: listing an image folder, the stat key and the content key.

Usage: PYTHONPATH=. python tools/bench_data_fingerprint.py 50000   (writes N tiny PNGs in a temporary folder,
removed afterwards)
"""
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from distill.data import ImageFolder, data_fingerprint

n = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
root = tempfile.mkdtemp(prefix="fpbench-")
try:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    for c in range(10):
        os.makedirs(f"{root}/c{c}")
        for i in range(n // 10):
            with open(f"{root}/c{c}/{i:06d}.png", "wb") as f:
                f.write(buf.getvalue())
    t = time.time()
    ds = ImageFolder(root)
    t_list = time.time() - t
    t = time.time()
    data_fingerprint(ds, "stat")
    t_stat = time.time() - t
    t = time.time()
    data_fingerprint(ds, "content")
    t_content = time.time() - t
    print(f"{len(ds)} files: list {t_list:.2f} s, stat key {t_stat:.2f} s ({t_stat / len(ds) * 1e6:.1f} us/file), "
          f"content key {t_content:.2f} s")
finally:
    shutil.rmtree(root)
