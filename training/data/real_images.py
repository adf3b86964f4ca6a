"""Real images that need no download, and adapters for Hugging Face image datasets.

- Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``apt-get install
  dataset-fashion-mnist`` puts the IDX files in ``/usr/share/datasets/fashion-mnist/``), or
  the Hub when ``allow_download=True``. Rows: ``image`` (28x28 grayscale), ``label``
  (ClassLabel with FASHION_MNIST_LABELS).
- scikit-image's bundled sample images (only files shipped in the wheel, never its
  downloader). Rows: ``image`` (RGB), ``label`` (ClassLabel of the names), ``name``.
- Any image-caption dataset -> rows ``image``, ``captions`` (list of str), as the Shapes
  world; any LLaVA-style conversation dataset -> rows ``image``, ``messages``
  (list of {role, content}, roles user/assistant, ``<image>`` kept in the text). Both read
  every layout of ``load_image_dataset``: the one loader of users' images, which ``unicode-mllm finetune`` and
  ``train-tokenizer --images`` use too.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import datasets
import numpy as np
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# scikit-image sample name -> the file its wheel ships (the others are fetched on demand).
SKIMAGE_SAMPLES = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "horse": "horse.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "logo": "logo.png",
    "microaneurysms": "microaneurysms.png",
    "moon": "moon.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "text": "text.png",
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
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
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
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(FASHION_MNIST_LABELS)),
        }
    )
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

    try:  # optional: scikit-image only serves these sample images
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
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=names),
            "name": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": list(range(len(names))), "name": names}, features=features
    )


# ---------------------------------------------------------------------------------------------
# Generic Hugging Face adapters

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture", "pixel_values")
CAPTION_COLUMNS = ("captions", "caption", "text", "sentences", "sentences_raw", "alt_text", "txt", "description")


# The layouts `load_image_dataset` tells apart by what the source is; an unknown one is answered with this list.
ACCEPTED_LAYOUTS = (
    "an imagefolder: a folder of images with metadata.jsonl or metadata.csv (a file_name column plus a text column)",
    "a JSON, JSONL or CSV file whose image column holds image paths (relative to the file's folder, or absolute)",
    "a folder written by datasets' save_to_disk",
    "a Hub dataset name (owner/name)",
    "a datasets.Dataset (from Python)",
)
_TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _layout_error(source, why: str) -> ValueError:
    return ValueError(f"dataset {str(source)!r} {why}; use one of: " + "; ".join(ACCEPTED_LAYOUTS))


def _is_imagefolder(path: Path) -> bool:
    if any((path / f"metadata{suffix}").is_file() for suffix in (".jsonl", ".csv")):
        return True
    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    return any(p.suffix.lower() in extensions for p in path.rglob("*") if p.is_file())


def image_root_of(source):
    """The folder that relative image paths in `source` are read from: a JSON / CSV file's own; else None (the
    working folder)."""
    return Path(source).parent if isinstance(source, (str, os.PathLike)) and Path(source).is_file() else None


def image_paths_to_images(dataset, image_column: str, root=None):
    """`dataset` with `image_column` as `datasets.Image`; a column of file paths (relative ones taken from
    `root`) becomes one, each file checked first so a wrong path names its row."""

    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        return dataset
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(
            f"column {image_column!r} holds {feature}, not images or image file paths; pass image_column= "
            "(--image-column) the column that holds them"
        )

    def resolve(row, index):
        value = row[image_column]
        if not value:
            raise ValueError(f"row {index} has no image path in column {image_column!r}")
        if "://" in value:  # a URL: datasets.Image opens it
            return {image_column: value}
        path = Path(value) if root is None or Path(value).is_absolute() else Path(root) / value
        if not path.is_file():
            raise FileNotFoundError(
                f"row {index}: image {value!r} not found at {path}; image paths are read relative to "
                f"{root or 'the working folder'}"
            )
        return {image_column: str(path)}

    return dataset.map(resolve, with_indices=True, desc="image paths").cast_column(image_column, datasets.Image())


def load_image_dataset(source, split: str = "train", image_column=None, image_root=None, **load_kwargs):
    """One split of an image dataset in any layout people share images in (`ACCEPTED_LAYOUTS`), told apart by
    what `source` is: a `datasets.Dataset` (or `DatasetDict`), a `save_to_disk` folder, an imagefolder (loaded by
    datasets' own `imagefolder` builder), a JSON / JSONL / CSV file, or a Hub name `owner/name`.

    With `image_column`, that column must exist and is returned as `datasets.Image`: image paths in it are read
    relative to `image_root` (default: the JSON / CSV file's folder). Images keep their own size and mode; the
    image processor brings them to the model's (`training.stage1.images_to_uint8`)."""

    root = image_root or image_root_of(source)
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split={split!r} is not in the DatasetDict; it has {list(source)}")
        dataset = source[split]
    elif isinstance(source, datasets.Dataset):
        dataset = source
    elif not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"dataset is a {type(source).__name__}; pass a path, a Hub dataset name or a datasets.Dataset")
    else:
        path = Path(source)
        if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"split={split!r} is not in {path}; it has {list(dataset)}")
                dataset = dataset[split]
        elif path.is_dir():
            if not _is_imagefolder(path):
                raise _layout_error(source, "is a folder with neither images nor a save_to_disk dataset")
            dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, **load_kwargs)
        elif path.is_file():
            builder = _TABLE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise _layout_error(source, f"is a {path.suffix or 'suffix-less'} file")
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **load_kwargs)
        elif _HUB_NAME.match(str(source)):
            dataset = datasets.load_dataset(str(source), split=split, **load_kwargs)
        else:
            raise _layout_error(source, "is no file or folder here, nor a Hub dataset name (owner/name)")
    if image_column is None:
        return dataset
    if image_column not in dataset.column_names:
        raise ValueError(
            f"the dataset has no {image_column!r} column (columns: {dataset.column_names}); pass "
            "image_column= (--image-column) the column that holds the images"
        )
    return image_paths_to_images(dataset, image_column, root)


