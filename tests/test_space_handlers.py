"""The Space's three actions without a browser (they run wherever gradio is installed; the browser
test in test_space_app.py drives the same code through the page)."""

import importlib.util

import PIL.Image
import pytest
from hub_fixtures import REPO_ROOT
from utils_mllm import tiny_mllm

gr = pytest.importorskip("gradio", reason="the Space needs gradio (pip install -e .[demo])")


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("unicode_space_app", REPO_ROOT / "hub_upload" / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_space_actions_and_bad_input(app, tmp_path, monkeypatch):
    model, processor = tiny_mllm()
    demo = app.UniCodeDemo(model, processor, max_new_tokens=5, min_new_tokens=3)
    picture = tmp_path / "picture.png"
    PIL.Image.new("RGB", (30, 20), (200, 30, 30)).save(picture)

    answer = demo.ask(str(picture), "what color is the shape?")
    assert answer and answer != "(the model gave an empty answer)" and len(answer.split()) >= 3

    first, again, other = (demo.generate("a red circle", 3.0, seed) for seed in (7, 7, 8))
    assert first.size == (256, 256) and first.tobytes() == again.tobytes()  # the seed reproduces the image
    assert isinstance(other, PIL.Image.Image)

    seen, reconstruction, codes = demo.tokenize(str(picture))
    assert seen.size == reconstruction.size == (256, 256)
    ids = [int(i) for line in codes.splitlines()[1:] for i in line.split()]
    assert len(ids) == model.config.image_tokens_per_generation
    assert set(ids) <= set(model.config.vq_config.codebook_token_ids)

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not pixels")
    with pytest.raises(gr.Error, match="'notes.txt' is not an image this demo can read"):
        demo.ask(str(text_file), "what is it?")
    with pytest.raises(gr.Error, match="Upload an image first"):
        demo.tokenize(None)
    with pytest.raises(gr.Error, match="Type a question"):
        demo.ask(str(picture), "   ")
    with pytest.raises(gr.Error, match="Describe the image"):
        demo.generate("", 3.0, 0)
    with pytest.raises(gr.Error, match=f"Leave {processor.image_token} out of the question"):
        demo.ask(str(picture), f"what is {processor.image_token}?")
    limit = model.config.get_text_config().max_position_embeddings
    with pytest.raises(gr.Error, match="This question is too long for the model; shorten it"):
        demo.ask(str(picture), "what color " * limit)
    with pytest.raises(gr.Error, match="This description is too long"):
        demo.generate("a red circle " * limit, 3.0, 0)
    # the question is asked exactly as stage II trained and the evaluation asks (training.evaluation.vqa_prompt)
    from training.evaluation import vqa_prompt

    prompts = []
    call = type(processor).__call__
    monkeypatch.setattr(type(processor), "__call__", lambda self, **kw: prompts.append(kw["text"]) or call(self, **kw))
    demo.ask(str(picture), "what color is the shape?")
    assert prompts == [vqa_prompt(processor, "what color is the shape?")]
    # a model trained describe-first is asked for its caption first, then the question after it
    prompts.clear()
    processor.vqa_layout = "describe_first"
    demo.ask(str(picture), "what color is the shape?")
    assert len(prompts) == 2 and prompts[0] == processor.description_prompt()
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith("USER: what color is the shape?\nASSISTANT:")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="min_new_tokens"):
        app.UniCodeDemo(model, processor, max_new_tokens=2, min_new_tokens=4)
    assert isinstance(app.build_demo(demo), gr.Blocks)
