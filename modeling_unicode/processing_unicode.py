"""Processor of UniCode: the LLM's tokenizer + `UniCodeImageProcessor`, a chat template with image
content, `<image>` expansion, text-to-image prompts, and generated outputs back to text or PIL.
"""

from __future__ import annotations

from typing import Optional

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .configuration_unicode import BOI_TOKEN, EOI_TOKEN, GENERATION_MODES, IMAGE_TOKEN, image_placeholder_count
from .image_processing_unicode import UniCodeImageProcessor

# Vicuna v1.5's conversation format (the paper's LLM), with {"type": "image"} content rendered as one
# <image> that the processor then expands. Shipped with the processor because many LLM tokenizers
# (Gemma's GGUF, a stage-0 tokenizer) have no chat template. BOS is left to the tokenizer.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set body = message['content'] -%}"
    "{%- else -%}{%- set body = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set body.text = body.text ~ '" + IMAGE_TOKEN + "' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set body.text = body.text ~ item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set body = body.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ body }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}ASSISTANT: {{ body }}{{ eos_token }}{{ '\\n' }}"
    "{%- else -%}USER: {{ body }}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)
# One of the paper's text-to-image instructions. Stage II trains with the same template and, with
# probability p, an empty caption: that empty-caption prompt is the unconditional branch of CFG.
DEFAULT_IMAGE_GENERATION_TEMPLATE = "Generate an image based on this description: '{caption}'."


class UniCodeProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False, "padding_side": "left"}, "common_kwargs": {"return_tensors": "pt"}}


def image_then_text(text: str) -> list[dict]:
    """A user turn's content that shows the one image and then asks about it: the image, a newline, the text. Every
    stage-II row that reads an image (`training.tasks.image_then`) and every prompt about an image is laid out this
    way, so the model is asked as it was trained."""
    return [{"type": "image"}, {"type": "text", "text": "\n" + text}]


# Where a question about the image stands: the layout a model was trained to be asked in, saved with its processor
# (`UniCodeProcessor.vqa_layout`) so that whoever asks it later asks the same way. "image_first" is the paper's (and
# the default): the image, then the question. "question_first" asks before the image, so that the image's positions
# can attend to the asked words. "describe_first" opens with the image's caption as an assistant turn and asks after
# it, so that a question about colours and shapes can be answered by reading words; at inference the model writes that
# caption itself first (`UniCodeProcessor.description_prompt`), so the answer still comes from the image.
VQA_LAYOUTS = ("image_first", "question_first", "describe_first")
# The request whose answer is the caption a "describe_first" conversation opens with (also stage II's first caption
# template, so the model has been asked it in training).
DESCRIBE_REQUEST = "Describe this image."


def check_vqa_layout(vqa_layout: str) -> None:
    if vqa_layout not in VQA_LAYOUTS:
        raise ValueError(f"vqa_layout={vqa_layout!r} is not a VQA layout; use one of {list(VQA_LAYOUTS)}")


