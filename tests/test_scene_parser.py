"""The scene parser is the judge of generated images: exact on clean renders, robust to JPEG
and blur, and it refuses noise instead of guessing."""

import numpy as np
import pytest

from training.data.scene_parser import degrade_image, parse_scene
from training.data.shapes import canonical_objects, example_rng, render_scene, sample_scene


def _scenes(n, size, seed):
    return [sample_scene(example_rng(seed, "test", i), size) for i in range(n)]


@pytest.mark.parametrize("size,n", [(64, 400), (128, 60), (256, 15)])
def test_exact_on_clean_renders(size, n):
    for scene in _scenes(n, size, seed=11):
        assert canonical_objects(parse_scene(render_scene(scene))) == canonical_objects(scene)


def test_at_least_99_percent_under_jpeg_75_and_mild_blur():
    scenes = _scenes(400, 64, seed=12)
    correct = wrong = 0
    for i, scene in enumerate(scenes):
        image = degrade_image(render_scene(scene), jpeg_quality=75, blur_radius=(0.0, 0.5, 1.0)[i % 3])
        parsed = parse_scene(image)
        if parsed is not None and canonical_objects(parsed) == canonical_objects(scene):
            correct += 1
        elif parsed is not None:
            wrong += 1
    assert correct / len(scenes) >= 0.99
    assert wrong <= 1  # when it is unsure it should refuse, not answer wrongly


def test_noise_is_unparseable():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(30)]
    images += [np.clip(rng.normal(200, 40, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(30)]
    sparse = np.full((64, 64, 3), 255, np.uint8)
    hit = rng.random((64, 64)) < 0.2
    sparse[hit] = rng.integers(0, 256, (int(hit.sum()), 3))
    images.append(sparse)
    for image in images:
        scene, reason = parse_scene(image, return_reason=True)
        assert scene is None and reason


def test_unknown_blob_is_refused_not_guessed():
    image = np.full((64, 64, 3), 255, np.uint8)
    image[5:30, 20:24] = (220, 30, 30)  # a thin red bar: no Shapes world shape
    scene, reason = parse_scene(image, return_reason=True)
    assert scene is None and "red" in reason


def test_blank_image_has_no_objects():
    assert parse_scene(np.full((64, 64, 3), 255, np.uint8))["objects"] == []


def test_input_forms():
    scene = _scenes(1, 64, seed=3)[0]
    image = render_scene(scene)
    array = np.asarray(image)
    expected = canonical_objects(scene)
    assert canonical_objects(parse_scene(array)) == expected
    assert canonical_objects(parse_scene(array.astype(np.float32) / 255.0)) == expected
    assert canonical_objects(parse_scene(np.moveaxis(array, -1, 0))) == expected
    with pytest.raises(ValueError, match="float image must be in"):
        parse_scene(array.astype(np.float32) / 127.5 - 1.0)
    with pytest.raises(ValueError, match="square"):
        parse_scene(array[:, :40])
    with pytest.raises(TypeError, match="dtype"):
        parse_scene(array.astype(np.int64))


def test_pixel_colours_names_each_shapes_centre_and_leaves_background():
    from training.data.scene_parser import pixel_colours
    from training.data.shapes import COLORS, example_rng, render_scene, sample_scene

    scene = sample_scene(example_rng(0, "test", 0), 64)
    colours = pixel_colours(render_scene(scene))
    assert colours.shape == (64, 64) and colours[0, 0] == -1
    for obj in scene["objects"]:
        x, y = (int(round(v)) for v in obj["center"])
        assert colours[y, x] == list(COLORS).index(obj["color"])


def test_patch_colours_labels_the_patches_a_shape_fills_and_refuses_a_grid_that_does_not_divide():
    from training.data.scene_parser import patch_colours
    from training.data.shapes import COLORS, example_rng, render_scene, sample_scene

    scene = sample_scene(example_rng(0, "test", 0), 64)
    image = render_scene(scene)
    labels = patch_colours(image, 8, coverage=0.6)
    assert labels.shape == (8, 8) and labels[0, 0] == -1
    for obj in scene["objects"]:
        x, y = (int(round(v)) for v in obj["center"])
        if obj["size"] == "large":  # a large shape covers its centre's 8x8 patch
            assert labels[y // 8, x // 8] == list(COLORS).index(obj["color"])
    assert (patch_colours(image, 8, coverage=1.0) >= 0).sum() <= (labels >= 0).sum()
    with pytest.raises(ValueError, match="grid=7"):
        patch_colours(image, 7, coverage=0.6)
