"""Image sets as `dmf evaluate` reads them: a folder of images (any depth, PNG/JPEG/...) or an .npz
holding arr_0 (uint8 NHWC, ADM's sample and reference batches) or images (float NCHW in [0, 1], what
`dmf sample` also writes), read in batches of uint8 (b, 3, H, W) without loading the whole set (a
50k x 256 x 256 x 3 arr_0 is 9.8 GB)."""
from pathlib import Path

import numpy as np
import torch


def _npz_keys(path):
    import zipfile

    from .errors import DMFError

    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        raise DMFError(f"{path}: not a readable .npz file") from None


def _npz_batches(path, key, batch):
    """Rows of one array of an uncompressed .npz (np.savez, ADM), `batch` at a time, without
    reading the whole array (a 50k x 256 x 256 x 3 arr_0 is 9.8 GB)."""
    import zipfile

    from .errors import DMFError

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _npy_header(f)
        if fortran:
            raise DMFError(f"{path}: {key} is stored in Fortran order")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for i in range(0, shape[0], batch):
            k = min(batch, shape[0] - i)
            yield np.frombuffer(f.read(k * row), dtype).reshape(k, *shape[1:])


def _to_nchw_uint8(a: np.ndarray, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        a = a.transpose(0, 3, 1, 2)
    if a.dtype != np.uint8:  # float images in [0, 1]
        a = np.clip(np.floor(a.astype(np.float32) * 255 + 0.5), 0, 255).astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif t.shape[1] == 4:
        t = t[:, :3]
    return t


def image_batches(path, batch=64):
    """(count, iterator of uint8 (b, 3, H, W) batches) of a folder of images or an .npz with
    arr_0 (uint8 NHWC, ADM) or images (float NCHW in [0, 1])."""
    from .errors import DMFError
    from .prepare import IMAGE_EXTS

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DMFError(f"{path}: no images")

        def gen():
            from PIL import Image

            size = None
            for i in range(0, len(files), batch):
                arrs = []
                for f in files[i:i + batch]:
                    try:
                        with Image.open(f) as im:
                            a = np.asarray(im.convert("RGB"))
                    except Exception as e:
                        raise DMFError(f"{f}: not a readable image ({type(e).__name__})") from None
                    if size is not None and a.shape != size:
                        raise DMFError(f"{f}: size {a.shape[:2]} differs from the others' {size[:2]}")
                    size = a.shape
                    arrs.append(a)
                yield _to_nchw_uint8(np.stack(arrs), "nhwc")
        return len(files), gen()
    if path.suffix != ".npz" or not path.is_file():
        raise DMFError(f"{path}: expected a folder of images or an .npz file")
    keys = _npz_keys(path)
    key, layout = ("arr_0", "nhwc") if "arr_0" in keys else ("images", "nchw") if "images" in keys else (None, None)
    if key is None:
        raise DMFError(f"{path}: no images in it (needs arr_0 (N, H, W, C) uint8 or images (N, C, H, W)); keys "
                       f"{sorted(keys)}")
    it = _npz_batches(path, key, batch)
    first = next(it)
    if first.ndim != 4 or first.shape[3 if layout == "nhwc" else 1] not in (1, 3, 4):
        raise DMFError(f"{path}: {key} of shape {first.shape[1:]} per row is not {layout.upper()} images")
    n = _npz_len(path, key)

    def gen():
        yield _to_nchw_uint8(first, layout)
        for a in it:
            yield _to_nchw_uint8(a, layout)
    return n, gen()


def _npz_len(path, key) -> int:
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        return int(_npy_header(f)[0][0])


def _npy_header(f):
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)
