"""Pixels -> scene graph for Shapes world images: the judge of generated images.

Steps: attribute every pixel to the background or to one palette colour by projecting it on
the segment background -> colour (anti-aliased and JPEG-smeared edges lie on that segment);
connected components per colour; per component, coverage-weighted area, extent and centroid;
shape from fill ratio of the extent box and the centroid's vertical offset; size from extent;
grid cell from centroid.

The parser refuses rather than guesses: ``parse_scene`` returns ``None`` (the reason via
``return_reason=True``) when the background is not dominant, when many pixels fit no palette
colour, or when a component's features fall between classes, outside the two sizes, near a
cell border, or two components share a cell. A scored generated image that is unparseable is
simply wrong on every attribute.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from .shapes import BACKGROUND, COLORS, GRID, POSITIONS, SHAPES, SIZES, shape_centroid_offset, shape_coverage

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _COLOR_NAMES], np.float32)
_BG = np.asarray(BACKGROUND, np.float32)
_DIRS = _PALETTE - _BG
_DIR_NORM2 = (_DIRS**2).sum(-1)

# Thresholds, in 0-255 RGB units or fractions, set from clean / JPEG-75 / blurred renders
# (scripts/parser_accuracy.py measures them).
BACKGROUND_TOLERANCE = 45.0  # |pixel - background| below this: background
PALETTE_TOLERANCE = 60.0  # distance to the background->colour segment above this: off-palette
MIN_BACKGROUND_FRACTION = 0.45
MAX_OFF_PALETTE_FRACTION = 0.02
MAX_SPECK_FRACTION = 0.01
COVERAGE_THRESHOLD = 0.5  # component mask: pixels at least half covered
# Template fit: mean absolute coverage error per unit of template area. The template is also
# tried blurred, since JPEG and resampling soften edges.
TEMPLATE_BLURS = (0.0, 0.6, 1.0)
MAX_FIT_ERROR = 0.45
CENTER_SEARCH = ((0.0, 0.0),)  # sub-pixel centre search measured no gain on JPEG-75
MIN_FIT_MARGIN = 1.15  # the runner-up must fit this much worse, or the parser refuses
CELL_BORDER_MARGIN = 0.06  # centroid closer than this (fraction of a cell) to a border: ambiguous


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, dict) and "bytes" in image:  # a datasets Image cell, not decoded
        return np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # a torch tensor; no torch import needed to read it
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or an HxWx3 / 3xHxW array, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < -1e-6 or array.max() > 1 + 1e-6:
            raise ValueError("a float image must be in [0, 1]; rescale it (e.g. (x + 1) / 2 for [-1, 1]) first")
        return array.astype(np.float32) * 255.0
    raise TypeError(f"image array must be uint8 or float in [0, 1], got dtype {array.dtype}")


def _pixel_attribution(rgb: np.ndarray):
    """Per pixel: best colour index, its coverage along background->colour, and distances."""
    d = rgb - _BG  # H, W, 3
    coverage = np.einsum("hwc,kc->hwk", d, _DIRS) / _DIR_NORM2  # H, W, K
    clipped = np.clip(coverage, 0.0, 1.0)
    residual = np.linalg.norm(d[..., None, :] - clipped[..., None] * _DIRS, axis=-1)  # H, W, K
    best = residual.argmin(-1)
    best_cov = np.take_along_axis(coverage, best[..., None], -1)[..., 0]
    best_res = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    distance_to_bg = np.linalg.norm(d, axis=-1)
    return best, best_cov, best_res, distance_to_bg, coverage


def pixel_colours(image) -> np.ndarray:
    """(H, W) index into COLORS of each pixel's palette colour as the parser attributes it; -1 for
    background. For tools that ask what colour an image region is without parsing whole shapes."""
    best, _, _, distance_to_bg, _ = _pixel_attribution(_to_array(image))
    return np.where(distance_to_bg < BACKGROUND_TOLERANCE, -1, best)


def patch_colours(image, grid: int, coverage: float) -> np.ndarray:
    """(grid, grid) dominant colour index per square patch (the visual tokenizer's code positions),
    -1 where less than `coverage` of the patch is that one colour. What a code at that position
    would have to say for a reader to name the patch's colour."""
    colours = pixel_colours(image)
    size = colours.shape[0] // grid
    if size < 1 or colours.shape[0] % grid or colours.shape[1] != colours.shape[0]:
        raise ValueError(f"grid={grid} must divide the square image's side {colours.shape[0]} (got {colours.shape})")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage={coverage} must be in (0, 1]: the least coloured fraction of a labelled patch")
    blocks = colours.reshape(grid, size, grid, size).transpose(0, 2, 1, 3).reshape(grid, grid, size * size)
    counts = np.stack([(blocks == c).sum(-1) for c in range(len(_COLOR_NAMES))], -1)
    return np.where(counts.max(-1) >= coverage * size * size, counts.argmax(-1), -1)


def _luma(rgb):
    return np.asarray(rgb, np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)


LUMA_WEIGHT = (
    1.0  # coverage from luminance: JPEG keeps it at full resolution, chroma at half (measured: best on JPEG-75)
)


def _refuse(reason: str, return_reason: bool):
    return (None, reason) if return_reason else None


def parse_scene(image, *, return_reason: bool = False):
    """The scene graph of a Shapes world image, or ``None`` when it is unparseable.

    Returns ``{"image_size": S, "objects": [{shape, color, size, position, row, col,
    center, extent}, ...]}`` in grid order (compare with ``shapes.canonical_objects``).
    With ``return_reason=True`` returns ``(scene_or_None, reason_or_None)``.
    """
    rgb = _to_array(image)
    height, width = rgb.shape[:2]
    if height != width:
        raise ValueError(f"image must be square (Shapes world renders are), got {width}x{height}")
    if height < 32:
        raise ValueError(f"image must be at least 32 px, got {height}")
    cell = height / GRID
    total = float(height * width)

    best, cov, res, dist_bg, coverage = _pixel_attribution(rgb)
    luma = _luma(rgb)
    background = dist_bg < BACKGROUND_TOLERANCE
    if background.mean() < MIN_BACKGROUND_FRACTION:
        return _refuse(f"background covers only {background.mean():.0%} of the image", return_reason)
    off_palette = ~background & (res > PALETTE_TOLERANCE)
    if off_palette.mean() > MAX_OFF_PALETTE_FRACTION:
        return _refuse(f"{off_palette.mean():.1%} of pixels fit no palette colour", return_reason)

    min_area = 0.25 * _min_expected_area(cell)
    objects, speck_pixels, occupied = [], 0, {}
    for k, color in enumerate(_COLOR_NAMES):
        is_color = (best == k) & (res <= PALETTE_TOLERANCE)
        solid = is_color & (cov >= COVERAGE_THRESHOLD)
        if not solid.any():
            continue
        labels, count = ndimage.label(solid, structure=np.ones((3, 3)))
        for index, sl in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[sl] == index
            if component.sum() < min_area:
                speck_pixels += int(component.sum())
                continue
            luma_cov = (_luma(_BG) - luma) / (_luma(_BG) - _luma(_PALETTE[k]))
            # Every pixel near the component counts by its coverage of this colour, except pixels
            # that solidly belong to another colour.
            mixed = LUMA_WEIGHT * luma_cov + (1 - LUMA_WEIGHT) * coverage[..., k]
            allowed = ~((best != k) & (cov >= COVERAGE_THRESHOLD) & ~background)
            obj = _describe(component, sl, allowed, mixed, cell, height)
            if isinstance(obj, str):
                return _refuse(f"{color} component at {sl}: {obj}", return_reason)
            obj["color"] = color
            cell_index = obj["row"] * GRID + obj["col"]
            if cell_index in occupied:
                return _refuse(f"two components in cell {POSITIONS[cell_index]}", return_reason)
            occupied[cell_index] = obj
    if speck_pixels / total > MAX_SPECK_FRACTION:
        return _refuse(f"{speck_pixels} pixels in specks too small to be shapes", return_reason)
    objects = [occupied[i] for i in sorted(occupied)]
    ordered = [
        {key: o[key] for key in ("shape", "color", "size", "position", "row", "col", "center", "fit_error", "margin")}
        for o in objects
    ]
    scene = {"image_size": int(height), "objects": ordered}
    return (scene, None) if return_reason else scene


def _min_expected_area(cell: float) -> float:
    r = SIZES["small"] * cell
    return 1.8 * r * r  # the small triangle, the smallest shape


def _describe(component: np.ndarray, sl, allowed: np.ndarray, cov: np.ndarray, cell: float, size: int):
    """Fit every (shape, size) template to one component -> attributes, or why it is ambiguous."""
    # The component plus its anti-aliased rim (coverage < 0.5), same colour only.
    mask = np.zeros(allowed.shape, bool)
    mask[sl] = component
    mask = ndimage.binary_dilation(mask, iterations=2) & allowed
    observed = np.where(mask, np.clip(cov, 0.0, 1.0), 0.0)
    area = observed.sum()
    ys, xs = np.nonzero(mask)
    weights = observed[ys, xs]
    cy = float((weights * (ys + 0.5)).sum() / area)
    cx = float((weights * (xs + 0.5)).sum() / area)
    # A window that holds the largest hypothesis around the centroid, so that a wrong, larger
    # template is not cut off and flattered.
    half = int(np.ceil(SIZES["large"] * cell * 1.3)) + 3
    y0, x0 = max(int(cy) - half, 0), max(int(cx) - half, 0)
    y1, x1 = min(int(cy) + half + 1, size), min(int(cx) + half + 1, size)
    box = (y0, x0, y1 - y0, x1 - x0)
    window = observed[y0:y1, x0:x1]
    if (ys < y0).any() or (ys >= y1).any() or (xs < x0).any() or (xs >= x1).any():
        return "larger than the largest shape"

    fits = []
    for shape in SHAPES:
        for size_name, fraction in SIZES.items():
            radius = fraction * cell
            ox, oy = shape_centroid_offset(shape, radius)
            error = np.inf
            for dx, dy in CENTER_SEARCH:
                template = shape_coverage(shape, (cx - ox + dx, cy - oy + dy), radius, box)
                norm = template.sum()
                error = min(
                    error,
                    min(
                        np.abs(window - (ndimage.gaussian_filter(template, s) if s else template)).sum() / norm
                        for s in TEMPLATE_BLURS
                    ),
                )
            fits.append((float(error), shape, size_name))
    fits.sort()
    best_error, shape, size_name = fits[0]
    runner_up = fits[1][0]
    if best_error > MAX_FIT_ERROR:
        return f"no shape fits (best {shape} {size_name}, error {best_error:.2f})"
    if runner_up < best_error * MIN_FIT_MARGIN:
        return f"{shape} {size_name} ({best_error:.2f}) and {fits[1][1]} {fits[1][2]} ({runner_up:.2f}) fit alike"

    fx, fy = cx / cell, cy / cell
    col, row = int(fx), int(fy)
    near_border = min(fx - col, col + 1 - fx, fy - row, row + 1 - fy)
    if near_border < CELL_BORDER_MARGIN or not (0 <= row < GRID and 0 <= col < GRID):
        return f"centroid ({cx:.1f}, {cy:.1f}) sits on a grid-cell border"
    return {
        "shape": shape,
        "size": size_name,
        "position": POSITIONS[row * GRID + col],
        "row": row,
        "col": col,
        "center": [round(cx, 2), round(cy, 2)],
        "fit_error": round(best_error, 3),
        "margin": round(runner_up / best_error if best_error else 99.0, 2),
    }


def degrade_image(image: Image.Image, *, jpeg_quality: int = 75, blur_radius: float = 0.0) -> Image.Image:
    """Gaussian blur (radius in px, 0 = none) then JPEG at ``jpeg_quality``: the parser's
    robustness benchmark (scripts/parser_accuracy.py, tests)."""
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if blur_radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur_radius))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
