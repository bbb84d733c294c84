"""Real image-caption sources in every import format, written by the tests.

Images are JPEG/PNG crops of scikit-learn's bundled photos (`load_sample_images`) and upsampled
digits, so the importer and the pipeline decode real files; each source also holds a corrupt
image, an over-long caption and a duplicated record, the cases the importer must handle.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

LONG_CAPTION = " ".join(["a very long caption that keeps going"] * 8)  # 56 words
CORRUPT = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 4


def sample_pictures(n: int, size: int = 48) -> list[tuple[bytes, str, str]]:
    """n (encoded bytes, extension, caption): alternating JPEG photo crops and PNG digits."""
    from sklearn.datasets import load_digits, load_sample_images

    photos = load_sample_images().images  # china, flower: 427 x 640 x 3
    digits = load_digits()
    out = []
    for i in range(n):
        if i % 2 == 0:
            photo = photos[(i // 2) % 2]
            top, left = 37 * (i // 4) % 300, 53 * (i // 4) % 500
            crop = photo[top:top + 96, left:left + 128]  # non-square: the pipeline centre-crops
            buf = io.BytesIO()
            Image.fromarray(crop).save(buf, format="JPEG", quality=90)
            name = ("a photo of a chinese temple" if (i // 2) % 2 == 0 else "a photo of a flower")
            out.append((buf.getvalue(), "jpg", f"{name} number {i}"))
        else:
            digit = digits.images[i] * (255.0 / 16.0)
            img = Image.fromarray(digit.astype(np.uint8)).resize((size, size), Image.NEAREST)
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            out.append((buf.getvalue(), "png", f"a handwritten digit {int(digits.target[i])}"))
    return out


def write_folder(root: str, n: int) -> dict:
    """DIR/<sub>/x.jpg|png + x.txt, plus a corrupt image, an image without caption, a long caption."""
    pics = sample_pictures(n)
    for i, (data, ext, caption) in enumerate(pics):
        sub = os.path.join(root, f"part{i % 3}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"img{i:03d}.{ext}"), "wb") as f:
            f.write(data)
        with open(os.path.join(sub, f"img{i:03d}.txt"), "w") as f:
            f.write(LONG_CAPTION if i == 1 else caption)
    with open(os.path.join(root, "part0", "broken.jpg"), "wb") as f:
        f.write(CORRUPT)
    with open(os.path.join(root, "part0", "broken.txt"), "w") as f:
        f.write("a corrupt file")
    with open(os.path.join(root, "part1", "nocaption.png"), "wb") as f:
        f.write(pics[1][0])
    return {"good": n, "bad": 2}


def _lines(n: int, root: str) -> list[dict]:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i, (data, ext, caption) in enumerate(sample_pictures(n)):
        rel = f"images/{i:03d}.{ext}"
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        rows.append({"image": rel, "caption": LONG_CAPTION if i == 1 else caption})
    with open(os.path.join(root, "images", "broken.jpg"), "wb") as f:
        f.write(CORRUPT)
    rows.append({"image": "images/broken.jpg", "caption": "a corrupt file"})
    rows.append(dict(rows[0]))  # a duplicate record (same key, same caption)
    rows.append({"image": rows[0]["image"], "caption": "a second caption of the first image"})
    rows.append({"image": "images/missing.jpg", "caption": "no such file"})
    rows.append({"picture": rows[2]["image"], "caption": "wrong key"})
    return rows


def write_jsonl(root: str, n: int) -> str:
    path = os.path.join(root, "data.jsonl")
    rows = _lines(n, root)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write("{not json\n")
    return path  # good: n + 1 (the second caption); bad: corrupt, missing, wrong key, not JSON


def write_csv(root: str, n: int) -> str:
    import csv

    path = os.path.join(root, "data.csv")
    rows = [r for r in _lines(n, root) if "image" in r]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({"image": rows[2]["image"], "caption": ""})  # an empty caption
    return path  # good: n + 1; bad: corrupt, missing, empty caption


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: str, n: int, shards: int = 2) -> str:
    pics = sample_pictures(n)
    per = -(-n // shards)
    for s in range(shards):
        with tarfile.open(os.path.join(root, f"shard-{s:03d}.tar"), "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                data, ext, caption = pics[i]
                _add(tar, f"sample{i:04d}.{ext}", data)
                if i % 2:
                    _add(tar, f"sample{i:04d}.json", json.dumps({"caption": caption, "i": i}).encode())
                else:
                    _add(tar, f"sample{i:04d}.txt", (LONG_CAPTION if i == 0 else caption).encode())
            if s == 0:
                _add(tar, "lonely0001.jpg", pics[0][0])  # an image without its caption member
                _add(tar, "broken0001.jpg", CORRUPT)
                _add(tar, "broken0001.txt", b"a corrupt file")
                _add(tar, "latin0001.png", pics[1][0])
                _add(tar, "latin0001.txt", "caf\xe9".encode("latin-1"))  # not UTF-8
    return os.path.join(root, "shard-{000..%03d}.tar" % (shards - 1))  # good n; bad 3


def _table(n: int) -> dict:
    pics = sample_pictures(n)
    images = [{"bytes": d, "path": f"{i}.{e}"} for i, (d, e, _) in enumerate(pics)]
    captions = [LONG_CAPTION if i == 1 else c for i, (_, _, c) in enumerate(pics)]
    images += [{"bytes": CORRUPT, "path": "broken.jpg"}, images[0]]
    captions += ["a corrupt file", captions[0]]  # the last row duplicates the first
    return {"image": images, "caption": captions}


def write_parquet(root: str, n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(_table(n))
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), os.path.join(root, "part-0.parquet"), row_group_size=5)
    pq.write_table(table.slice(half), os.path.join(root, "part-1.parquet"), row_group_size=5)
    return os.path.join(root, "part-*.parquet")  # good n; bad 1; duplicates 1


def write_hf_disk(root: str, n: int) -> str:
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    path = os.path.join(root, "hf")
    datasets.Dataset.from_dict(_table(n), features=feats).save_to_disk(path)
    return path  # good n; bad 1; duplicates 1
