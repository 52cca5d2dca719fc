"""Image bytes in and out of the gateway: PNG, JPEG and WebP (Pillow).

Uploaded images are checked against the gateway's pixel limit from their header, before any
pixel is decoded, so a small file that expands into a huge image is refused cheaply.
"""
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.gateway.errors import TOO_LARGE, ApiError, invalid

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
ACCEPTED = {"PNG", "JPEG", "WEBP"}


def encode(image: np.ndarray, output_format: str = "png", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": quality}
    Image.fromarray(image).save(buffer, format=PIL_FORMATS[output_format], **options)
    return buffer.getvalue()


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    if not data:
        raise invalid(field, "is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        raise invalid(field, "is not a PNG, JPEG or WebP image") from None
    if image.format not in ACCEPTED:
        raise invalid(field, f"must be PNG, JPEG or WebP, got {image.format}")
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(TOO_LARGE, f"is {width}x{height}: more than this server's {max_pixels} pixels", field)
    try:
        image.load()
    except (OSError, ValueError) as exc:
        raise invalid(field, f"could not be decoded: {exc}") from None
    return image


def decode_rgb(data: bytes, field: str, max_pixels: int) -> np.ndarray:
    """uint8 [H, W, 3]."""
    return np.asarray(open_image(data, field, max_pixels).convert("RGB"))


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def alpha_repaint_mask(image: Image.Image) -> np.ndarray:
    """OpenAI's rule: fully transparent pixels are repainted (255), the others kept (0)."""
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return np.where(alpha == 0, 255, 0).astype(np.uint8)


def decode_mask(data: bytes, field: str, max_pixels: int) -> np.ndarray:
    """uint8 [H, W], 255 = repaint: the alpha rule for images with transparency, else luminance."""
    image = open_image(data, field, max_pixels)
    if has_alpha(image):
        return alpha_repaint_mask(image)
    return np.asarray(image.convert("L"))


def resized(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 image or mask at (height, width), bilinear."""
    if array.shape[:2] == (height, width):
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))
