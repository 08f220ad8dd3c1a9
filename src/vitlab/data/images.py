"""Reading image files as they come from the wild: any mode to RGB, and a scan for unreadable files.

Image folders hold greyscale, palette, CMYK, 16-bit and transparent files beside plain RGB ones,
and now and then a damaged or truncated one. :func:`load_rgb` turns every readable file into
8-bit RGB; :func:`scan_images` decodes every file once, when a data set is built, to find the
unreadable ones (which the data set then skips), and remembers the answer for large folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile

from .shapes import default_cache_dir


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, whatever its mode.

    Transparent images (RGBA, LA, palette or RGB with a transparent colour) are composited over
    white rather than having their alpha dropped: a plain ``convert("RGB")`` exposes whatever
    colour the invisible pixels happen to store (often black, sometimes junk), while white is
    what most viewers and documents show behind them. 16-bit greyscale (``I;16``, ``I``) is
    scaled down from the 16-bit range (Pillow's own conversion would clip it to white); CMYK
    uses Pillow's plain conversion (no colour profile).
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I"):
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """The image file at ``path``, decoded and converted to 8-bit RGB with :func:`to_rgb`."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()  # decode now, while the file is open (to_rgb may return the image itself)
        return to_rgb(image)


class DecodedCache:
    """``load_rgb`` that keeps every decoded image in memory, for data sets small enough to hold.

    Decoding a 32x32 JPEG costs about 150 us, as much as a training step spends on the image's
    share of a small model's forward pass; CIFAR-10 decoded is 150 MB. Each DataLoader worker
    fills its own copy during the first epoch (persistent workers keep it).
    """

    def __init__(self) -> None:
        self.images: dict[str, Image.Image] = {}

    def __call__(self, path: str) -> Image.Image:
        """The RGB image at ``path``, decoded on the first call and served from memory after."""
        image = self.images.get(path)
        if image is None:
            image = self.images[path] = load_rgb(path)
        return image


# --- the scan for unreadable files ------------------------------------------------------------

#: Folders with at least this many files keep their scan on disk. Decoding takes 0.1-0.2 ms per
#: small JPEG (5-10 s for CIFAR-10's 50,000 on one core), while checking that a saved scan still
#: holds takes a stat per file (0.2 s for 50,000), so small folders are simply scanned again.
_SCAN_CACHE_MIN_FILES = 1000
_SCAN_VERSION = 1  # bump when what counts as readable changes, so old scans are not reused

_ScanKey = tuple[str, int, int]  # (absolute folder, number of files, newest change in ns)


@dataclass
class Scan:
    """What decoding every file of a folder found."""

    key: _ScanKey
    #: Files that cannot be decoded, relative to the folder, in listing order.
    unreadable: list[str]
    #: (width, height) -> number of readable images of that size.
    sizes: dict[tuple[int, int], int]


# Scans done in this process: train and val of one folder are built separately but scanned once.
_scans: dict[_ScanKey, Scan] = {}


def scan_images(root: Path, paths: list[str], progress: bool = False) -> Scan:
    """Decode every file in ``paths`` (the images of the folder ``root``) to find the unreadable ones.

    The result is reused, in this process and (for large folders) across runs through a JSON
    file in the vitlab cache, while the key holds: the folder's absolute path, its number of
    files and their newest modification time (mtime or ctime, so that files copied in with an
    old mtime still count as changed).
    """
    newest = max((_changed_ns(p) for p in paths), default=0)
    key: _ScanKey = (str(root.resolve()), len(paths), newest)
    if key in _scans:
        return _scans[key]
    cache_file = None
    if len(paths) >= _SCAN_CACHE_MIN_FILES:
        digest = hashlib.sha1(json.dumps([_SCAN_VERSION, *key]).encode()).hexdigest()[:16]
        cache_file = default_cache_dir() / "imagefolder-scans" / f"{digest}.json"
    scan = _read_scan(cache_file, key) if cache_file else None
    if scan is None:
        scan = _decode_all(root, paths, key, progress)
        if cache_file:
            _write_scan(cache_file, scan)
    _scans[key] = scan
    return scan


def _changed_ns(path: str) -> int:
    try:
        st = os.stat(path)
    except OSError:  # a dangling link, or a file removed since the listing: decoding will fail too
        return 0
    return max(st.st_mtime_ns, st.st_ctime_ns)


def _decode_all(root: Path, paths: list[str], key: _ScanKey, progress: bool) -> Scan:
    items: Sequence[str] = paths
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(paths, desc=f"checking {len(paths)} images", unit="img", leave=False)
    unreadable: list[str] = []
    sizes: Counter[tuple[int, int]] = Counter()
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    # Truncated JPEGs decode "successfully" (grey bottom half) when this is on, as some libraries
    # set it; the scan must see them fail, as loading does by default.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        for path in items:
            try:
                with load_rgb(path) as image:
                    sizes[image.size] += 1
            except Exception:  # noqa: BLE001  (damaged files raise OSError, SyntaxError, ValueError, struct.error...)
                unreadable.append(os.path.relpath(path, root))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return Scan(key, unreadable, dict(sizes))


def _read_scan(path: Path, key: _ScanKey) -> Scan | None:
    try:
        blob = json.loads(path.read_text())
        if blob["version"] != _SCAN_VERSION or tuple(blob["key"]) != key:
            return None
        sizes = {(int(w), int(h)): int(n) for w, h, n in blob["sizes"]}
        return Scan(key, [str(name) for name in blob["unreadable"]], sizes)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: scan again


def _write_scan(path: Path, scan: Scan) -> None:
    blob = {"version": _SCAN_VERSION, "key": list(scan.key), "unreadable": scan.unreadable,
            "sizes": [[w, h, n] for (w, h), n in scan.sizes.items()]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(blob))
        os.replace(tmp, path)  # atomic: a run starting meanwhile never reads half a file
    except OSError:
        pass  # an unwritable cache only costs scanning again next time
