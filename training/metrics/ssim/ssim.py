"""SSIM (Wang et al. 2004) between reconstructions and originals, averaged over images.

Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, data range 255,
computed per RGB channel and averaged, borders excluded as in scikit-image's
``structural_similarity(..., gaussian_weights=True)`` (the tests check agreement with it).
"""

import datasets
import evaluate
import numpy as np
from scipy.ndimage import gaussian_filter


def ssim(a, b, sigma: float = 1.5) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    truncate = 3.5
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        blur = lambda z: gaussian_filter(z, sigma, truncate=truncate)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        pad = (int(truncate * sigma + 0.5) * 2 + 1 - 1) // 2
        values.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(values))


class Ssim(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: images of equal size (at least 12x12)",
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("predictions is empty; pass at least one image pair")
        values = []
        for i, (p, r) in enumerate(zip(predictions, references)):
            if p.size != r.size:
                raise ValueError(f"image pair {i} differs in size ({p.size} vs {r.size}); resize the prediction first")
            if min(p.size) < 12:
                raise ValueError(f"image pair {i} is {p.size}; SSIM's 11x11 window needs at least 12x12 pixels")
            values.append(ssim(p.convert("RGB"), r.convert("RGB")))
        return {"ssim": float(np.mean(values)), "num_images": len(values)}
