"""UniCode demo (a Hugging Face Space): ask about an image, generate an image, see an image's code ids.

    python app.py --model OWNER/unicode-tiny        # or a local export folder; or set UNICODE_MODEL

The model is loaded through its remote code (`trust_remote_code=True`), so this file needs only
gradio, transformers and torch: it runs on a Space without this project's source.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Optional

import gradio as gr
import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL_ENV = "UNICODE_MODEL"
DEFAULT_MODEL = "unicode-mllm/unicode-tiny"
# Images the model writes are small (its training resolution); shown enlarged with crisp pixels.
DISPLAY_SIZE = 256
MAX_SEED = 2**31 - 1


def load(source: str):
    """(model, processor) from a repo id or a local export folder."""
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"model source must be a repo id or a folder, got {source!r}; pass --model or set {MODEL_ENV}"
        )
    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    return model, processor


def _enlarge(image: PIL.Image.Image) -> PIL.Image.Image:
    scale = max(1, DISPLAY_SIZE // max(image.size))
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)


class UniCodeDemo:
    """The three actions of the Space, independent of the UI (so they are testable without a browser).

    Args:
        max_new_tokens: answer length cap.
        min_new_tokens: answer length floor; a random or barely trained model may otherwise stop at once.
    """

    def __init__(self, model, processor, max_new_tokens: int = 48, min_new_tokens: int = 0):
        if min_new_tokens < 0 or max_new_tokens < max(1, min_new_tokens):
            raise ValueError(
                f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
                f"min_new_tokens={min_new_tokens}, max_new_tokens={max_new_tokens}"
            )
        self.model, self.processor = model, processor
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens

    def _image(self, upload) -> PIL.Image.Image:
        if upload is None:
            raise gr.Error("Upload an image first (PNG, JPEG, WebP, ...).")
        path = upload if isinstance(upload, str) else getattr(upload, "name", upload)
        try:
            return self.processor.image_processor.load_image(path)
        except (ValueError, TypeError) as error:
            name = os.path.basename(str(path))
            # The server-side temp path means nothing to the visitor; their file's name does.
            reason = str(error).replace(str(path), name)
            raise gr.Error(
                f"'{name}' is not an image this demo can read: {reason}. Upload a PNG, JPEG or WebP picture."
            )

    def _check_text(self, text: str, what: str) -> None:
        special = [t for t in self.processor.tokenizer.all_special_tokens if t and t in text]
        if special:
            raise gr.Error(f"Leave {', '.join(special)} out of the {what}: the demo places its special tokens itself.")

    @contextlib.contextmanager
    def _refusals(self, what: str):
        """The model's refusals (a prompt past its positions, a bad guidance scale) as one line for the visitor."""
        try:
            yield
        except ValueError as error:
            if type(error).__name__ == "PromptTooLongError":  # the Space runs the Hub's remote code, not this package
                raise gr.Error(f"This {what} is too long for the model; shorten it.") from error
            raise gr.Error(f"This {what} cannot be used: {error}") from error
        except TypeError as error:
            raise gr.Error(f"This {what} cannot be used: {error}") from error

    @torch.no_grad()
    def ask(self, upload, question: str) -> str:
        image = self._image(upload)
        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question about the image.")
        self._check_text(question, "question")
        description = None
        if self.processor.vqa_layout == "describe_first":  # this model answers after its own caption of the image
            description = self._reply(image, self.processor.description_prompt(), max_new_tokens=96)
        # The layout the model was trained to be asked in (the processor records it).
        prompt = self.processor.question_prompt(question, description=description)
        answer = self._reply(image, prompt, max_new_tokens=self.max_new_tokens)
        return answer or "(the model gave an empty answer)"

    def _reply(self, image, prompt: str, max_new_tokens: int) -> str:
        inputs = self.processor(images=[image], text=prompt).to(self.model.device)
        with self._refusals("question"):
            ids = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, min_new_tokens=self.min_new_tokens, do_sample=False
            )
        return self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()

    @torch.no_grad()
    def generate(self, prompt: str, guidance: float, seed: int) -> PIL.Image.Image:
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Describe the image to generate.")
        if not 0 <= int(seed) <= MAX_SEED:
            raise gr.Error(f"seed must be between 0 and {MAX_SEED}.")
        self._check_text(prompt, "description")
        inputs = self.processor(text=prompt, generation_mode="image").to(self.model.device)
        generator = torch.Generator(device=self.model.device).manual_seed(int(seed))
        with self._refusals("description"):
            ids = self.model.generate(
                **inputs,
                generation_mode="image",
                do_sample=True,
                generator=generator,
                guidance_scale=None if float(guidance) == 1.0 else float(guidance),
            )
        pixels = self.model.decode_image_tokens(ids)
        image = self.processor.post_process_multimodal_output(pixels, generation_mode="image")[0]
        return _enlarge(image)

    @torch.no_grad()
    def tokenize(self, upload):
        """(the image as the model sees it, its reconstruction from the codes, the code ids as text)."""
        image = self._image(upload)
        pixel_values = self.processor.image_processor(images=[image])["pixel_values"].to(self.model.device)
        codes = self.model.model.encode_images(pixel_values)  # (1, h, w, D) vocabulary ids
        flat = codes.reshape(1, -1)
        reconstruction = self.processor.post_process_multimodal_output(
            self.model.decode_image_tokens(flat), generation_mode="image"
        )[0]
        seen = self.processor.post_process_multimodal_output(pixel_values, generation_mode="image")[0]
        _, height, width, depth = codes.shape
        rows = [" ".join(f"{int(i)}" for i in codes[0, r].reshape(-1).tolist()) for r in range(height)]
        text = (
            f"{height}×{width} positions × depth {depth} = {flat.shape[1]} vocabulary ids (one row per line):\n"
            + "\n".join(rows)
        )
        return _enlarge(seen), _enlarge(reconstruction), text


