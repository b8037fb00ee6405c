import io, os, sys, time, tempfile
import numpy as np
from PIL import Image
from distill.data import ImageFolder, data_fingerprint
n = int(sys.argv[1])
root = tempfile.mkdtemp(prefix="fpbench-")
buf = io.BytesIO(); Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG"); b = buf.getvalue()
for c in range(10):
    os.makedirs(f"{root}/c{c}")
    for i in range(n // 10):
        with open(f"{root}/c{c}/{i:06d}.png", "wb") as f:
            f.write(b)
t = time.time(); ds = ImageFolder(root); t_list = time.time() - t
t = time.time(); data_fingerprint(ds, "stat"); t_stat = time.time() - t
t = time.time(); data_fingerprint(ds, "content"); t_content = time.time() - t
print(f"{len(ds)} files: list {t_list:.2f} s, stat key {t_stat:.2f} s ({t_stat / len(ds) * 1e6:.1f} us/file), content key {t_content:.2f} s")
