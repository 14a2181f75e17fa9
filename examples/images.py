"""Resize an uploaded image and make thumbnails in the background.

Each size is a CPU-bound job run in the worker's process pool (``process=True``); a
chord fans out one job per size and then runs ``summarize`` with all their results.
Uses Pillow when it is installed, else a tiny pure-Python PPM scaler.

    python examples/images.py [DATA_DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

from conveyor.jobs import App, Worker, chord

app = App("images")
SIZES = [(640, 480), (128, 96), (64, 48)]


def make_ppm(path: str, w: int, h: int) -> None:
    """A test image: a colour gradient, as binary PPM."""
    pixels = bytearray()
    for y in range(h):
        for x in range(w):
            pixels += bytes((x * 255 // w, y * 255 // h, 128))
    with open(path, "wb") as f:
        f.write(b"P6 %d %d 255\n" % (w, h) + bytes(pixels))


def _read_ppm(path: str) -> tuple[int, int, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    magic, w, h, _maxval, rest = data.split(maxsplit=4)
    assert magic == b"P6"
    return int(w), int(h), rest


@app.task(queue="images", process=True, timeout=60)
def resize(src: str, width: int, height: int) -> dict[str, object]:
    root, _ = os.path.splitext(src)
    try:
        from PIL import Image

        out = f"{root}-{width}x{height}.png"
        with Image.open(src) as im:
            im.resize((width, height)).save(out)
        return {"path": out, "size": [width, height], "pid": os.getpid(), "lib": "pillow"}
    except ImportError:
        w, h, px = _read_ppm(src)
        out = f"{root}-{width}x{height}.ppm"
        rows = bytearray()
        for y in range(height):
            sy = y * h // height
            for x in range(width):
                i = (sy * w + x * w // width) * 3
                rows += px[i : i + 3]
        with open(out, "wb") as f:
            f.write(b"P6 %d %d 255\n" % (width, height) + bytes(rows))
        return {"path": out, "size": [width, height], "pid": os.getpid(), "lib": "ppm"}


@app.task(queue="images")
def summarize(results: list[dict[str, object]], upload: str) -> list[str]:
    return [str(r["path"]) for r in results]


def main(data: str) -> list[str]:
    app.connect(os.path.join(data, "db"))
    src = os.path.join(data, "upload.ppm")
    make_ppm(src, 800, 600)
    stop = threading.Event()
    worker = threading.Thread(target=Worker(app, processes=2).run, args=(stop,))
    worker.start()
    try:
        flow = chord([resize.s(src, w, h) for w, h in SIZES], summarize.s(src)).enqueue()
        paths: list[str] = flow.result(timeout=60)
        for p in paths:
            print(p, os.path.getsize(p), "bytes")
    finally:
        stop.set()
        worker.join()
        app.close()
    return paths


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="conveyor-"))
