"""Image loading that never hands the model a half-decoded or oddly-moded picture.

`load_image` always returns a fully decoded 8-bit RGB `PIL.Image.Image` or raises
`BadImageError`, which loaders turn into a counted skip. Truncated files are errors:
`PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is left off on purpose (it pads with grey; if
other code turns it on, a warning says truncation can no longer be detected).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

log = logging.getLogger(__name__)
_warned_truncated_flag = False

MIN_IMAGE_SIDE = 2  # pixels; a 1-pixel image is almost certainly a placeholder or a bug


class BadImageError(ValueError):
    """An image file that cannot be used: missing, unreadable, truncated or too small."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"cannot use image {self.path}: {reason}. Replace or re-download the file, "
            "or remove its record from the dataset (loaders with check_images=True skip it)."
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # [H, W]
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        elif arr.size and (arr.min() < 0.0 or arr.max() > 255.0):
            # 32-bit data of unknown range (e.g. a 16-bit PNG decoded as "I", or floats):
            # 16-bit if it fits, else stretch min..max so nothing saturates silently.
            if arr.min() >= 0.0 and arr.max() <= 65535.0:
                arr = arr / 257.0
            else:
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "PA", "RGBa"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB (a copy)


def load_image(path: str | Path) -> Image.Image:
    """Load an image fully decoded as 8-bit RGB.

    Grayscale, palette, CMYK and 16-bit images are converted (16-bit scaled by 1/257, not
    clipped); RGBA / LA / palette transparency are composited on white; EXIF orientation
    is applied. Raises `BadImageError` (a `ValueError`) for a missing file, bytes PIL
    cannot decode, a truncated file (decoding is forced with `img.load()`), or an image
    smaller than 2x2 pixels.
    """
    global _warned_truncated_flag
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "file not found" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise BadImageError(path, "unreadable: the file is empty (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code: truncated "
                    "images will load padded with grey instead of being skipped")
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode: truncation surfaces here, not later
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception as err:  # corrupt EXIF: the pixels are fine, keep them unrotated
                log.warning("ignoring unreadable EXIF orientation of %s (%s)", path, err)
            rgb = _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise BadImageError(
            path, f"too many pixels ({err}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from err
    except Exception as err:  # PIL raises many types for bad bytes (OSError, SyntaxError, ...)
        raise BadImageError(path, f"unreadable or truncated ({type(err).__name__}: {err})") from err
    width, height = rgb.size
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise BadImageError(
            path, f"image is {width}x{height} pixels, smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
        )
    return rgb
