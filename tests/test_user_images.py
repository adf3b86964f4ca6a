"""Your own images: every layout `finetune --dataset` and `train-tokenizer --images` accept fine-tunes from a small
generated set whose images are non-square, grayscale and larger than the model's, through the processor's one
resize policy; an unknown layout is answered with the list of accepted ones."""

import csv
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from utils_mllm import tiny_mllm

from training.cli import main
from training.data.real_images import ACCEPTED_LAYOUTS, load_image_dataset
from training.finetune import finetune_lora
from training.stage1 import images_to_uint8, to_pixel_values

# (width, height, mode): square at the model's 16 px, larger, non-square both ways, grayscale, with alpha.
SHAPES = [(16, 16, "RGB"), (64, 64, "RGB"), (40, 24, "RGB"), (20, 36, "L"), (48, 48, "L"), (30, 18, "RGBA")]
CAPTIONS = ["a red picture", "a blue picture", "a green picture", "a gray picture", "a white picture", "a red circle"]


def photo(index: int) -> Image.Image:
    width, height, mode = SHAPES[index]
    pixels = np.random.default_rng(index).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


def write_photos(folder):
    """The photos as PNG files in `folder`; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(len(SHAPES)):
        names.append(f"photo_{i}.png")
        photo(i).save(folder / names[-1])
    return names


def conversation(caption: str) -> list:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this picture"}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def imagefolder_jsonl(root):
    names = write_photos(root / "photos")
    with open(root / "photos" / "metadata.jsonl", "w") as handle:
        for name, caption in zip(names, CAPTIONS):
            handle.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return root / "photos"


def imagefolder_csv(root):
    names = write_photos(root / "photos")
    with open(root / "photos" / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption"])
        writer.writerows(zip(names, CAPTIONS))
    return root / "photos"


def json_file(root):  # conversations, image paths relative to the file
    names = write_photos(root / "data" / "images")
    rows = [{"image": f"images/{name}", "messages": conversation(caption)} for name, caption in zip(names, CAPTIONS)]
    (root / "data" / "train.json").write_text(json.dumps(rows))
    return root / "data" / "train.json"


def jsonl_file(root):
    names = write_photos(root / "data" / "images")
    with open(root / "data" / "train.jsonl", "w") as handle:
        for name, caption in zip(names, CAPTIONS):
            handle.write(json.dumps({"picture": f"images/{name}", "text": caption}) + "\n")
    return root / "data" / "train.jsonl"


def csv_file(root):
    names = write_photos(root / "data" / "images")
    with open(root / "data" / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows((f"images/{name}", caption) for name, caption in zip(names, CAPTIONS))
    return root / "data" / "train.csv"


def in_memory():
    return datasets.Dataset.from_dict(
        {"image": [photo(i) for i in range(len(SHAPES))], "caption": CAPTIONS},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )


def saved(root):
    in_memory().save_to_disk(str(root / "saved"))
    return root / "saved"


# name -> (make the source under a folder, extra command-line flags)
LAYOUTS = {
    "imagefolder-jsonl": (imagefolder_jsonl, []),
    "imagefolder-csv": (imagefolder_csv, []),
    "json-conversations": (json_file, []),
    "jsonl": (jsonl_file, ["--image-column", "picture", "--text-column", "text"]),
    "csv": (csv_file, []),
    "save_to_disk": (saved, []),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, processor = tiny_mllm()
    folder = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def assert_trained(out, steps=2):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == steps and (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_fine_tunes_two_steps_from_the_command_line(layout, model_dir, tmp_path):
    make, flags = LAYOUTS[layout]
    source = make(tmp_path)
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model_dir),
                "--dataset",
                str(source),
                "--output",
                str(tmp_path / "out"),
                "--steps",
                "2",
                "--batch-size",
                "2",
                *flags,
            ]
        )
        == 0
    )
    assert_trained(tmp_path / "out")


def test_a_dataset_in_python_and_a_hub_name_fine_tune(model_dir, tmp_path, monkeypatch):
    finetune_lora(str(model_dir), in_memory(), tmp_path / "python", max_steps=2, batch_size=2)
    assert_trained(tmp_path / "python")

    asked = []

    def hub(name, *args, split=None, **kwargs):  # the Hub is not reachable here: a name is loaded as datasets does
        asked.append((name, split))
        return in_memory()

    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model_dir),
                "--dataset",
                "someone/photos",
                "--output",
                str(tmp_path / "hub"),
                "--steps",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert asked == [("someone/photos", "train")]
    assert_trained(tmp_path / "hub")


def test_an_imagefolder_is_read_by_the_datasets_builder_with_its_own_sizes_and_modes(tmp_path):
    loaded = load_image_dataset(imagefolder_jsonl(tmp_path), image_column="image")
    assert loaded.column_names == ["image", "text"] and loaded["text"] == CAPTIONS
    assert [(im.width, im.height, im.mode) for im in loaded["image"]] == SHAPES


def test_training_sees_an_image_as_the_processor_shows_it_at_inference():
    _, processor = tiny_mllm()
    images = [photo(i) for i in range(len(SHAPES))]
    for mode in ("squash", "center_crop"):
        processor.image_processor.resize_mode = mode
        trained = to_pixel_values(images_to_uint8(images, 16, image_processor=processor.image_processor))
        assert torch.equal(trained, processor.image_processor(images)["pixel_values"])


def folder_of_notes(root):
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image")
    return root / "notes"


def parquet_file(root):
    (root / "data.parquet").write_bytes(b"PAR1")
    return root / "data.parquet"


@pytest.mark.parametrize(
    "make, why",
    [
        (folder_of_notes, "neither images nor a save_to_disk dataset"),
        (parquet_file, "is a .parquet file"),
        (lambda root: root / "missing", "is no file or folder here"),
    ],
)
def test_an_unknown_layout_gets_one_message_listing_the_accepted_ones(make, why, tmp_path, model_dir, capsys):
    source = make(tmp_path)
    with pytest.raises(ValueError, match=why) as error:
        load_image_dataset(source)
    assert all(layout in str(error.value) for layout in ACCEPTED_LAYOUTS)
    assert (
        main(["finetune", "--model", str(model_dir), "--dataset", str(source), "--output", str(tmp_path / "out")]) == 2
    )
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "imagefolder" in message and "save_to_disk" in message and "Hub" in message


def test_a_wrong_image_path_or_column_names_the_row_and_the_flag(tmp_path, model_dir, capsys):
    source = csv_file(tmp_path)
    (source.parent / "images" / "photo_2.png").unlink()
    with pytest.raises(FileNotFoundError, match="row 2: image 'images/photo_2.png' not found"):
        load_image_dataset(source, image_column="image")
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model_dir),
                "--dataset",
                str(source),
                "--output",
                str(tmp_path / "out"),
                "--image-column",
                "photo",
            ]
        )
        == 2
    )
    assert "no 'photo' column" in capsys.readouterr().err


def test_train_tokenizer_trains_and_fine_tunes_on_an_imagefolder(tmp_path):
    from modeling_unicode import UniCodeVisualTokenizer

    photos = imagefolder_jsonl(tmp_path)
    run = tmp_path / "run"
    assert main(["train-text", "--preset", "tiny", "--output", str(run), "--steps", "2", "--scenes", "40"]) == 0
    common = ["--preset", "tiny", "--images", str(photos), "--batch-size", "2", "--codebook-size", "256", "--fp32"]
    assert main(["train-tokenizer", "--output", str(run), "--steps", "2", *common]) == 0
    metrics = json.loads((run / "stage1" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["images"] == 1 and metrics["unified"]  # one of six photos held out
    trained = UniCodeVisualTokenizer.from_pretrained(run / "vision_tokenizer")

    # Fine-tune: a step at a vanishing learning rate gives it back (the start is the tokenizer, not a fresh draw;
    # zero steps are refused at the door); two steps at the recipe's rate move it.
    for steps, lr in (("1", ["--lr", "1e-12"]), ("2", [])):
        again = tmp_path / f"again-{steps}"
        command = ["train-tokenizer", "--output", str(again), "--llm", str(run / "text_lm")]
        command += ["--init-from", str(run / "vision_tokenizer"), "--steps", steps, *lr, *common]
        assert main(command) == 0
        tuned = UniCodeVisualTokenizer.from_pretrained(again / "vision_tokenizer")
        assert tuned.config.codebook_token_ids == trained.config.codebook_token_ids
        pairs = list(zip(tuned.encoder.parameters(), trained.encoder.parameters()))
        same = all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in pairs)
        assert same == (steps == "1")
