"""Real images that need no download, and adapters for Hugging Face image datasets.

- Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``apt-get install
  dataset-fashion-mnist`` puts the IDX files in ``/usr/share/datasets/fashion-mnist/``), or
  the Hub when ``allow_download=True``. Rows: ``image`` (28x28 grayscale), ``label``
  (ClassLabel with FASHION_MNIST_LABELS).
- scikit-image's bundled sample images (only files shipped in the wheel, never its
  downloader). Rows: ``image`` (RGB), ``label`` (ClassLabel of the names), ``name``.
- Any image-caption dataset -> rows ``image``, ``captions`` (list of str), as the Shapes
  world; any LLaVA-style conversation dataset -> rows ``image``, ``messages``
  (list of {role, content}, roles user/assistant, ``<image>`` kept in the text). Both accept
  a Hub name, a folder written by ``save_to_disk`` or a JSON / JSON-lines file.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# scikit-image sample name -> the file its wheel ships (the others are fetched on demand).
SKIMAGE_SAMPLES = {
    "astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png", "cell": "cell.png",
    "chelsea": "chelsea.png", "coffee": "coffee.png", "coins": "coins.png", "grass": "grass.png",
    "gravel": "gravel.png", "horse": "horse.png", "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png", "logo": "logo.png", "microaneurysms": "microaneurysms.png",
    "moon": "moon.png", "page": "page.png", "retina": "retina.jpg", "rocket": "rocket.jpg", "text": "text.png",
}


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    return all((root / name).is_file() for files in _FASHION_FILES.values() for name in files)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(
    split: str = "train",
    num_examples: int | None = None,
    root: str | os.PathLike | None = None,
    allow_download: bool = False,
):
    """Fashion-MNIST as a `datasets.Dataset` (``image``, ``label``), first ``num_examples`` rows."""
    import datasets
    from PIL import Image

    if split not in _FASHION_FILES:
        raise ValueError(f"split must be one of {tuple(_FASHION_FILES)}, got {split!r}")
    if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 1):
        raise ValueError(f"num_examples must be a positive int or None, got {num_examples!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    if not fashion_mnist_available(root):
        if not allow_download:
            raise FileNotFoundError(
                f"Fashion-MNIST is not in {root}: install it offline with `apt-get install dataset-fashion-mnist`, "
                f"or pass allow_download=True to fetch {FASHION_MNIST_HUB} from the Hub"
            )
        hub = datasets.load_dataset(FASHION_MNIST_HUB, split=split)
        return hub.select(range(min(num_examples, len(hub)))) if num_examples else hub
    image_file, label_file = _FASHION_FILES[split]
    images = _read_idx(root / image_file)
    labels = _read_idx(root / label_file)
    if num_examples is not None:
        images, labels = images[:num_examples], labels[:num_examples]
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(FASHION_MNIST_LABELS)),
    })
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im, "L") for im in images], "label": labels.astype(int).tolist()},
        features=features,
        split=datasets.NamedSplit(split),
    )


# ---------------------------------------------------------------------------------------------
# scikit-image samples


def load_skimage_images(names=None, image_size: int | None = None):
    """scikit-image's bundled sample images as a `datasets.Dataset` (``image``, ``label``, ``name``).

    ``image_size`` centre-crops to a square and resizes (LANCZOS); by default images keep their
    own, differing sizes.
    """
    import datasets
    from PIL import Image

    try:
        import skimage.data
    except ImportError:
        raise ImportError("load_skimage_images needs scikit-image: pip install scikit-image") from None
    data_dir = Path(skimage.data.__file__).parent
    names = list(SKIMAGE_SAMPLES) if names is None else list(names)
    unknown = [n for n in names if n not in SKIMAGE_SAMPLES]
    if unknown:
        raise ValueError(f"names must be bundled scikit-image samples {sorted(SKIMAGE_SAMPLES)}; unknown: {unknown}")
    names = [n for n in names if (data_dir / SKIMAGE_SAMPLES[n]).is_file()]
    if not names:
        raise FileNotFoundError(f"no bundled scikit-image sample files found in {data_dir}")
    images = []
    for name in names:
        image = Image.open(data_dir / SKIMAGE_SAMPLES[name]).convert("RGB")
        if image_size is not None:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.LANCZOS)
        images.append(image)
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=names), "name": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict({"image": images, "label": list(range(len(names))), "name": names}, features=features)


# ---------------------------------------------------------------------------------------------
# Generic Hugging Face adapters

_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture", "pixel_values")
_CAPTION_COLUMNS = ("captions", "caption", "text", "sentences", "sentences_raw", "alt_text", "txt", "description")


def _load_any(name_or_path, split: str, **load_kwargs):
    """A Hub name, a save_to_disk folder or a JSON(-lines) file -> one Dataset split."""
    import datasets

    path = Path(str(name_or_path))
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split must be one of {list(loaded)} for {path}, got {split!r}")
            loaded = loaded[split]
        return loaded
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files=str(path), split="train", **load_kwargs)
    return datasets.load_dataset(str(name_or_path), split=split, **load_kwargs)


def _pick(columns, wanted, candidates, what):
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{what}_column={wanted!r} is not a column; columns are {list(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"no {what} column found among {list(columns)}; pass {what}_column=")


def load_caption_dataset(name_or_path, split: str = "train", image_column=None, caption_column=None, **load_kwargs):
    """Any image-caption dataset as rows ``image`` (datasets Image) and ``captions`` (list of str)."""
    import datasets

    dataset = _load_any(name_or_path, split, **load_kwargs)
    image_column = _pick(dataset.column_names, image_column, _IMAGE_COLUMNS, "image")
    caption_column = _pick(dataset.column_names, caption_column, _CAPTION_COLUMNS, "caption")

    def standardize(row):
        value = row[caption_column]
        if isinstance(value, dict):  # e.g. {"raw": ...} sentence records
            value = value.get("raw", next(iter(value.values())))
        captions = [str(v.get("raw", v) if isinstance(v, dict) else v) for v in value] if isinstance(value, list) else [str(value)]
        return {"image": row[image_column], "captions": captions}

    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))})
    return dataset.map(standardize, remove_columns=dataset.column_names, features=features)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_conversation_dataset(name_or_path, split: str = "train", image_folder=None, **load_kwargs):
    """A LLaVA-style dataset (``image`` path + ``conversations`` [{from, value}]) as rows
    ``image`` (datasets Image) and ``messages`` [{role, content}]. Relative image paths are
    resolved against ``image_folder`` (default: the JSON file's folder)."""
    import datasets

    dataset = _load_any(name_or_path, split, **load_kwargs)
    for column in ("image", "conversations"):
        if column not in dataset.column_names:
            raise ValueError(f"a LLaVA-style dataset needs an {column!r} column; columns are {dataset.column_names}")
    base = Path(image_folder) if image_folder is not None else Path(str(name_or_path)).parent

    def standardize(row):
        image = row["image"]
        if isinstance(image, str):
            path = Path(image) if Path(image).is_absolute() else base / image
            if not path.is_file():
                raise FileNotFoundError(f"image {image!r} not found under {base}; pass image_folder=")
            image = str(path)
        messages = []
        for turn in row["conversations"]:
            role = _ROLES.get(turn["from"])
            if role is None:
                raise ValueError(f"conversation role must be one of {sorted(_ROLES)}, got {turn['from']!r}")
            messages.append({"role": role, "content": turn["value"]})
        return {"image": image, "messages": messages}

    features = datasets.Features({
        "image": datasets.Image(),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    })
    return dataset.map(standardize, remove_columns=dataset.column_names, features=features)
