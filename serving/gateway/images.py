"""Image bytes in and out of the gateway: PNG, JPEG and WebP (Pillow).

An uploaded image is an `Upload`: its bytes, read in two stages so that a small file that
expands into a huge image costs nothing before it is allowed (serving/gateway/service.py keeps
the order): `declare` reads only the header (format, width, height; Pillow's `Image.open` is
lazy) and checks the pixel limit; `decode` expands the pixels, which the service runs in its
bounded pool after the request was charged, never on the event loop.
"""

from dataclasses import dataclass
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.gateway.errors import TOO_LARGE, ApiError, invalid

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
ACCEPTED = {"PNG", "JPEG", "WEBP"}
MAX_SIDE = 16384  # WebP's own largest side (16383) and then some: a 1 x 16M strip is no image to condition on


def encode(image: np.ndarray, output_format: str = "png", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": quality}
    Image.fromarray(image).save(buffer, format=PIL_FORMATS[output_format], **options)
    return buffer.getvalue()


@dataclass
class Upload:
    """An uploaded image; `mask`: decoded as a repaint mask, else as RGB."""

    data: bytes
    field: str
    mask: bool = False
    width: int | None = None  # from the header, once declared
    height: int | None = None

    def declare(self, max_pixels: int, max_side: int = MAX_SIDE) -> int:
        """Reads the header only; the declared pixels. INVALID_ARG for what is not a PNG, JPEG or
        WebP, TOO_LARGE over `max_pixels` or a side over `max_side` (a decompression bomb included)."""
        image = self._open()
        self.width, self.height = image.size
        if self.width * self.height > max_pixels:
            raise ApiError(
                TOO_LARGE, f"is {self.width}x{self.height}: more than this server's {max_pixels} pixels", self.field
            )
        if max(self.width, self.height) > max_side:
            raise ApiError(TOO_LARGE, f"is {self.width}x{self.height}: a side over {max_side} pixels", self.field)
        return self.width * self.height

    def load(self) -> Image.Image:
        """The decoded image. Call `declare` first."""
        image = self._open()
        try:
            image.load()
        except Exception as exc:  # whatever a truncated or corrupt file raises in Pillow's decoders: the client's data
            raise invalid(self.field, f"could not be decoded: {exc}") from None
        return image

    def decode(self) -> np.ndarray:
        """uint8 [H, W, 3], or for a mask [H, W] (255 = repaint)."""
        image = self.load()
        if not self.mask:
            return np.asarray(image.convert("RGB"))
        return alpha_repaint_mask(image) if has_alpha(image) else np.asarray(image.convert("L"))

    def _open(self) -> Image.Image:
        if not self.data:
            raise invalid(self.field, "is empty")
        try:
            image = Image.open(io.BytesIO(self.data))
        except Image.DecompressionBombError as exc:  # a header declaring more than twice Pillow's own limit
            raise ApiError(TOO_LARGE, f"declares too many pixels: {exc}", self.field) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise invalid(self.field, "is not a PNG, JPEG or WebP image") from None
        if image.format not in ACCEPTED:
            raise invalid(self.field, f"must be PNG, JPEG or WebP, got {image.format}")
        return image


def uploads(inputs: dict) -> list:
    """The Uploads among a request's inputs (an input may be one, or a list of them)."""
    found = []
    for value in inputs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Upload):
                found.append(item)
    return found


def decode_inputs(inputs: dict) -> dict:
    """The inputs holding Uploads, decoded: one array each, or the stack of a list (region masks,
    which must have one size)."""
    decoded = {}
    for name, value in inputs.items():
        if isinstance(value, Upload):
            decoded[name] = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], Upload):
            arrays = [upload.decode() for upload in value]
            if len({a.shape for a in arrays}) > 1:
                raise invalid(name, "all region masks must have one size")
            decoded[name] = np.stack(arrays)
    return decoded


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def alpha_repaint_mask(image: Image.Image) -> np.ndarray:
    """OpenAI's rule: fully transparent pixels are repainted (255), the others kept (0)."""
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return np.where(alpha == 0, 255, 0).astype(np.uint8)


def resized(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 image or mask at (height, width), bilinear."""
    if array.shape[:2] == (height, width):
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))
