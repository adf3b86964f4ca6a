"""Configurations of UniCode (arXiv 2403.09072) and the image special tokens.

The special tokens are defined here once; the text LM of stage 0, the processor and the MLLM all
read them from this module.
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The only place these strings are spelled. `<image>` marks where the processor expands an input
# image into placeholders; `<boi>`/`<eoi>` bracket a generated image's code ids.
IMAGE_TOKEN = "<image>"
BOI_TOKEN = "<boi>"
EOI_TOKEN = "<eoi>"
IMAGE_SPECIAL_TOKENS = {"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}


def add_image_special_tokens(tokenizer) -> dict[str, int]:
    """Add `<image>`, `<boi>`, `<eoi>` to `tokenizer` as named special tokens (idempotent).

    Named, so `tokenizer.image_token` / `tokenizer.image_token_id` work and survive
    `save_pretrained`; special, so they are never split and never chosen as visual codes.
    Returns `{"image_token_id": ..., "boi_token_id": ..., "eoi_token_id": ...}`. The caller resizes
    the LLM's embeddings to `len(tokenizer)` if the vocabulary grew.
    """
    missing = {name: token for name, token in IMAGE_SPECIAL_TOKENS.items() if getattr(tokenizer, name, None) != token}
    if missing:
        tokenizer._set_model_specific_special_tokens(missing)
        tokenizer.add_tokens(list(missing.values()), special_tokens=True)
    return {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_SPECIAL_TOKENS.items()}


QUANTIZERS = ("vq", "rq", "hq")
NORM_HANDLINGS = ("normalize", "none")
# How stage I learned the codebook (`quantization_unicode.UniCodeCodebookLearning`): configs saved before that moved
# out of the tokenizer's config carry these keys, which a loaded tokenizer ignores.
TRAINING_ONLY_KEYS = (
    "paradigm",
    "ema_decay",
    "ema_eps",
    "blend_schedule",
    "blend_lambda",
    "blend_tail_fraction",
    "dead_code_threshold",
    "dual_sync_interval",
    "dual_row_norm",
)
# What one latent vector of the encoder sees, and what one decodes: the whole image (VQGAN) or only its own patch.
RECEPTIVE_FIELDS = ("image", "patch")
VISUAL_INPUTS = ("aggregate", "flatten")
# How the position tables of `image_position_embeddings` / `code_position_embeddings` address a grid cell.
POSITION_EMBEDDING_LAYOUTS = ("index", "axial")
# What `generate` and the processor produce: text, or an image as <boi> + codes + <eoi>.
GENERATION_MODES = ("text", "image")

# HQ: one top code and the 2x2 block of bottom codes beneath it (arXiv 2403.09072; the UniCode repository's
# docs/paper.md, "Visual tokenizer", on why not the released code's 1x4 strips).
HQ_DEPTH = 5


class UniCodeVisualTokenizerConfig(PreTrainedConfig):
    r"""Configuration of [`UniCodeVisualTokenizer`]: a VQGAN-style encoder/decoder whose codebook is
    `codebook_size` rows of an LLM's input-embedding table.

    Args:
        image_size (`int`): square input resolution in pixels.
        in_channels (`int`): image channels (3 for RGB).
        base_channels (`int`): width of the first conv stage (`ch` in VQGAN).
        channel_multipliers (`list[int]`): width multiplier per stage; each stage but the last halves
            the resolution, so the latent grid is `image_size / 2 ** (len(channel_multipliers) - 1)`.
        num_res_blocks (`int`): residual blocks per stage.
        attention_resolutions (`list[int]`): feature-map sizes at which self-attention is used.
        z_channels (`int`): channels of the latent before the 1x1 projection to `code_dim`.
        dropout (`float`): dropout in residual blocks.
        quantizer (`str`): `"vq"` (one code per position), `"rq"` (`depth` residual levels with the
            shared codebook) or `"hq"` (a top grid at half the latent resolution plus a bottom grid
            on the residual; 5 codes per top position).
        depth (`int`): residual levels for `"rq"`; forced to 1 for `"vq"` and 5 for `"hq"`.
        codebook_size (`int`): K, the number of LLM vocabulary rows used as visual codes.
        code_dim (`int`): the code vector width, equal to the LLM's hidden size.
        codebook_token_ids (`list[int]`, *optional*): the K vocabulary ids whose embedding rows are
            the codebook, in code order. `None` until chosen (`select_codebook_rows`); encode/decode
            then return/accept code indices 0..K-1 in their place.
        codebook_selection (`dict`, *optional*): how the rows were chosen (rule, threshold), recorded
            for reproducibility.
        store_codebook (`bool`): whether this module owns a K x `code_dim` codebook parameter. A
            standalone tokenizer does; inside the MLLM it does not, and reads the LLM's rows.
        commitment_beta (`float`): weight of the commitment loss (0.25 in the released code).
        entropy_weight (`float`): weight of an assignment-entropy term on the level-0 search during
            training (0 disables, the paper's setting): the mean entropy of each feature's soft
            assignment minus the entropy of the batch's average assignment, so each feature picks one
            code and the batch spreads over many (MAGVIT-v2's entropy penalty, Yu et al. 2023). Raises
            codebook usage; costs reconstruction (docs/results.md, "Codebook usage").
        entropy_temperature (`float`): softmax temperature of those soft assignments, in units of each
            feature's spread of squared distances to the codes.
        norm_handling (`str`): `"normalize"` puts features and codebook on a common scale — each
            feature vector L2-normalised to length `code_norm`, the codebook multiplied by one
            scalar so its mean row norm is `code_norm` (rows keep their relative norms, as the LLM's
            tokens do). `"none"` compares raw vectors.
        code_norm (`float`, *optional*): the common length; `None` means sqrt(`code_dim`), i.e. unit
            RMS per channel for the decoder.
        level_scales (`bool`): fit one scalar per quantization level (RQ: each residual level;
            HQ: top and bottom) that multiplies the codebook rows at that level, as a running
            least-squares fit during training (saved with the tokenizer). LLM rows all have
            about the same norm, so without it a residual level can only add a full-length row to
            a residual much shorter than that; the scalars give the fixed codebook the multi-scale
            freedom a learned RQ codebook has, while every code stays one LLM row.
        codebook_projection (`bool`): search the rows through a learned linear map W·row + b
            (SimVQ), initialised to the identity and trained by the codebook loss; the codes stay
            the LLM's rows, the map is part of the tokenizer.
        encoder_receptive_field (`str`): `"image"` (VQGAN): 3x3 convolutions, GroupNorm over the whole feature map
            and the middle attention let every latent vector see the whole image, so a shape changes the codes of
            blank patches far from it. `"patch"`: the encoder runs on each latent cell's pixel patch alone (the
            same layers, the patches as a batch), so a blank patch always gets the same codes and a shape's codes
            sit in its own cells.
        encoder_patch_cells (`int`): with `encoder_receptive_field="patch"`, the side of each encoded patch in
            latent cells (1: one cell). 2 lets each code see the 2 x 2 block around it, e.g. a whole shape of the
            Shapes world's layout, so each of its codes can say which shape it is part of, while blank blocks
            still always get the same codes.
        decoder_receptive_field (`str`): `"image"` (VQGAN): each pixel is decoded from the codes around it, so the
            decoder can take a cell's colour from its neighbours and the encoder need not put it in every cell.
            `"patch"`: each latent cell's codes decode its own pixel patch (the convolutions stay inside the cell;
            only GroupNorm's statistics are the whole image's), so every cell's codes must carry what its pixels
            show.
    """

    model_type = "unicode_vq"

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        z_channels: int = 64,
        dropout: float = 0.0,
        quantizer: str = "rq",
        depth: int = 2,
        codebook_size: int = 1024,
        code_dim: int = 256,
        codebook_token_ids: Optional[Sequence[int]] = None,
        codebook_selection: Optional[dict] = None,
        store_codebook: bool = True,
        commitment_beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.1,
        norm_handling: str = "normalize",
        code_norm: Optional[float] = None,
        level_scales: bool = False,
        codebook_projection: bool = False,
        encoder_receptive_field: str = "image",
        encoder_patch_cells: int = 1,
        decoder_receptive_field: str = "image",
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.base_channels = int(base_channels)
        self.channel_multipliers = [int(m) for m in channel_multipliers]
        self.num_res_blocks = int(num_res_blocks)
        self.attention_resolutions = [int(r) for r in attention_resolutions]
        self.z_channels = int(z_channels)
        self.dropout = float(dropout)
        self.quantizer = quantizer
        self.depth = {"vq": 1, "hq": HQ_DEPTH}.get(quantizer, depth)
        self.codebook_size = int(codebook_size)
        self.code_dim = int(code_dim)
        self.codebook_token_ids = None if codebook_token_ids is None else [int(i) for i in codebook_token_ids]
        self.codebook_selection = codebook_selection
        self.store_codebook = bool(store_codebook)
        self.commitment_beta = float(commitment_beta)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.norm_handling = norm_handling
        self.code_norm = None if code_norm is None else float(code_norm)
        self.level_scales = bool(level_scales)
        self.codebook_projection = bool(codebook_projection)
        self.encoder_receptive_field = encoder_receptive_field
        self.encoder_patch_cells = int(encoder_patch_cells)
        self.decoder_receptive_field = decoder_receptive_field
        self.initializer_range = float(initializer_range)
        # Folders saved before these moved to stage I's arguments still load; the keys say nothing about the tokenizer.
        ignored = sorted(key for key in TRAINING_ONLY_KEYS if kwargs.pop(key, None) is not None)
        if ignored:
            logger.info(
                f"ignoring {ignored}: how stage I learned the codebook is not part of the tokenizer's config "
                "(to train with them, pass them to StageIArguments)"
            )
        super().__init__(**kwargs)
        self.validate_fields()

    # -- derived geometry -------------------------------------------------------------------
    @property
    def downsampling_factor(self) -> int:
        """Pixels per code-grid cell (HQ's top grid is half the latent grid)."""
        latent = 2 ** (len(self.channel_multipliers) - 1)
        return latent * 2 if self.quantizer == "hq" else latent

    @property
    def latent_grid_size(self) -> int:
        """Side of the encoder's feature grid (HQ: its bottom grid)."""
        return self.image_size // 2 ** (len(self.channel_multipliers) - 1)

    @property
    def code_grid_size(self) -> int:
        """ĥ = ŵ: side of the code map (B, ĥ, ŵ, D)."""
        return self.image_size // self.downsampling_factor

    @property
    def tokens_per_image(self) -> int:
        """ĥ·ŵ·D: length of an image's flattened code sequence."""
        return self.code_grid_size**2 * self.depth

    @property
    def num_levels(self) -> int:
        """Quantization levels, each searched on its own: RQ's residual levels, HQ's top and bottom."""
        return {"vq": 1, "rq": int(self.depth), "hq": 2}[self.quantizer]

    @property
    def effective_code_norm(self) -> float:
        return self.code_norm if self.code_norm is not None else float(self.code_dim) ** 0.5

    def validate_fields(self) -> None:
        """Raise a `ValueError` naming the field and the fix for any inconsistent setting."""

        def choice(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; use one of {list(allowed)}")

        choice("quantizer", self.quantizer, QUANTIZERS)
        choice("norm_handling", self.norm_handling, NORM_HANDLINGS)
        choice("encoder_receptive_field", self.encoder_receptive_field, RECEPTIVE_FIELDS)
        choice("decoder_receptive_field", self.decoder_receptive_field, RECEPTIVE_FIELDS)
        if self.encoder_patch_cells != 1 and self.encoder_receptive_field != "patch":
            raise ValueError(
                f"encoder_patch_cells={self.encoder_patch_cells} sizes the encoder's patches; set "
                "encoder_receptive_field='patch' too, or leave encoder_patch_cells at 1"
            )
        if self.encoder_patch_cells < 1 or self.latent_grid_size % self.encoder_patch_cells:
            raise ValueError(
                f"encoder_patch_cells={self.encoder_patch_cells} must be a positive divisor of the latent grid's side "
                f"({self.latent_grid_size} for image_size={self.image_size})"
            )
        if self.quantizer == "rq" and int(self.depth) < 1:
            raise ValueError(f"depth={self.depth} must be >= 1 for quantizer='rq' (the number of residual levels)")
        if not self.channel_multipliers:
            raise ValueError("channel_multipliers must list at least one stage, e.g. [1, 2, 2, 4]")
        for name in ("image_size", "in_channels", "base_channels", "z_channels", "codebook_size", "code_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.image_size % self.downsampling_factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the downsampling factor "
                f"{self.downsampling_factor} of channel_multipliers={self.channel_multipliers} with "
                f"quantizer={self.quantizer!r}; use a multiple of {self.downsampling_factor} or fewer stages"
            )
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight={self.entropy_weight} must be >= 0 (0 disables the entropy term)")
        if self.entropy_temperature <= 0:
            raise ValueError(
                f"entropy_temperature={self.entropy_temperature} must be > 0 (0.1 is the measured setting)"
            )
        if self.code_norm is not None and self.code_norm <= 0:
            raise ValueError(f"code_norm={self.code_norm} must be positive, or None for sqrt(code_dim)")
        ids = self.codebook_token_ids
        if ids is not None:
            if len(ids) != self.codebook_size:
                raise ValueError(
                    f"codebook_token_ids has {len(ids)} ids but codebook_size={self.codebook_size}; "
                    "give exactly one vocabulary id per code"
                )
            if len(set(ids)) != len(ids):
                raise ValueError("codebook_token_ids contains repeated ids; each code needs its own vocabulary row")
            if min(ids) < 0:
                raise ValueError("codebook_token_ids contains negative ids; vocabulary ids start at 0")


def check_adapter_size(size) -> None:
    """Refuse an `image_input_adapter_size` that is not a whole number >= 0."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(
            f"image_input_adapter_size={size!r} must be a whole number >= 0: the adapter's hidden width, or 0 for none"
        )


def check_visual_input(visual_input, argument: str = "visual_input") -> str:
    """`visual_input` if it is one of `VISUAL_INPUTS` (how an input image enters the LLM), else an error naming
    `argument`: the one check for the config, the presets and the demo."""
    if visual_input not in VISUAL_INPUTS:
        raise ValueError(f"{argument}={visual_input!r} is not one of {list(VISUAL_INPUTS)}")
    return visual_input


def image_placeholder_count(vq_config: UniCodeVisualTokenizerConfig, visual_input: str = "aggregate") -> int:
    """How many placeholder tokens one input image occupies in the LLM sequence.

    `flatten`: every code, ĥ·ŵ·D. `aggregate` (the paper's compressed input): one vector per position
    for VQ and RQ (ĥ·ŵ); for HQ one per bottom-grid position (4·ĥ·ŵ), since summing a top code with
    its four bottom codes would lose which bottom code sits where. The processor and the model both
    ask this function, so they cannot disagree.
    """
    if check_visual_input(visual_input) == "flatten":
        return vq_config.tokens_per_image
    positions = vq_config.code_grid_size**2
    return 4 * positions if vq_config.quantizer == "hq" else positions


class UniCodeConfig(PreTrainedConfig):
    r"""Configuration of the UniCode MLLM ([`UniCodeModel`], [`UniCodeForConditionalGeneration`]).

    Args:
        text_config (`PreTrainedConfig` or `dict`, *optional*): any decoder-only causal-LM config
            (Llama by default). Its input-embedding table holds the unified codebook.
        vq_config (`UniCodeVisualTokenizerConfig` or `dict`, *optional*): the visual tokenizer. Inside
            the MLLM it has `store_codebook=False` and `codebook_token_ids` set: the codebook is read
            from the LLM's embedding rows, so the checkpoint stores it once. `None` gives a text-only
            model that rejects image input and image generation with a clear error.
        visual_input (`str`): how an input image enters the LLM — `"aggregate"` (the paper's compressed
            form, see `image_placeholder_count`) or `"flatten"` (the embeddings of all ĥ·ŵ·D codes).
        image_token_id, boi_token_id, eoi_token_id (`int`, *optional*): vocabulary ids of `<image>`
            (the placeholder), `<boi>` and `<eoi>` (which bracket a generated image's code ids).
        tie_word_embeddings (`bool`, *optional*): defaults to the text config's value; transformers v5
            ties the LM head to the input embeddings only when the top-level config says so.
        image_position_embeddings (`bool`): add a learned embedding per placeholder position to an input image's
            code embeddings (as a ViT adds one per patch), so the LLM knows which grid cell each placeholder is
            without counting positions from the text around it. The codes stay the LLM's own rows; only
            this table (one row per placeholder) is new. Off in the paper's model.
        code_position_embeddings (`bool`): the same for images WRITTEN as code ids: a learned embedding per index
            of the flattened code sequence (position and level) is added to each code token's input row, so the
            LLM drawing an image knows which cell the next code fills without counting tokens since `<boi>`.
            The index counts the code ids of the row since its last `<boi>` (or its start), so a partial image
            continued in a later turn keeps counting. Off in the paper's model.
        position_embedding_layout (`str`): how those two tables address a cell. `"index"`: one row per placeholder
            or code index. `"axial"`: the sum of a grid-row, a grid-column and a level row (axial position
            embeddings, Ho et al. 2019, "Axial Attention in Multidimensional Transformers", §3), so every cell of
            a grid row shares its row vector and a caption's "top" or "left" binds to one vector learnt from all
            the cells it covers.
        image_input_adapter_size (`int`): 0 (the paper's model) or the hidden width of a residual MLP that each
            input-image placeholder's features (its codes' rows, plus its position row when there is a position
            table) pass through before the LLM reads them ([`UniCodeImageInputAdapter`], which says why). The
            codes, their ids and the codebook rows are unchanged. Off in `tiny`, where it read worse
            (docs/results.md, "The edge term on four more stage-I draws, and an input adapter").
    """

    model_type = "unicode"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vq_config": SubConfigSpec(config_class=UniCodeVisualTokenizerConfig, optional=True),
    }

    def __init__(
        self,
        text_config=None,
        vq_config=None,
        visual_input: str = "aggregate",
        image_token_id: Optional[int] = None,
        boi_token_id: Optional[int] = None,
        eoi_token_id: Optional[int] = None,
        tie_word_embeddings: Optional[bool] = None,
        image_position_embeddings: bool = False,
        code_position_embeddings: bool = False,
        position_embedding_layout: str = "index",
        image_input_adapter_size: int = 0,
        **kwargs,
    ):
        self.text_config = self._text_config_from(text_config)
        self.vq_config = self._vq_config_from(vq_config)
        self.visual_input = visual_input
        self.image_token_id = None if image_token_id is None else int(image_token_id)
        self.boi_token_id = None if boi_token_id is None else int(boi_token_id)
        self.eoi_token_id = None if eoi_token_id is None else int(eoi_token_id)
        if tie_word_embeddings is None:
            tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.image_position_embeddings = bool(image_position_embeddings)
        self.code_position_embeddings = bool(code_position_embeddings)
        self.position_embedding_layout = position_embedding_layout
        self.image_input_adapter_size = image_input_adapter_size
        super().__init__(**kwargs)
        self.validate_fields()

    @staticmethod
    def _text_config_from(text_config) -> PreTrainedConfig:
        if isinstance(text_config, PreTrainedConfig):
            return text_config
        if text_config is None:
            return AutoConfig.for_model("llama")
        if isinstance(text_config, dict):
            values = dict(text_config)
            return AutoConfig.for_model(values.pop("model_type", "llama"), **values)
        raise TypeError(f"text_config must be a PreTrainedConfig, a dict or None, got {type(text_config).__name__}")

    @staticmethod
    def _vq_config_from(vq_config) -> Optional[UniCodeVisualTokenizerConfig]:
        if vq_config is None or isinstance(vq_config, UniCodeVisualTokenizerConfig):
            return vq_config
        if isinstance(vq_config, dict):
            values = {k: v for k, v in vq_config.items() if k != "model_type"}
            return UniCodeVisualTokenizerConfig(**values)
        raise TypeError(
            f"vq_config must be a UniCodeVisualTokenizerConfig, a dict or None, got {type(vq_config).__name__}"
        )

    # -- what the processor and the model share ------------------------------------------------
    @property
    def image_seq_length(self) -> int:
        """Placeholders per input image (see `image_placeholder_count`)."""
        self.require_vision("image input")
        return image_placeholder_count(self.vq_config, self.visual_input)

    @property
    def image_tokens_per_generation(self) -> int:
        """ĥ·ŵ·D: code ids between `<boi>` and `<eoi>` in a generated image."""
        self.require_vision("image generation")
        return self.vq_config.tokens_per_image

    def require_vision(self, what: str) -> None:
        if self.vq_config is None:
            raise ValueError(
                f"{what} needs a visual tokenizer, but this UniCode config has vq_config=None (a text-only model); "
                "build the model with UniCodeForConditionalGeneration.from_pretrained_parts(llm, tokenizer, "
                "vision_tokenizer)"
            )

    def validate_fields(self) -> None:
        check_visual_input(self.visual_input)
        if self.position_embedding_layout not in POSITION_EMBEDDING_LAYOUTS:
            raise ValueError(
                f"position_embedding_layout={self.position_embedding_layout!r} is not supported; use one of "
                f"{list(POSITION_EMBEDDING_LAYOUTS)}"
            )
        check_adapter_size(self.image_input_adapter_size)
        vq, text = self.vq_config, self.text_config
        if vq is None:
            return
        hidden = getattr(text, "hidden_size", None)
        if hidden is not None and vq.code_dim != hidden:
            raise ValueError(
                f"vq_config.code_dim={vq.code_dim} differs from text_config.hidden_size={hidden}; the codebook is "
                "rows "
                "of the LLM's embedding table, so set code_dim to the LLM's hidden size"
            )
        if vq.codebook_token_ids is None:
            raise ValueError(
                "vq_config.codebook_token_ids is None; an MLLM needs to know which vocabulary rows are visual codes "
                "(choose them with select_codebook_rows, or assemble with from_pretrained_parts)"
            )
        if vq.store_codebook:
            raise ValueError(
                "vq_config.store_codebook=True inside an MLLM would store the codebook twice; set "
                "store_codebook=False "
                "(the MLLM reads the LLM's embedding rows of codebook_token_ids)"
            )
        vocab = getattr(text, "vocab_size", None)
        if vocab is not None and max(vq.codebook_token_ids) >= vocab:
            raise ValueError(
                f"vq_config.codebook_token_ids reaches id {max(vq.codebook_token_ids)} but "
                f"text_config.vocab_size={vocab}; "
                "the codebook must be rows of the LLM's embedding table"
            )
        codes = set(vq.codebook_token_ids)
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            value = getattr(self, name)
            if value is not None and value in codes:
                raise ValueError(
                    f"{name}={value} is also a visual code in vq_config.codebook_token_ids; special tokens must never "
                    "be "
                    "codes (select the codebook rows after adding the image special tokens)"
                )


__all__ = [
    "UniCodeVisualTokenizerConfig",
    "UniCodeConfig",
    "image_placeholder_count",
    "check_visual_input",
    "VISUAL_INPUTS",
    "IMAGE_TOKEN",
    "BOI_TOKEN",
    "EOI_TOKEN",
    "IMAGE_SPECIAL_TOKENS",
    "add_image_special_tokens",
]
