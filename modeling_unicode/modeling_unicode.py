"""The UniCode MLLM (arXiv 2403.09072): an LLM that reads and writes images as its own vocabulary ids.

`UniCodeModel` is the backbone (LLM decoder + frozen visual tokenizer); it turns images into
embeddings and scatters them into the `<image>` placeholders, so anything that calls the backbone
directly (TRL's fused LM-head losses) sees images too. `UniCodeForConditionalGeneration` adds the LM
head and generation of text and of images (`<boi>` + ĥ·ŵ·D code ids + `<eoi>`).
"""

# No `from __future__ import annotations` here: transformers reads the `**kwargs: Unpack[TransformersKwargs]`
# annotations of `forward` at run time to learn which outputs (attentions, hidden states) the model can return.
import copy
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoModel, Cache, DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_unicode import (
    GENERATION_MODES,
    IMAGE_SPECIAL_TOKENS,
    UniCodeConfig,
    add_image_special_tokens,
    check_adapter_size,
)
from .modeling_unicode_vq import UniCodeVisualTokenizer
from .quantization_unicode import (
    code_coordinates,
    embedding_rows,
    image_input_embeddings,
    placeholder_coordinates,
    placeholder_grid,
    token_ids_to_code_indices,
    unflatten_code_map,
)

# transformers v5 renamed `past_key_values` to `cache`; callers written for 4.x (and libraries) still pass the old
# name, which must land in `cache` rather than in **kwargs, where the LLM would ignore it next to `cache=None`.
_accept_legacy_cache_name = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")


class PromptTooLongError(ValueError):
    """A prompt (with the image it would write) past the positions the model was trained on: past them it writes
    garbage without an error, so `generate` refuses it. Apps catch this one to ask for a shorter text."""


def check_guidance_scale(scale) -> None:
    """Classifier-free guidance's scale: a positive number, or None (no guidance). Checked by `generate`, and by the
    demo and evaluation before their minutes of training or VQA, so a bad value fails there and not at the end."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf
    ):
        raise ValueError(
            f"guidance_scale={scale!r} must be a positive number, and finite (1 disables guidance; 3-7 is typical), "
            "or None"
        )


@dataclass
class UniCodeModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_codes (`torch.LongTensor` of shape `(num_images, ĥ, ŵ, D)`, *optional*):
        The code map (vocabulary ids) of the input images — also the targets of image decompression.
    """

    image_codes: Optional[torch.LongTensor] = None


