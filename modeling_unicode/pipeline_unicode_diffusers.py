"""A diffusers `DiffusionPipeline` for UniCode text-to-image (autoregressive, like diffusers' own
GLM-Image pipeline): `pipe("a red circle", guidance_scale=3.0, generator=g).images[0]`.

Its own file, imported by nothing else in `modeling_unicode`, so the model files (Hub remote code)
never need diffusers. Install with `pip install unicode-mllm[diffusers]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .modeling_unicode import UniCodeForConditionalGeneration
from .processing_unicode import UniCodeProcessor

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class UniCodeTextToImagePipelineOutput(BaseOutput):
    """images: PIL images, or an array/tensor (batch, H, W, 3) in [0, 1] (`np`) / (batch, 3, H, W) in
    [-1, 1] (`pt`); image_token_ids: the generated code ids (batch, ĥ·ŵ·D)."""

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]
    image_token_ids: torch.LongTensor


class UniCodeTextToImagePipeline(DiffusionPipeline):
    """Caption -> image with a UniCode MLLM: the processor writes the text-to-image prompt and its
    empty-caption twin, the model samples ĥ·ŵ·D code ids with batched classifier-free guidance, and
    its visual tokenizer decodes them.

    Args:
        model (`UniCodeForConditionalGeneration`), processor (`UniCodeProcessor`): registered modules,
            saved and reloaded by `save_pretrained` / `from_pretrained` (import this module first).
    """

    model_cpu_offload_seq = "model"
    _optional_components = []

    def __init__(self, model: UniCodeForConditionalGeneration, processor: UniCodeProcessor):
        super().__init__()
        if not isinstance(model, UniCodeForConditionalGeneration):
            raise TypeError(f"model must be a UniCodeForConditionalGeneration, got {type(model).__name__}")
        if not isinstance(processor, UniCodeProcessor):
            raise TypeError(f"processor must be a UniCodeProcessor, got {type(processor).__name__}")
        self.register_modules(model=model, processor=processor)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]],
        guidance_scale: Optional[float] = 3.0,
        num_images_per_prompt: int = 1,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate `num_images_per_prompt` images per caption. `guidance_scale` None or 1 turns
        guidance off; `generator` makes sampling reproducible."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; use one of {list(OUTPUT_TYPES)}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
        captions = [prompt] if isinstance(prompt, str) else list(prompt)
        captions = [caption for caption in captions for _ in range(num_images_per_prompt)]
        inputs = self.processor(text=captions, generation_mode="image").to(self.model.device)
        sequences = self.model.generate(
            **inputs,
            generation_mode="image",
            guidance_scale=guidance_scale,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            generator=generator,
        )
        token_ids = self.model.extract_image_tokens(sequences)
        pixels = self.model.decode_image_tokens(token_ids)
        if output_type == "pil":
            images = self.processor.postprocess(pixels)
        elif output_type == "np":
            images = ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()
        else:
            images = pixels
        if not return_dict:
            return (images, token_ids)
        return UniCodeTextToImagePipelineOutput(images=images, image_token_ids=token_ids)


__all__ = ["UniCodeTextToImagePipeline", "UniCodeTextToImagePipelineOutput"]