def build_demo(demo: UniCodeDemo, title: str = "UniCode") -> gr.Blocks:
    with gr.Blocks(title=title) as blocks:
        gr.Markdown(
            f"# {title}\nOne codebook for text and images: the model reads and writes images as ids of its own "
            "vocabulary ([paper](https://arxiv.org/abs/2403.09072))."
        )
        with gr.Tab("Ask about an image", elem_id="tab-ask"):
            with gr.Row():
                ask_image = gr.File(label="Image", file_count="single", type="filepath", elem_id="ask-image")
                with gr.Column():
                    question = gr.Textbox(label="Question", value="What is in the picture?", elem_id="ask-question")
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask-button")
                    answer = gr.Textbox(label="Answer", interactive=False, elem_id="ask-answer")
            ask_button.click(demo.ask, [ask_image, question], answer, api_name="ask")
        with gr.Tab("Generate an image", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(
                        label="Description", value="a red circle left of a blue square", elem_id="gen-prompt"
                    )
                    guidance = gr.Slider(
                        1.0, 10.0, value=3.0, step=0.5, label="Guidance scale (1 = off)", elem_id="gen-guidance"
                    )
                    seed = gr.Number(
                        value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="gen-seed"
                    )
                    gen_button = gr.Button("Generate", variant="primary", elem_id="gen-button")
                generated = gr.Image(
                    label="Generated image (enlarged)", type="pil", interactive=False, elem_id="gen-output"
                )
            gen_button.click(demo.generate, [prompt, guidance, seed], generated, api_name="generate")
        with gr.Tab("Tokenize", elem_id="tab-tokenize"):
            with gr.Row():
                tok_image = gr.File(label="Image", file_count="single", type="filepath", elem_id="tok-image")
                tok_button = gr.Button("Tokenize", variant="primary", elem_id="tok-button")
            with gr.Row():
                seen = gr.Image(label="Input as the model sees it", type="pil", interactive=False, elem_id="tok-input")
                reconstruction = gr.Image(
                    label="Reconstruction from the codes", type="pil", interactive=False, elem_id="tok-recon"
                )
            code_ids = gr.Textbox(label="Code ids", lines=8, interactive=False, elem_id="tok-codes")
            tok_button.click(demo.tokenize, tok_image, [seen, reconstruction, code_ids], api_name="tokenize")
    return blocks


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=os.environ.get(MODEL_ENV, DEFAULT_MODEL), help=f"repo id or folder (env {MODEL_ENV})"
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-new-tokens", type=int, default=int(os.environ.get("UNICODE_MIN_NEW_TOKENS", 0)))
    args = parser.parse_args(argv)
    model, processor = load(args.model)
    demo = UniCodeDemo(model, processor, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    # The queue runs one generation at a time: a CPU Space has no room for parallel ones.
    build_demo(demo).queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