@dataclass
class UniCodeImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(num_images, ĥ·ŵ·D, hidden_size)`):
        The LLM's input embedding of every code of each image, in the flattened code order: the image as the LLM
        would read it written out as code ids.
    pooler_output (`torch.FloatTensor` of shape `(num_images, N, hidden_size)`):
        What enters the LLM at an image's N `<image>` placeholders (`config.visual_input`, plus the placeholder
        position embeddings when the model has them).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        With `output_hidden_states` and `pixel_values`: the visual tokenizer encoder's feature maps, one per level
        (`UniCodeVQEncoder.feature_levels`), each `(num_images, channels, height, width)`.
    image_codes (`torch.LongTensor` of shape `(num_images, ĥ, ŵ, D)`):
        The code map (vocabulary ids) of the images.
    """

    image_codes: Optional[torch.LongTensor] = None


@dataclass
class UniCodeCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    image_codes (`torch.LongTensor` of shape `(num_images, ĥ, ŵ, D)`, *optional*):
        The code map (vocabulary ids) of the input images.
    """

    image_codes: Optional[torch.LongTensor] = None


class UniCodeImageSpanLogitsProcessor(LogitsProcessor):
    """Keeps a generated image decodable: after `<boi>` only visual codes, and `<eoi>` after exactly
    `tokens_per_image` of them. Never writes `image_token_id` (`<image>`): that placeholder only stands
    for an input image's features, and written as output it would come back into the model without one.

    Stateless (reads the position of the last `<boi>`/`<eoi>` from the sequence), so it works in the
    stock text loop, in the image loop, and for prompts that already hold part of an image.
    """

    def __init__(
        self,
        codebook_token_ids,
        boi_token_id: int,
        eoi_token_id: int,
        tokens_per_image: int,
        image_token_id: Optional[int] = None,
    ):
        self.codebook_token_ids = torch.as_tensor(codebook_token_ids, dtype=torch.long)
        self.boi_token_id = int(boi_token_id)
        self.eoi_token_id = int(eoi_token_id)
        self.tokens_per_image = int(tokens_per_image)
        self.image_token_id = None if image_token_id is None else int(image_token_id)
        self._allowed = None  # (vocab,) bool mask, built once per device and vocabulary width

    def allowed_mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self._allowed is None or self._allowed.device != scores.device or self._allowed.numel() != scores.shape[-1]:
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            allowed[self.codebook_token_ids.to(scores.device)] = True
            self._allowed = allowed
        return self._allowed

    def restrict_to_codes(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The in-span rule alone, for a caller that knows every row is writing codes (the image loop)."""
        return scores.masked_fill(~self.allowed_mask(scores), float("-inf"))

    def span_state(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inside an open image span, codes written since its `<boi>`) per row."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_boi = torch.where(input_ids == self.boi_token_id, positions, -1).amax(dim=1)
        last_eoi = torch.where(input_ids == self.eoi_token_id, positions, -1).amax(dim=1)
        return last_boi > last_eoi, input_ids.shape[1] - 1 - last_boi

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.image_token_id is not None and self.image_token_id < scores.shape[-1]:
            scores = scores.clone()
            scores[:, self.image_token_id] = float("-inf")
        in_span, written = self.span_state(input_ids)
        if not bool(in_span.any()):
            return scores
        write_code = (in_span & (written < self.tokens_per_image)).unsqueeze(1)
        close = (in_span & (written >= self.tokens_per_image)).unsqueeze(1)
        allowed = self.allowed_mask(scores).unsqueeze(0)
        is_eoi = torch.zeros_like(allowed)
        is_eoi[0, self.eoi_token_id] = True
        blocked = (write_code & ~allowed) | (close & ~is_eoi)
        return scores.masked_fill(blocked, float("-inf"))


class UniCodeAxialPositionEmbedding(nn.Module):
    """A cell's position as the sum of its grid row's, its grid column's and its level's vectors (axial position
    embeddings: Ho et al. 2019, "Axial Attention in Multidimensional Transformers", §3).

    A per-index table learns each cell's vector from that cell's examples alone; here the cells of a grid row
    share one vector, so the words that name a row or a column ("top", "left") can bind to one direction that
    every cell they cover trains. Created at zero, like the per-index tables.
    """

    def __init__(self, grid_size: int, levels: int, hidden_size: int):
        super().__init__()
        self.rows = nn.Embedding(grid_size, hidden_size)
        self.columns = nn.Embedding(grid_size, hidden_size)
        self.levels = nn.Embedding(levels, hidden_size)
        for table in (self.rows, self.columns, self.levels):
            nn.init.zeros_(table.weight)

    def forward(self, row: torch.LongTensor, column: torch.LongTensor, level: torch.LongTensor) -> torch.Tensor:
        return self.rows(row) + self.columns(column) + self.levels(level)


class UniCodeImageInputAdapter(nn.Module):
    """A residual MLP over each input-image placeholder's features (`config.image_input_adapter_size`).

    The unified codebook fixes what an image position holds: the sum of its codes' frozen LLM rows. A cell's shape
    is spread over those rows in a way no text token's row needs untangling, and the LLM's own layers must learn to
    do it while they learn everything else. A projector between the image and the LLM (the two-layer MLP of
    LLaVA-1.5, Liu et al. 2023) gives that re-mapping its own parameters; here it is residual and its output layer
    starts at zero, so adding it to a trained model changes nothing until it trains, and the codes, their ids and
    their rows stay as the tokenizer left them.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size)
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.down(nn.functional.gelu(self.up(self.norm(features))))


# Modules stage II adds to an assembled model and trains whole (LoRA keeps them as `modules_to_save`).
ADDED_MODULES = ("image_position_embedding", "code_position_embedding", "image_input_adapter")


class UniCodePreTrainedModel(PreTrainedModel):
    config_class = UniCodeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = "cache"

    @torch.no_grad()
    def _init_weights(self, module):
        # Stage II's additions start at zero (`add_image_position_embedding` and the others say why); a model built
        # from a config that already asks for them must get them so, not drawn by the generic init.
        if any(module is starts_at_zero for starts_at_zero in self._zero_start_modules()):
            for parameter in module.parameters(recurse=False):
                init.zeros_(parameter)
        else:
            super()._init_weights(module)

    def _zero_start_modules(self) -> list[nn.Module]:
        base = getattr(self, self.base_model_prefix, self)
        found = []
        for name in ADDED_MODULES:
            added = getattr(base, name, None)
            if isinstance(added, UniCodeImageInputAdapter):
                found.append(added.down)  # only the residual branch's output layer starts at zero
            elif added is not None:
                found.extend(part for part in added.modules() if isinstance(part, nn.Embedding))
        return found

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        rows = new_num_tokens if new_num_tokens is not None else self.get_input_embeddings().weight.shape[0]
        if isinstance(pad_to_multiple_of, int) and pad_to_multiple_of > 0:
            rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of  # transformers rounds the table up to it
        # Checked before transformers resizes: it cuts the embedding module's weight in place.
        self._check_vocabulary_rows(rows, new_num_tokens)
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def _check_vocabulary_rows(self, rows: int, new_num_tokens=None) -> None:
        """Refuse an embedding table of `rows` rows that would lose an id images depend on: a visual code (the
        codebook IS those rows) or `<image>` / `<boi>` / `<eoi>`."""
        config = self.config
        used = []
        if config.vq_config is not None and config.vq_config.codebook_token_ids:
            largest = max(config.vq_config.codebook_token_ids)
            used.append((largest, f"the codebook's largest id {largest} (vq_config.codebook_token_ids)"))
        for name in (f"{token}_id" for token in IMAGE_SPECIAL_TOKENS):
            if getattr(config, name) is not None:
                used.append((getattr(config, name), f"{name}={getattr(config, name)}"))
        lost = [what for token_id, what in used if token_id >= rows]
        if lost:
            asked = f"new_num_tokens={new_num_tokens}" if new_num_tokens is not None else f"{rows} rows"
            keep = max(token_id for token_id, _ in used) + 1
            raise ValueError(
                f"resize_token_embeddings({asked}) would cut off vocabulary ids the model's images use: "
                f"{', '.join(lost)}; resize to new_num_tokens >= {keep}"
            )


class UniCodeModel(UniCodePreTrainedModel):
    """LLM decoder + visual tokenizer; returns `last_hidden_state` of the mixed text/image sequence."""

    def __init__(self, config: UniCodeConfig):
        super().__init__(config)
        self.language_model = AutoModel.from_config(config.text_config)
        if config.vq_config is not None:
            self.vision_tokenizer = UniCodeVisualTokenizer(config.vq_config)
            # Trained in stage I; stage II must not move the pixels <-> codes mapping.
            self.vision_tokenizer.requires_grad_(False)
        else:
            self.vision_tokenizer = None
        self.image_position_embedding = None
        self.code_position_embedding = None
        self.image_input_adapter = None
        if config.image_position_embeddings:
            self.add_image_position_embedding()
        if config.code_position_embeddings:
            self.add_code_position_embedding()
        if config.image_input_adapter_size:
            self.add_image_input_adapter(config.image_input_adapter_size)
        self.post_init()

    def _position_table(self, rows: int, side: int, levels: int) -> nn.Module:
        """A position table at zero in `config.position_embedding_layout`: `rows` rows, one per index, or axial over
        a `side` x `side` grid of `levels` levels."""
        weight = self.get_input_embeddings().weight
        hidden = self.config.get_text_config().hidden_size
        if self.config.position_embedding_layout == "index":
            table = nn.Embedding(rows, hidden)
            nn.init.zeros_(table.weight)
        else:
            table = UniCodeAxialPositionEmbedding(side, levels, hidden)
        return table.to(weight.device, weight.dtype)

    def add_image_position_embedding(self) -> nn.Module:
        """The input image's position table (`config.image_position_embeddings`), created at zero so a model it is
        added to computes exactly what it did before, until training moves it."""
        vq = self.config.vq_config
        side, levels = placeholder_grid(vq.code_grid_size, vq.depth, vq.quantizer, self.config.visual_input)
        self.image_position_embedding = self._position_table(self.config.image_seq_length, side, levels)
        self.config.image_position_embeddings = True
        return self.image_position_embedding

    def add_code_position_embedding(self) -> nn.Module:
        """The written codes' position table (`config.code_position_embeddings`), created at zero like the input
        image's."""
        vq = self.config.vq_config
        self.code_position_embedding = self._position_table(
            self.config.image_tokens_per_generation, vq.code_grid_size, vq.depth
        )
        self.config.code_position_embeddings = True
        return self.code_position_embedding

    def add_image_input_adapter(self, intermediate_size: int) -> nn.Module:
        """The input image's adapter (`config.image_input_adapter_size`), added so that the model it is added to
        computes exactly what it did before, until training moves it."""
        check_adapter_size(intermediate_size)
        if not intermediate_size:
            raise ValueError("add_image_input_adapter(intermediate_size=0) adds nothing; pass the adapter's width")
        weight = self.get_input_embeddings().weight
        hidden = self.config.get_text_config().hidden_size
        self.image_input_adapter = UniCodeImageInputAdapter(hidden, intermediate_size).to(weight.device, weight.dtype)
        self.config.image_input_adapter_size = intermediate_size
        return self.image_input_adapter

    def image_position_rows(self) -> torch.Tensor:
        """(placeholders, hidden): what `image_position_embedding` adds to an input image's placeholders."""
        # Dispatched on the config, not the module's class: PEFT wraps a trained table in its own module.
        table = self.image_position_embedding
        device = next(table.parameters()).device
        if self.config.position_embedding_layout == "index":
            return table(torch.arange(self.config.image_seq_length, device=device))
        vq = self.config.vq_config
        grid = (vq.code_grid_size, vq.depth, vq.quantizer, self.config.visual_input)
        return table(*placeholder_coordinates(*grid, device=device))

    def code_position_rows(self, index: torch.LongTensor) -> torch.Tensor:
        """What `code_position_embedding` adds to the code written at each `index` (>= 0) of its image."""
        if self.config.position_embedding_layout == "index":
            return self.code_position_embedding(index)
        vq = self.config.vq_config
        return self.code_position_embedding(*code_coordinates(index, vq.code_grid_size, vq.depth))

    def code_indices(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """For each token that is a visual code, its index in its image's flattened code sequence (counting the
        row's code ids since its last `<boi>`); -1 for every other token."""
        is_code = torch.isin(input_ids, self.codebook_token_ids.to(input_ids.device))
        count = is_code.long().cumsum(-1)
        if self.config.boi_token_id is not None:
            count = count - torch.where(input_ids == self.config.boi_token_id, count, 0).cummax(-1).values
        return torch.where(is_code, (count - 1) % self.config.image_tokens_per_generation, -1)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_tokenizer is not None:
            self.vision_tokenizer.eval()  # frozen: dropout must not change the codes during training
        return self

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # -- the unified codebook -------------------------------------------------------------------
    def _require_vision(self, what: str) -> UniCodeVisualTokenizer:
        self.config.require_vision(what)
        return self.vision_tokenizer

    @property
    def codebook_token_ids(self) -> torch.LongTensor:
        return self._require_vision("the codebook").codebook_token_ids

    def codebook(self) -> torch.Tensor:
        """The K code vectors: the LLM's input embeddings of `codebook_token_ids`, as the LLM sees them."""
        return embedding_rows(
            self.get_input_embeddings(), self.codebook_token_ids.to(self.get_input_embeddings().weight.device)
        )

    # -- images -> codes -> embeddings ----------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Pixels (B, C, S, S) in [-1, 1] -> code map (B, ĥ, ŵ, D) of vocabulary ids."""
        tokenizer = self._require_vision("image input")
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.to(self.device)  # the tokenizer takes them to its own dtype
        return tokenizer.encode(pixel_values, codebook=self.codebook())

    def check_image_codes(self, image_codes) -> torch.LongTensor:
        """Validate precomputed codes, (B, ĥ, ŵ, D) or flattened (B, ĥ·ŵ·D), and return the code map."""
        vq = self._require_vision("image_codes").config
        grid, depth = vq.code_grid_size, vq.depth
        if (
            not isinstance(image_codes, torch.Tensor)
            or image_codes.is_floating_point()
            or image_codes.dtype == torch.bool
        ):
            raise TypeError(
                "image_codes must be an integer torch.Tensor of vocabulary ids (from encode_images or a generated "
                "image), got "
                f"{image_codes.dtype if isinstance(image_codes, torch.Tensor) else type(image_codes).__name__}"
            )
        if image_codes.dim() == 2:
            image_codes = unflatten_code_map(image_codes, grid, depth)
        if image_codes.dim() != 4 or tuple(image_codes.shape[1:]) != (grid, grid, depth):
            raise ValueError(
                f"image_codes must have shape (num_images, {grid}, {grid}, {depth}) or (num_images, "
                f"{grid * grid * depth}), "
                f"got {tuple(image_codes.shape)}"
            )
        image_codes = image_codes.long().to(self.codebook_token_ids.device)
        token_ids_to_code_indices(image_codes, self.codebook_token_ids, argument="image_codes")  # raises on non-codes
        return image_codes

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_codes: Optional[torch.LongTensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniCodeImageFeaturesOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, channels, size, size)`, *optional*):
            Images in [-1, 1]; the visual tokenizer turns them into codes.
        image_codes (`torch.LongTensor` of shape `(num_images, ĥ, ŵ, D)` or `(num_images, ĥ·ŵ·D)`, *optional*):
            Precomputed code maps (vocabulary ids), in place of `pixel_values`.
        """
        if pixel_values is not None and image_codes is not None:
            raise ValueError("pass either pixel_values or image_codes, not both")
        if pixel_values is None and image_codes is None:
            raise ValueError("get_image_features needs the images: pass pixel_values or image_codes")
        output_hidden_states = kwargs.get("output_hidden_states")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        feature_maps = []
        if pixel_values is not None:
            encoder = self._require_vision("image input").encoder
            with encoder.recording_feature_maps(enabled=bool(output_hidden_states)) as feature_maps:
                codes = self.encode_images(pixel_values)
        else:
            codes = self.check_image_codes(image_codes)
        embedding = self.get_input_embeddings()
        code_embeddings = embedding_rows(embedding, codes.to(embedding.weight.device))
        features = image_input_embeddings(code_embeddings, self.config.vq_config.quantizer, self.config.visual_input)
        if self.image_position_embedding is not None:
            features = features + self.image_position_rows().to(features.dtype)
        if self.image_input_adapter is not None:
            # After the positions: an adapter that sees only the codes outgrows the position rows it is added beside
            # and the LLM loses where each cell is (docs/results.md, "An input adapter").
            features = self.image_input_adapter(features)
        return UniCodeImageFeaturesOutput(
            last_hidden_state=image_input_embeddings(code_embeddings, self.config.vq_config.quantizer, "flatten"),
            pooler_output=features,
            hidden_states=tuple(feature_maps) if feature_maps else None,
            image_codes=codes,
        )

    def get_placeholder_mask(self, input_ids, inputs_embeds) -> torch.BoolTensor:
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError(
                "config.image_token_id is None; set it to the id of <image> (add_image_special_tokens returns it)"
            )
        if input_ids is not None:
            return input_ids == image_token_id
        placeholder = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder).all(-1)

    @_accept_legacy_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_codes: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        code_positions: Optional[torch.LongTensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniCodeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if self.code_position_embedding is not None and (input_ids is not None or code_positions is not None):
            # `code_positions` comes from a decoding loop that feeds one token at a time (no `<boi>` in sight).
            index = self.code_indices(input_ids) if code_positions is None else code_positions.to(inputs_embeds.device)
            rows = self.code_position_rows(index.clamp(min=0)) * (index >= 0).unsqueeze(-1)
            inputs_embeds = inputs_embeds + rows.to(inputs_embeds.dtype)

        codes = None
        has_images = pixel_values is not None or image_codes is not None
        if has_images:
            image_features = self.get_image_features(
                pixel_values=pixel_values, image_codes=image_codes, return_dict=True
            )
            features, codes = image_features.pooler_output, image_features.image_codes
            mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            if int(mask.sum()) != features.shape[0] * features.shape[1]:
                raise ValueError(
                    f"input_ids hold {int(mask.sum())} <image> placeholders but {features.shape[0]} image(s) need "
                    f"{features.shape[0]} x {features.shape[1]} = {features.shape[0] * features.shape[1]}; give one "
                    "image "
                    "per <image> in the text and let UniCodeProcessor expand each <image> into its placeholders"
                )
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), features)
        elif input_ids is not None and self.config.image_token_id is not None:
            num_placeholders = int((input_ids == self.config.image_token_id).sum())
            if num_placeholders:
                raise ValueError(
                    f"input_ids hold {num_placeholders} <image> placeholders but neither pixel_values nor image_codes "
                    "was given; pass the images (UniCodeProcessor returns pixel_values) or remove the <image> tokens"
                )

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return UniCodeModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            image_codes=codes,
        )


def _parameter_name(root: nn.Module, parameter: nn.Parameter) -> str:
    for name, candidate in root.named_parameters(remove_duplicate=False):
        if candidate is parameter:
            return name
    raise ValueError("the language model's input embedding weight is not one of its parameters")


class UniCodeForConditionalGeneration(UniCodePreTrainedModel, GenerationMixin):
    """UniCode MLLM with its LM head: understanding (text out) and generation of images (code ids out).

    `generate(..., generation_mode="text")` is the stock transformers loop (a `<boi>` the model writes
    is followed by exactly ĥ·ŵ·D codes and `<eoi>`); `generation_mode="image"` appends `<boi>`, runs
    this class's loop with classifier-free guidance batched into one forward per step, and returns the
    prompt, `<boi>`, the codes and `<eoi>`. `decode_image_tokens` turns those into pixels.
    """

    output_modalities = ("text", "image")

    def __init__(self, config: UniCodeConfig):
        super().__init__(config)
        self.model = UniCodeModel(config)
        text_config = config.get_text_config()
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        # Any decoder may be the LLM, so the tied source is looked up, not hard-coded.
        embedding_name = _parameter_name(self.model.language_model, self.model.get_input_embeddings().weight)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embedding_name}"}
        self.post_init()

    def init_parallel_plans(self) -> None:
        super().init_parallel_plans()
        # A tied head IS the embedding's parameter, so tensor parallelism must shard both on the vocabulary or neither
        # (a sharded head over a replicated table gathers tp x vocab logits). The LLM's own plan decides for the table;
        # the head follows it, tied or not, as its rows are the same vocabulary's.
        embedding = self._tied_weights_keys["lm_head.weight"].rsplit(".", 1)[0]
        if embedding in self._tp_plan:
            self._tp_plan["lm_head"] = "colwise_gather_output"

    # -- plumbing -------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @property
    def vision_tokenizer(self) -> Optional[UniCodeVisualTokenizer]:
        return self.model.vision_tokenizer

    def get_image_features(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_codes: Optional[torch.LongTensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniCodeImageFeaturesOutput:
        return self.model.get_image_features(pixel_values=pixel_values, image_codes=image_codes, **kwargs)

    @property
    def language_model(self):
        return self.model.language_model

    # -- forward --------------------------------------------------------------------------------
    @_accept_legacy_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_codes: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniCodeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): next-token targets,
            -100 where no loss is wanted (prompts, placeholders, padding). Shifted inside.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_codes=image_codes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # whatever the shared config says: this head reads the fields by name
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.get_text_config().vocab_size, **kwargs
            )
        return UniCodeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_codes=outputs.image_codes,
        )

    def prepare_inputs_for_generation(self, *args, image_codes=None, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # Like pixel_values: the images are in the cache after prefill.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["image_codes"] = image_codes
        return model_inputs

    # -- images out -----------------------------------------------------------------------------
    def image_span_logits_processor(self) -> UniCodeImageSpanLogitsProcessor:
        config = self.config
        config.require_vision("image generation")
        if config.boi_token_id is None or config.eoi_token_id is None:
            raise ValueError(
                "config.boi_token_id / eoi_token_id are None; set them to the ids of <boi>/<eoi> "
                "(add_image_special_tokens returns them)"
            )
        return UniCodeImageSpanLogitsProcessor(
            config.vq_config.codebook_token_ids,
            config.boi_token_id,
            config.eoi_token_id,
            config.image_tokens_per_generation,
            image_token_id=config.image_token_id,
        )

    def extract_image_tokens(self, sequences: torch.LongTensor) -> torch.LongTensor:
        """The ĥ·ŵ·D code ids of each row: the row itself if it is exactly that long and holds no
        `<boi>`, else the ids after the row's last `<boi>`."""
        n = self.config.image_tokens_per_generation
        if not isinstance(sequences, torch.Tensor) or sequences.is_floating_point():
            raise TypeError("image tokens must be an integer torch.Tensor of vocabulary ids")
        if sequences.dim() == 1:
            sequences = sequences.unsqueeze(0)
        boi = self.config.boi_token_id
        has_boi = (sequences == boi).any(dim=1) if boi is not None else torch.zeros(len(sequences), dtype=torch.bool)
        if sequences.shape[1] == n and not bool(has_boi.any()):
            return sequences
        if not bool(has_boi.all()):
            raise ValueError(
                f"each row must be {n} code ids, or a generated sequence containing <boi> followed by {n} code ids; "
                "generate with generation_mode='image'"
            )
        positions = torch.arange(sequences.shape[1], device=sequences.device)
        start = torch.where(sequences == boi, positions, -1).amax(dim=1) + 1
        if bool((start + n > sequences.shape[1]).any()):
            raise ValueError(f"a row has fewer than {n} ids after its last <boi>; the image span is incomplete")
        index = start.unsqueeze(1) + torch.arange(n, device=sequences.device)
        return sequences.gather(1, index)

    @torch.no_grad()
    def decode_image_tokens(self, image_tokens: torch.LongTensor) -> torch.FloatTensor:
        """Code ids (B, ĥ·ŵ·D) — or generated sequences holding `<boi>` + codes — to pixels (B, C, S, S)
        in about [-1, 1] (`UniCodeProcessor.post_process_multimodal_output` makes PIL images)."""
        tokenizer = self.model._require_vision("decode_image_tokens")
        vq = tokenizer.config
        ids = self.extract_image_tokens(image_tokens).contiguous()
        codes = self.model.check_image_codes(unflatten_code_map(ids, vq.code_grid_size, vq.depth))
        return tokenizer.decode(codes, codebook=self.model.codebook())

    # -- generation -----------------------------------------------------------------------------
    def generate(self, inputs: Optional[torch.Tensor] = None, generation_mode: str = "text", **kwargs):
        """`generation_mode="text"`: transformers' loop (sampling, beams, streaming, ...), with image
        spans kept well-formed. `generation_mode="image"`: see `_generate_image`; extra arguments
        `unconditional_input_ids`/`unconditional_attention_mask` (the same template with an empty
        caption, as `UniCodeProcessor(..., generation_mode="image")` returns) and `guidance_scale`."""
        if generation_mode not in GENERATION_MODES:
            raise ValueError(
                f"generation_mode={generation_mode!r} is not supported; use one of {list(GENERATION_MODES)}"
            )
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is not None:
            self._check_prompt_fits("input_ids", prompt, generation_mode, kwargs.get("max_new_tokens"))
        if generation_mode == "image":
            return self._generate_image(inputs, **kwargs)
        if kwargs.get("guidance_scale") is not None:
            raise ValueError("guidance_scale applies to generation_mode='image'; drop it for text generation")
        for name in ("unconditional_input_ids", "unconditional_attention_mask"):
            kwargs.pop(name, None)
        if (
            self.config.vq_config is not None
            and self.config.boi_token_id is not None
            and self.config.eoi_token_id is not None
        ):
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(self.image_span_logits_processor())
            kwargs["logits_processor"] = processors
        # Any guidance_scale in generation_config.json is the image-mode default, not for text.
        return super().generate(inputs, guidance_scale=None, **kwargs)

    def _pad_token_id(self, generation_config: GenerationConfig) -> int:
        for candidate in (
            generation_config.pad_token_id,
            self.config.get_text_config().pad_token_id,
            generation_config.eos_token_id,
        ):
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if isinstance(candidate, torch.Tensor):
                candidate = int(candidate.flatten()[0])
            if candidate is not None:
                return int(candidate)
        return 0

    def _check_prompt_fits(self, name: str, ids, generation_mode: str, max_new_tokens=None) -> None:
        """A prompt of ids that fits the positions the model was trained on: past them a model writes garbage
        without an error, so a long question is refused here instead."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(
                f"{name} must be an integer tensor of token ids (e.g. from UniCodeProcessor), got {kind}; token ids "
                "are never fractional, so a float tensor is a mistake upstream"
            )
        length = ids.shape[-1] if ids.dim() else 0
        if length == 0:
            raise ValueError(f"{name} is empty; give a prompt of at least one token (the processor adds BOS)")
        if generation_mode != "text":
            return  # an image's length is fixed: `_generate_image` checks prompt + image against the positions
        limit = self.config.get_text_config().max_position_embeddings
        if length > limit:
            raise PromptTooLongError(
                f"{name} has {length} tokens, but this model reads at most {limit} positions "
                f"(text_config.max_position_embeddings); shorten the prompt to {limit} tokens"
            )
        if max_new_tokens is not None and length + int(max_new_tokens) > limit:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} after a prompt of {length} tokens passes the model's {limit} "
                f"positions (text_config.max_position_embeddings); use max_new_tokens <= {limit - length}"
            )

    @staticmethod
    def _check_prompt(name: str, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of shape (batch, length), e.g. from UniCodeProcessor")
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(
                f"the attention mask of {name} has shape {tuple(mask.shape)}, expected {tuple(ids.shape)}"
            )
        if bool((mask[:, -1] == 0).any()):
            raise ValueError(
                f"{name} is right-padded; image generation continues every row at its end, so pad on the left "
                "(UniCodeProcessor does; or set tokenizer.padding_side='left')"
            )
        return ids, mask.to(ids.dtype)

    def _append_boi(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boi = self.config.boi_token_id
        if bool((ids[:, -1] == boi).all()):
            return ids, mask
        column = torch.full((ids.shape[0], 1), boi, dtype=ids.dtype, device=ids.device)
        return torch.cat([ids, column], dim=1), torch.cat([mask, torch.ones_like(column)], dim=1)

    @staticmethod
    def _left_pad_stack(parts, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(ids.shape[1] for ids, _ in parts)
        all_ids, all_masks = [], []
        for ids, mask in parts:
            extra = width - ids.shape[1]
            all_ids.append(nn.functional.pad(ids, (extra, 0), value=pad_token_id))
            all_masks.append(nn.functional.pad(mask, (extra, 0), value=0))
        return torch.cat(all_ids), torch.cat(all_masks)

    def _next_token_logits(self, ids, mask, positions, cache, use_cache: bool, code_positions=None) -> torch.Tensor:
        outputs = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=use_cache,
            code_positions=code_positions,
            return_dict=True,
        )
        return self.lm_head(outputs.last_hidden_state[:, -1, :]).float()

    @torch.no_grad()
    def _generate_image(
        self,
        inputs: Optional[torch.Tensor] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        unconditional_input_ids: Optional[torch.Tensor] = None,
        unconditional_attention_mask: Optional[torch.Tensor] = None,
        generation_config: Optional[GenerationConfig] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        use_cache: bool = True,
        image_span_constraint: bool = True,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ):
        """Text-to-image: prompt + `<boi>` -> exactly ĥ·ŵ·D code ids -> `<eoi>`.

        Classifier-free guidance: conditional and unconditional rows are left-padded into ONE batch
        of 2B rows sharing one KV cache, so each step is a single forward; the guided logits are
        u + s·(c − u) (s = `guidance_scale`; None or 1 disables guidance). Then the span constraint
        (only codebook ids), then temperature/top-k/top-p from the generation config.
        `image_span_constraint=False` exists only to measure its cost: the ids may then not decode.
        `generator` seeds the sampling (diffusers-style reproducibility). Length settings
        (`max_new_tokens`, `max_length`) do not apply: an image is always ĥ·ŵ·D ids.
        Returns the sequences (B, prompt + 1 + ĥ·ŵ·D + 1), or a `GenerateDecoderOnlyOutput` with
        `return_dict_in_generate=True` (`logits` = guided logits, `scores` = processed scores).
        """
        config = self.config
        config.require_vision("image generation")
        if config.boi_token_id is None or config.eoi_token_id is None:
            raise ValueError(
                "config.boi_token_id / eoi_token_id are None; set them (add_image_special_tokens returns them)"
            )
        for name in ("pixel_values", "image_codes", "inputs_embeds"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is not supported with generation_mode='image'; generate from a text prompt")
            kwargs.pop(name, None)
        generation_config, unused = self._prepare_generation_config(generation_config, **kwargs)
        unused = {k: v for k, v in unused.items() if v is not None and k not in ("use_cache",)}
        if unused:
            raise ValueError(f"unsupported arguments for generation_mode='image': {sorted(unused)}")
        if generation_config.num_beams not in (None, 1):
            raise ValueError("image generation samples or decodes greedily; set num_beams=1")
        if (generation_config.num_return_sequences or 1) != 1:
            raise ValueError(
                "num_return_sequences is not supported for images; repeat the caption in the batch instead"
            )
        scale = generation_config.guidance_scale
        check_guidance_scale(scale)
        guided = scale is not None and scale != 1

        ids = inputs if inputs is not None else input_ids
        if ids is None:
            raise ValueError(
                "image generation needs input_ids: a prompt, e.g. UniCodeProcessor(text=caption, "
                "generation_mode='image')"
            )
        ids, mask = self._append_boi(
            *self._check_prompt(
                "input_ids", ids.to(self.device), None if attention_mask is None else attention_mask.to(self.device)
            )
        )
        batch = ids.shape[0]
        pad = self._pad_token_id(generation_config)
        if guided:
            if unconditional_input_ids is None:
                raise ValueError(
                    f"guidance_scale={scale} needs unconditional_input_ids (the same prompt template with an empty "
                    "caption); UniCodeProcessor(text=..., generation_mode='image') returns them, or pass "
                    "guidance_scale=None"
                )
            u_mask = None if unconditional_attention_mask is None else unconditional_attention_mask.to(self.device)
            u_ids, u_mask = self._append_boi(
                *self._check_prompt("unconditional_input_ids", unconditional_input_ids.to(self.device), u_mask)
            )
            if u_ids.shape[0] == 1 and batch > 1:
                u_ids, u_mask = u_ids.expand(batch, -1), u_mask.expand(batch, -1)
            if u_ids.shape[0] != batch:
                raise ValueError(
                    f"unconditional_input_ids has {u_ids.shape[0]} rows for {batch} prompts; give one per prompt or "
                    "one for all"
                )
            rows, row_mask = self._left_pad_stack([(ids, mask), (u_ids, u_mask)], pad)
        else:
            rows, row_mask = ids, mask

        num_codes = config.image_tokens_per_generation
        max_positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        if max_positions is not None and rows.shape[1] + num_codes + 1 > max_positions:
            raise PromptTooLongError(
                f"the prompt ({rows.shape[1]} tokens with <boi>) plus the image ({num_codes} codes + <eoi>) needs "
                f"{rows.shape[1] + num_codes + 1} positions but text_config.max_position_embeddings={max_positions}; "
                "shorten the prompt or use a model with a longer context"
            )

        # The loop writes exactly num_codes ids after <boi> and closes the span itself, so the span
        # rule reduces to "codes only" and needs no per-step scan of the sequence.
        span = self.image_span_logits_processor() if image_span_constraint else None
        processors = LogitsProcessorList(logits_processor or [])
        sampling_config = copy.deepcopy(generation_config)
        sampling_config.guidance_scale = None  # guidance is applied here, batched
        processors = self._get_logits_processor(
            generation_config=sampling_config,
            input_ids_seq_length=ids.shape[1],
            encoder_input_ids=ids,
            logits_processor=processors,
            device=self.device,
        )

        return_dict = bool(generation_config.return_dict_in_generate)
        raw_logits, scores_out = [], []
        # Masks, positions and output written into preallocated buffers: no per-step concatenation.
        prompt_length, start = rows.shape[1], ids.shape[1]
        full_mask = torch.cat([row_mask, row_mask.new_ones(rows.shape[0], num_codes)], dim=1)
        positions = (row_mask.cumsum(-1) - 1).clamp_(min=0)
        steps = torch.arange(1, num_codes + 1, device=positions.device)
        full_positions = torch.cat([positions, positions[:, -1:] + steps], dim=1)
        sequences = ids.new_empty(batch, start + num_codes + 1)
        sequences[:, :start] = ids
        cache = DynamicCache(config=config.get_text_config()) if use_cache else None
        logits = self._next_token_logits(rows, row_mask, positions, cache, use_cache)
        for step in range(num_codes):
            step_logits = logits[:batch] if not guided else logits[batch:] + scale * (logits[:batch] - logits[batch:])
            scores = span.restrict_to_codes(step_logits) if span is not None else step_logits
            scores = processors(sequences[:, : start + step], scores)
            if generation_config.do_sample:
                next_tokens = torch.multinomial(
                    torch.softmax(scores, dim=-1), num_samples=1, generator=generator
                ).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            if return_dict:
                raw_logits.append(step_logits)
                scores_out.append(scores)
            sequences[:, start + step] = next_tokens
            if step == num_codes - 1:
                break
            column = next_tokens.repeat(2 if guided else 1).unsqueeze(1)
            length = prompt_length + step + 1
            if use_cache:
                logits = self._next_token_logits(
                    column,
                    full_mask[:, :length],
                    full_positions[:, length - 1 : length],
                    cache,
                    True,
                    code_positions=torch.full_like(column, step),  # the code just written is the image's step-th
                )
            else:
                rows = torch.cat([rows, column], dim=1)
                logits = self._next_token_logits(rows, full_mask[:, :length], full_positions[:, :length], None, False)
        sequences[:, -1] = config.eoi_token_id
        if return_dict:
            return GenerateDecoderOnlyOutput(
                sequences=sequences, scores=tuple(scores_out), logits=tuple(raw_logits), cache=cache
            )
        return sequences

    # -- assembly -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_parts(
        cls, llm: PreTrainedModel, tokenizer, vision_tokenizer: UniCodeVisualTokenizer, visual_input: str = "aggregate"
    ):
        """Assemble an MLLM from a causal LM, its tokenizer and a trained visual tokenizer.

        Adds `<image>`, `<boi>`, `<eoi>` to `tokenizer` (resizing `llm`'s embeddings if needed),
        checks that the visual tokenizer's codebook IS the LLM rows of its `codebook_token_ids` (stage
        I ends unified), and stores that codebook once, in the LLM's embedding table.
        """
        vq_config = vision_tokenizer.config
        if vq_config.codebook_token_ids is None or vision_tokenizer.codebook is None:
            raise ValueError(
                "vision_tokenizer must be a trained standalone tokenizer with store_codebook=True and "
                "codebook_token_ids set"
            )
        special = add_image_special_tokens(tokenizer)
        codes = set(vq_config.codebook_token_ids)
        for name, token_id in special.items():
            if token_id in codes:
                raise ValueError(
                    f"the tokenizer's {name}={token_id} is one of the visual codes; choose the codebook rows with "
                    "select_codebook_rows(..., tokenizer=tokenizer) after add_image_special_tokens"
                )
        if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = torch.tensor(vq_config.codebook_token_ids, device=llm.get_input_embeddings().weight.device)
        llm_rows = embedding_rows(llm.get_input_embeddings(), ids).detach()
        own = vision_tokenizer.codebook.detach().to(llm_rows.device, llm_rows.dtype)
        if own.shape != llm_rows.shape or not torch.equal(own, llm_rows):
            gap = (own - llm_rows).abs().max().item() if own.shape == llm_rows.shape else float("nan")
            raise ValueError(
                "the visual tokenizer's codebook differs from the LLM's embedding rows of its codebook_token_ids "
                "(max |diff| "
                f"{gap:.3g}); the codebook must be unified: finish stage I with the r=1 tail (ramp/constant), or for "
                "the "
                "dual paradigm use the LLM saved beside the tokenizer"
            )
        mllm_vq = copy.deepcopy(vq_config)
        mllm_vq.store_codebook = False
        text_config = copy.deepcopy(llm.config)
        text_config.vocab_size = llm.get_input_embeddings().weight.shape[0]
        config = UniCodeConfig(text_config=text_config, vq_config=mllm_vq, visual_input=visual_input, **special)
        model = cls(config).to(llm.dtype)
        model.model.language_model.load_state_dict(llm.base_model.state_dict())
        with torch.no_grad():
            model.lm_head.weight.copy_(llm.get_output_embeddings().weight)
        vq_state = {k: v for k, v in vision_tokenizer.state_dict().items() if k != "codebook"}
        model.model.vision_tokenizer.load_state_dict(vq_state)
        model.model.vision_tokenizer.to(vision_tokenizer.dtype)
        model.generation_config = (
            copy.deepcopy(llm.generation_config) if llm.generation_config is not None else GenerationConfig()
        )
        if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model.to(llm.device)


__all__ = [
    "UniCodePreTrainedModel",
    "UniCodeModel",
    "UniCodeForConditionalGeneration",
    "PromptTooLongError",
    "UniCodeImageSpanLogitsProcessor",
    "UniCodeModelOutputWithPast",
    "UniCodeCausalLMOutputWithPast",
    "UniCodeImageFeaturesOutput",
    "UniCodeAxialPositionEmbedding",
    "check_guidance_scale",
]
