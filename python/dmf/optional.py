"""Optional dependencies: a missing one costs one line saying what to install, never a traceback
after the work is done.

    require("diffusers", "prepare")   -> the module, or DMFError "prepare needs diffusers: pip install ..."
    note_missing("loss.png", "matplotlib")   -> one line on stderr (once per process), then go on
    Progress(total)                    -> tqdm when installed, else a plain line every few seconds

PNG files are written here with zlib alone (8-bit gray or RGB), so sample grids and sample
folders never need matplotlib or PIL.
"""
import importlib
import struct
import sys
import time
import zlib

import numpy as np

from .errors import DMFError

FULL_SET = "pip install --no-build-isolation .[dmf]"   # every optional dependency but torch-fidelity (setup.py)
_said = set()


def require(module: str, purpose: str, pip: str = None):
    """Import `module` or stop with one line naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DMFError(f"{purpose} needs {pip or module}: pip install {pip or module} (or {FULL_SET})") from None


def note_missing(what: str, pip: str):
    """`what` is skipped: say so once per process, on stderr, with the package to install."""
    if what not in _said:
        _said.add(what)
        print(f"dmf: {what} skipped ({pip} is not installed: pip install {pip})", file=sys.stderr, flush=True)


class Progress:
    """A progress bar through tqdm when it is installed, else a plain line every `interval` seconds
    (and at the end), so long runs still show where they are."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True, interval: float = 10.0):
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.bar, self.postfix, self.interval = None, {}, interval
        self.t0 = self.t_last = time.perf_counter()
        self.n0 = initial
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                note_missing("the progress bar", "tqdm")

    def set_postfix(self, **kw):
        self.postfix = kw
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def update(self, k: int = 1):
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled:
            now = time.perf_counter()
            if now - self.t_last >= self.interval or self.n >= self.total:
                self.t_last = now
                rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
                extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
                print(f"{self.desc}: {self.n}/{self.total} ({rate:.2f}/s{extra})", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def png_bytes(arr: np.ndarray) -> bytes:
    """uint8 (H, W) gray or (H, W, 3) RGB -> a PNG file's bytes (no filter, zlib level 6)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
        raise ValueError(f"png_bytes: need uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    h, w = arr.shape[:2]
    color = 0 if arr.ndim == 2 else 2
    raw = np.concatenate([np.zeros((h, 1), np.uint8), arr.reshape(h, -1)], axis=1)  # filter byte 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def write_png(path, arr: np.ndarray):
    with open(path, "wb") as f:
        f.write(png_bytes(arr))
