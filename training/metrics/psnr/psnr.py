"""PSNR between reconstructions and originals, in dB, averaged over images.

predictions / references: images (PIL or uint8 arrays) of equal size, compared in RGB with
a data range of 255. Identical images have infinite PSNR, and so does their mean: the metric
reports it rather than clipping it.
"""

import datasets
import evaluate
import numpy as np


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


class Psnr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: images of equal size",
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("predictions is empty; pass at least one image pair")
        values = []
        for i, (p, r) in enumerate(zip(predictions, references)):
            if p.size != r.size:
                raise ValueError(f"image pair {i} differs in size ({p.size} vs {r.size}); resize the prediction first")
            values.append(psnr(p.convert("RGB"), r.convert("RGB")))
        return {"psnr": float(np.mean(values)), "num_images": len(values)}
