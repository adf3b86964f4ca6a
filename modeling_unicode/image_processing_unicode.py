"""Image processor of UniCode: any common image -> RGB, square, scaled to [-1, 1] (PIL backend).

The visual tokenizer is trained and tested at one resolution (arXiv 2403.09072, its stated limitations), so every
image is brought to `size` x `size`, by squashing or by a centre crop, as configured.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

RESIZE_MODES = ("squash", "center_crop")
# PIL's own default bomb limit (about 89 Mpx); anything larger is refused before it is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}


def _sixteen_bit_to_eight(image: PIL.Image.Image) -> PIL.Image.Image:
    """I;16* / I images -> L. PIL's own conversion clips 16-bit values at 255 (a white image)."""
    array = np.asarray(image).astype(np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
        raise ValueError(
            f"a mode {image.mode!r} image has values in [{array.min()}, {array.max()}], outside 16-bit range; "
            "convert it to 8-bit RGB first"
        )
    return PIL.Image.fromarray(np.round(array * (255.0 / top)).astype(np.uint8))


def to_rgb(image: PIL.Image.Image, background=(255, 255, 255)) -> PIL.Image.Image:
    """Any PIL mode the tokenizer can see -> RGB. Transparency is composited over `background`
    (dropping alpha would turn transparent pixels into whatever colour they happen to hold)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_eight(image).convert("RGB")
    if mode == "F":
        raise ValueError(
            "float images (PIL mode 'F') have no fixed range; scale to 8-bit and convert to RGB first "
            "(e.g. Image.fromarray(np.uint8(255 * (x - x.min()) / np.ptp(x))))"
        )
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = PIL.Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return PIL.Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as error:
        raise ValueError(
            f"cannot convert a PIL image of mode {mode!r} to RGB ({error}); convert it to RGB first"
        ) from error


def pixel_values_from_uint8(images):
    """uint8 RGB, channels first (NumPy array or torch tensor) -> float32 in [-1, 1]: the one definition
    of the pixel range the visual tokenizer is trained on."""
    if isinstance(images, np.ndarray):
        return images.astype(np.float32) / 127.5 - 1.0
    return images.float() / 127.5 - 1.0


def uint8_from_pixel_values(pixel_values):
    """Inverse of `pixel_values_from_uint8`, rounding and clipping as an image file would (a decoder
    overshoots [-1, 1] a little). NumPy in, NumPy out; torch in, torch out."""
    scaled = ((pixel_values + 1.0) * 127.5).clip(0, 255).round()
    return scaled.astype(np.uint8) if isinstance(scaled, np.ndarray) else scaled.byte()


class UniCodeImageProcessor(BaseImageProcessor):
    r"""Turns images into `pixel_values` of shape (batch, 3, size, size) in [-1, 1] for the UniCode
    visual tokenizer, and generated pixels back into PIL images (`postprocess`).

    Args:
        size (`int`): output side in pixels; must equal the visual tokenizer's `image_size`.
        resize_mode (`str`): `"squash"` resizes to size x size, ignoring the aspect ratio (nothing is
            lost); `"center_crop"` resizes the short side to `size` and crops the centre (no distortion).
        resample (`str`): PIL filter — nearest, bilinear, bicubic or lanczos.
        max_image_pixels (`int`): images with more pixels are refused (decompression bombs).
        background_color (`list[int]`): RGB that transparent pixels are composited onto.

    Accepts PIL images, encoded bytes, file paths, and uint8 NumPy arrays (H, W), (H, W, 3|4).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 256,
        resize_mode: str = "squash",
        resample: str = "bicubic",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        background_color=(255, 255, 255),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):  # tolerate {"height": s, "width": s}, the transformers convention
            if size.get("height") != size.get("width"):
                raise ValueError(f"size={size} must be square; the visual tokenizer reads size x size images")
            size = size["height"]
        if int(size) < 1:
            raise ValueError(f"size={size} must be a positive number of pixels")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r} is not supported; use one of {list(RESIZE_MODES)}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample={resample!r} is not supported; use one of {sorted(_RESAMPLE)}")
        self.size = int(size)
        self.resize_mode = resize_mode
        self.resample = resample
        self.max_image_pixels = int(max_image_pixels)
        self.background_color = [int(c) for c in background_color]

    # -- loading ----------------------------------------------------------------------------------
    def _check_pixels(self, width: int, height: int, index: int) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"image {index} has size {width}x{height}; an image needs at least one pixel")
        if width * height > self.max_image_pixels:
            raise ValueError(
                f"image {index} has {width}x{height} = {width * height} pixels, over max_image_pixels="
                f"{self.max_image_pixels} (decompression-bomb guard); downscale it first or raise max_image_pixels"
            )

    def _open(self, source: Union[bytes, str, os.PathLike], index: int) -> PIL.Image.Image:
        """Open encoded bytes or a file, checking the declared size BEFORE decoding the pixels."""
        stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            # The bomb check below is ours (clear, configurable); PIL's would fire first at 2x its limit.
            previous, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
            try:
                image = PIL.Image.open(stream)
            finally:
                PIL.Image.MAX_IMAGE_PIXELS = previous
            self._check_pixels(image.width, image.height, index)
            image.load()
        except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(
                f"image {index} could not be decoded ({error}); the file is corrupt or not an image"
            ) from error
        return image

    def load_image(self, image, index: int = 0) -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            self._check_pixels(image.width, image.height, index)
            return image
        if isinstance(image, (bytes, bytearray, str, os.PathLike)):
            return self._open(image, index)
        if isinstance(image, np.ndarray):
            if (
                image.dtype != np.uint8
                or image.ndim not in (2, 3)
                or (image.ndim == 3 and image.shape[2] not in (1, 3, 4))
            ):
                raise ValueError(
                    f"image {index} is a NumPy array of dtype {image.dtype} and shape {image.shape}; pass uint8 "
                    "(H, W), (H, W, 3) or (H, W, 4) arrays, or PIL images"
                )
            self._check_pixels(image.shape[1], image.shape[0], index)
            return PIL.Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        raise TypeError(
            f"image {index} is a {type(image).__name__}; pass PIL images, encoded bytes, file paths or uint8 NumPy "
            "arrays"
        )

    # -- geometry -------------------------------------------------------------------------------
    def resize(self, image: PIL.Image.Image) -> PIL.Image.Image:
        size, resample = self.size, _RESAMPLE[self.resample]
        if self.resize_mode == "squash":
            return image if image.size == (size, size) else image.resize((size, size), resample=resample)
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), resample=resample)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))

    def fit(self, image, index: int = 0) -> PIL.Image.Image:
        """One image of any accepted kind, size and mode -> RGB, `size` x `size`, by `resize_mode`: the one
        policy for inference and for training (`training.stage1.images_to_uint8` calls it)."""
        return self.resize(to_rgb(self.load_image(image, index), tuple(self.background_color)))

    # -- the processor --------------------------------------------------------------------------
    def preprocess(self, images, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """Images -> {"pixel_values": (batch, 3, size, size) float32 in [-1, 1]}, a torch tensor unless
        `return_tensors` says otherwise (`"np"`, or None for NumPy arrays)."""
        unknown = {k for k, v in kwargs.items() if v is not None} - {"do_convert_rgb"}
        if unknown:
            raise TypeError(f"UniCodeImageProcessor got unexpected arguments {sorted(unknown)}")
        batch = self._flatten(images)
        if not batch:
            raise ValueError("images is empty; pass at least one image")
        arrays = []
        for index, image in enumerate(batch):
            arrays.append(pixel_values_from_uint8(np.asarray(self.fit(image, index)).transpose(2, 0, 1)))
        return BatchFeature({"pixel_values": np.stack(arrays)}, tensor_type=return_tensors)

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    @staticmethod
    def _flatten(images) -> list:
        if isinstance(images, (list, tuple)):
            flat = []
            for item in images:
                flat.extend(item if isinstance(item, (list, tuple)) else [item])
            return flat
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        return [images]

    def postprocess(self, pixel_values) -> list[PIL.Image.Image]:
        """Pixels (batch, 3, H, W) in [-1, 1] (e.g. `decode_image_tokens`) -> PIL RGB images.
        Values outside [-1, 1] (a decoder overshoots a little) are clipped to the displayable range."""
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().float().cpu().numpy()
        array = np.asarray(pixel_values, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (batch, 3, height, width), got {array.shape}")
        if not np.isfinite(array).all():
            # Clipping would turn NaN into black pixels: an image that hides a failed decode.
            raise ValueError("pixel_values contain NaN or inf; the decoder or its weights produced them, not an image")
        array = uint8_from_pixel_values(array).transpose(0, 2, 3, 1)
        return [PIL.Image.fromarray(item) for item in array]


__all__ = ["UniCodeImageProcessor", "to_rgb", "pixel_values_from_uint8", "uint8_from_pixel_values"]