def caption_texts(value) -> list[str]:
    """A caption cell (a string, a list of them, or {"raw": ...} sentence records) as a list of strings."""
    if isinstance(value, dict):
        value = value.get("raw", next(iter(value.values())))
    return (
        [str(v.get("raw", v) if isinstance(v, dict) else v) for v in value]
        if isinstance(value, list)
        else [str(value)]
    )


def pick_column(columns, wanted, candidates, what, required: bool = True):
    """`wanted` if it is a column, else the first of `candidates` that is one (None when not `required`)."""
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"{what}_column={wanted!r} (--{what}-column) is not a column; columns are {list(columns)}"
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if not required:
        return None
    raise ValueError(f"no {what} column found among {list(columns)}; pass {what}_column= (--{what}-column)")


def load_caption_dataset(name_or_path, split: str = "train", image_column=None, caption_column=None, **load_kwargs):
    """Any image-caption dataset as rows ``image`` (datasets Image) and ``captions`` (list of str)."""

    dataset = load_image_dataset(name_or_path, split, **load_kwargs)
    image_column = pick_column(dataset.column_names, image_column, IMAGE_COLUMNS, "image")
    caption_column = pick_column(dataset.column_names, caption_column, CAPTION_COLUMNS, "caption")
    dataset = image_paths_to_images(dataset, image_column, image_root_of(name_or_path))

    def standardize(row):
        return {"image": row[image_column], "captions": caption_texts(row[caption_column])}

    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))})
    return dataset.map(standardize, remove_columns=dataset.column_names, features=features)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_conversation_dataset(name_or_path, split: str = "train", image_folder=None, **load_kwargs):
    """A LLaVA-style dataset (``image`` path + ``conversations`` [{from, value}]) as rows
    ``image`` (datasets Image) and ``messages`` [{role, content}]. Relative image paths are
    resolved against ``image_folder`` (default: the JSON file's folder)."""

    dataset = load_image_dataset(name_or_path, split, **load_kwargs)
    for column in ("image", "conversations"):
        if column not in dataset.column_names:
            raise ValueError(f"a LLaVA-style dataset needs an {column!r} column; columns are {dataset.column_names}")
    dataset = image_paths_to_images(dataset, "image", image_folder or image_root_of(name_or_path))

    def standardize(row):
        image = row["image"]
        messages = []
        for turn in row["conversations"]:
            role = _ROLES.get(turn["from"])
            if role is None:
                raise ValueError(f"conversation role must be one of {sorted(_ROLES)}, got {turn['from']!r}")
            messages.append({"role": role, "content": turn["value"]})
        return {"image": image, "messages": messages}

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        }
    )
    return dataset.map(standardize, remove_columns=dataset.column_names, features=features)