def question_messages(question: str, vqa_layout: str = "image_first", description: Optional[str] = None) -> list:
    """The chat messages of a question about the one image, up to its answer, in `vqa_layout`: the one definition of
    the layouts, used by stage II's rows and by every prompt. `description` (the image's caption) is needed by, and
    only by, "describe_first"."""
    check_vqa_layout(vqa_layout)
    if (description is None) == (vqa_layout == "describe_first"):
        raise ValueError(
            f"description={description!r}: the describe_first layout needs the image's caption (ask "
            "description_prompt() first and pass its answer), the others take none"
        )
    if vqa_layout == "question_first":
        return [{"role": "user", "content": [{"type": "text", "text": question + "\n"}, {"type": "image"}]}]
    if vqa_layout == "image_first":
        return [{"role": "user", "content": image_then_text(question)}]
    return [
        {"role": "user", "content": image_then_text(DESCRIBE_REQUEST)},
        {"role": "assistant", "content": [{"type": "text", "text": description}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]


class UniCodeProcessor(ProcessorMixin):
    r"""Tokenizer + image processor for the UniCode MLLM.

    - `processor(text=..., images=...)`: each `<image>` in the text becomes `num_image_tokens`
      placeholders (the model scatters the image's code embeddings there) and the images become
      `pixel_values`. Padding is on the left, so batched generation continues every row at its end.
    - `processor(text=captions, generation_mode="image")`: text-to-image prompts (the chat template
      around `image_generation_template`), plus `unconditional_input_ids` — the same prompt with an
      empty caption — for classifier-free guidance. The model appends `<boi>` itself.
    - `post_process_multimodal_output(..., generation_mode="text"|"image")`: text, or PIL images from
      `model.decode_image_tokens(...)`.

    Args:
        image_processor (`UniCodeImageProcessor`), tokenizer: the tokenizer must hold `<image>`, `<boi>`,
            `<eoi>` (`add_image_special_tokens`).
        chat_template (`str`, *optional*): defaults to `DEFAULT_CHAT_TEMPLATE`.
        num_image_tokens (`int`): placeholders per input image — `UniCodeConfig.image_seq_length`;
            `from_model_config` fills it in.
        image_generation_template (`str`): text-to-image instruction with a `{caption}` field.
        vqa_layout (`str`): where a question stands against the image (`VQA_LAYOUTS`): the layout the model was
            trained to be asked in. Stage II records it; `question_prompt` follows it.
    """

    valid_processor_kwargs = UniCodeProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: Optional[str] = None,
        num_image_tokens: int = 64,
        image_generation_template: str = DEFAULT_IMAGE_GENERATION_TEMPLATE,
        vqa_layout: str = "image_first",
        **kwargs,
    ):
        missing = [
            token
            for token in (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)
            if tokenizer is not None and token not in tokenizer.get_vocab()
        ]
        if missing:
            raise ValueError(
                f"the tokenizer has no {missing}; add them with modeling_unicode.add_image_special_tokens(tokenizer) "
                "and resize the model's embeddings (from_pretrained_parts does both)"
            )
        if int(num_image_tokens) < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1 (UniCodeConfig.image_seq_length)")
        if "{caption}" not in image_generation_template:
            raise ValueError("image_generation_template must contain '{caption}' where the description goes")
        self.num_image_tokens = int(num_image_tokens)
        self.image_generation_template = image_generation_template
        check_vqa_layout(vqa_layout)
        self.vqa_layout = vqa_layout
        self.image_token, self.boi_token, self.eoi_token = IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN
        if tokenizer is not None:
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            self.boi_token_id = tokenizer.convert_tokens_to_ids(BOI_TOKEN)
            self.eoi_token_id = tokenizer.convert_tokens_to_ids(EOI_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None, **kwargs) -> "UniCodeProcessor":
        """A processor matching a `UniCodeConfig`: placeholder count and image size from the config,
        and a check that the tokenizer's image special tokens are the config's ids."""
        config.require_vision("a UniCode processor")
        size = config.vq_config.image_size
        if image_processor is None:
            image_processor = UniCodeImageProcessor(size=size)
        elif image_processor.size != size:
            raise ValueError(
                f"image_processor.size={image_processor.size} but the visual tokenizer reads {size}x{size} images; "
                f"use UniCodeImageProcessor(size={size})"
            )
        for token, name in ((IMAGE_TOKEN, "image_token_id"), (BOI_TOKEN, "boi_token_id"), (EOI_TOKEN, "eoi_token_id")):
            if tokenizer.convert_tokens_to_ids(token) != getattr(config, name):
                raise ValueError(
                    f"the tokenizer maps {token} to {tokenizer.convert_tokens_to_ids(token)} but config.{name}="
                    f"{getattr(config, name)}; use the tokenizer the model was assembled with"
                )
        count = image_placeholder_count(config.vq_config, config.visual_input)
        return cls(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=count, **kwargs)

    # -- text + images in ---------------------------------------------------------------------------
    def __call__(self, images=None, text=None, generation_mode: str = "text", **kwargs) -> BatchFeature:
        if generation_mode not in GENERATION_MODES:
            raise ValueError(
                f"generation_mode={generation_mode!r} is not supported; use one of {list(GENERATION_MODES)}"
            )
        if generation_mode == "image":
            return self._image_generation_inputs(images, text, **kwargs)
        if isinstance(text, (list, tuple)) and len(text) > 1:
            kwargs.setdefault("padding", True)
        return super().__call__(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def image_generation_prompt(self, caption: str) -> str:
        """The text-to-image prompt for `caption` (use `""` for the unconditional prompt), as a string
        ending where the model writes `<boi>`. Stage II formats its text-to-image samples with it."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a string, got {type(caption).__name__}")
        instruction = self.image_generation_template.format(caption=caption)
        messages = [{"role": "user", "content": [{"type": "text", "text": instruction}]}]
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def question_prompt(self, question: str, description: Optional[str] = None) -> str:
        """The prompt for a question about the one input image, as a string ending where the model answers, laid
        out as the model was trained to be asked (`vqa_layout`). Pass it with the image:
        `processor(text=processor.question_prompt(q), images=image)`. A "describe_first" model answers after its
        own caption of the image: generate the answer to `description_prompt()` first and pass it as
        `description`."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        messages = question_messages(question, self.vqa_layout, description)
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def description_prompt(self) -> str:
        """The prompt that asks for the image's caption (pass it with the image), the first of the two prompts a
        "describe_first" model is asked in."""
        messages = question_messages(DESCRIBE_REQUEST, "image_first")
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _image_generation_inputs(self, images, text, **kwargs) -> BatchFeature:
        if images is not None:
            raise ValueError(
                "generation_mode='image' takes captions only; image-conditioned generation uses generation_mode='text'"
            )
        if text is None:
            raise ValueError("generation_mode='image' needs text: one caption or a list of captions")
        captions = [text] if isinstance(text, str) else list(text)
        for caption in captions:
            if IMAGE_TOKEN in caption:
                raise ValueError(f"captions for generation_mode='image' must not contain {IMAGE_TOKEN}")
        return_tensors = kwargs.pop("return_tensors", "pt")
        kwargs.setdefault("padding", len(captions) > 1)
        kwargs["padding_side"] = "left"
        conditional = self.tokenizer(
            [self.image_generation_prompt(c) for c in captions], return_tensors=return_tensors, **kwargs
        )
        unconditional = self.tokenizer(
            [self.image_generation_prompt("")] * len(captions), return_tensors=return_tensors, **kwargs
        )
        return BatchFeature(
            {
                "input_ids": conditional["input_ids"],
                "attention_mask": conditional["attention_mask"],
                "unconditional_input_ids": unconditional["input_ids"],
                "unconditional_attention_mask": unconditional["attention_mask"],
            }
        )

    # -- outputs -----------------------------------------------------------------------------------
    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens=True, generation_mode=None, **kwargs
    ):
        """`generation_mode="text"` (or None): decoded strings. `"image"`: PIL images from the pixels
        that `UniCodeForConditionalGeneration.decode_image_tokens` returns."""
        if generation_mode in (None, "text"):
            return self.post_process_image_text_to_text(
                generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs
            )
        if generation_mode == "image":
            dtype = getattr(generated_outputs, "dtype", None)
            if dtype is not None and not getattr(dtype, "is_floating_point", str(dtype).startswith("float")):
                raise TypeError(
                    "generation_mode='image' post-processes pixels, but got integer token ids; decode them first with "
                    "model.decode_image_tokens(ids)"
                )
            return self.image_processor.postprocess(generated_outputs)
        raise ValueError(f"generation_mode={generation_mode!r} is not supported; use 'text' or 'image'")

    def postprocess(self, pixel_values) -> list:
        return self.image_processor.postprocess(pixel_values)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


__all__ = [
    "UniCodeProcessor",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_IMAGE_GENERATION_TEMPLATE",
    "DESCRIBE_REQUEST",
    "VQA_LAYOUTS",
    "question_messages",
]
