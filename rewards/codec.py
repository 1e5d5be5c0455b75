"""The wire format shared by the reward client and server: base64 PNG images, a bearer token.

Decoding is the server's attack surface, so it validates in the order that keeps it cheap: base64
first, then the image header (format and size), and only then the pixels. PIL's `Image.open` reads
just the header, so an image whose header claims 30000 x 30000 pixels is refused before a single
pixel buffer is allocated.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib

import numpy as np
from PIL import Image

# The environment variable holding the shared secret; clients send it as `Authorization: Bearer`.
TOKEN_ENV = "TRUSTGRPO_REWARD_TOKEN"

# PNG is lossless, so a score computed on the server equals the one computed in-process. JPEG is
# accepted for clients that trade exactness for bandwidth; every other format is refused, since
# each extra PIL decoder is extra attack surface.
ACCEPTED_FORMATS = ("PNG", "JPEG")

# What PIL raises on corrupt or truncated files, depending on the plugin and the failure.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageTooLarge(ValueError):
    """The image header declares more pixels than the caller allows (the server answers 413)."""


def encode_image(image: np.ndarray) -> str:
    """A uint8 [H, W, 3] array as a base64 PNG string."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"encode_image expects a uint8 [H, W, 3] array, got a {described}")
    buffer = io.BytesIO()
    # compress_level=1: the bytes mostly travel over loopback, where encode time costs more
    # than size; the format stays lossless at every level.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, *, max_pixels: int) -> np.ndarray:
    """A base64 PNG or JPEG string as a uint8 [H, W, 3] array.

    Raises ValueError for anything else, and ImageTooLarge (a ValueError) when the header declares
    more than `max_pixels` pixels; the size is checked before any pixel is decoded.
    """
    if not isinstance(data, str):
        raise ValueError(f"an image must be a base64 string, got {type(data).__name__}")
    try:
        # validate=True: refuse stray characters instead of silently skipping them.
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"image is not valid base64: {err}") from err
    try:
        opened = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as err:
        # PIL's own guard (Image.MAX_IMAGE_PIXELS) fires inside open() for absurd headers.
        raise ImageTooLarge(f"image is too large: {err}; the limit is {max_pixels} pixels") from err
    except _DECODE_ERRORS as err:
        raise ValueError(f"image is not a PNG or JPEG image ({type(err).__name__}: {err})") from err
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels")
        if width == 0 or height == 0:
            raise ValueError(f"image has an empty size {width}x{height}")
        try:
            # convert() decodes the pixels; RGBA, palette, grey and 16-bit inputs all become RGB.
            rgb = opened.convert("RGB")
        except _DECODE_ERRORS as err:
            raise ValueError(f"image {width}x{height} could not be decoded ({type(err).__name__}: {err})") from err
    return np.array(rgb, dtype=np.uint8)
