"""UniCode visual tokenizer: a VQGAN-style conv autoencoder whose codes are LLM vocabulary ids.

Architecture after the VQGAN / RQ-VAE lineage the paper builds on (arXiv 2403.09072 and its released
code; the UniCode repository's docs/paper.md, "Visual tokenizer"):
GroupNorm + SiLU residual blocks, self-attention at chosen resolutions, a 1x1 projection into the
LLM's embedding width where the unified codebook lives, and the mirror image back to pixels.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_unicode import UniCodeVisualTokenizerConfig
from .quantization_unicode import (
    UniCodeQuantizer,
    code_indices_to_token_ids,
    token_ids_to_code_indices,
    usage_statistics,
)

# Slack around [-1, 1] for pixels that went through a lower precision or a resampling filter's overshoot; a 0..255
# image is far outside it.
PIXEL_RANGE_TOLERANCE = 0.02


def split_into_cells(maps: torch.Tensor, cells_per_side: Optional[int]) -> torch.Tensor:
    """(B, C, S, S) -> (B·n·n, C, S/n, S/n): one row per latent cell's patch, in raster order (`receptive_field
    "patch"`); identity when `cells_per_side` is None."""
    if cells_per_side is None:
        return maps
    b, c, size = maps.shape[:3]
    n, p = cells_per_side, size // cells_per_side
    return maps.reshape(b, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(b * n * n, c, p, p)


def join_cells(patches: torch.Tensor, cells_per_side: Optional[int]) -> torch.Tensor:
    """Inverse of `split_into_cells`: (B·n·n, C, h, w) -> (B, C, n·h, n·w)."""
    if cells_per_side is None:
        return patches
    n = cells_per_side
    bn, c, h, w = patches.shape
    image = patches.reshape(bn // (n * n), n, n, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, n * h, n * w)
    # With 1x1 cells the reshape is a channels-last view; convolutions after it would then run channels-last, where
    # GroupNorm's CPU backward is many times slower.
    return image.contiguous()


class UniCodeVQConv2d(nn.Conv2d):
    """`nn.Conv2d` that computes a zero-padded, stride-1 convolution of a 1 x 1 map as the matrix product it is.

    The patch-local encoder (`encoder_receptive_field="patch"`) runs every latent cell as an image of its own, so its
    last stage and middle block see 1 x 1 maps, where a "same"-padded k x k kernel meets its input only through its
    centre tap. oneDNN still runs a whole convolution there, several times slower than the product, and those maps
    were a large share of the encoder's step (docs/results.md, "The 1 x 1 maps of the patch encoder"). Same
    parameters and outputs as `nn.Conv2d`; every other input goes through it unchanged."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        height, width = self.kernel_size
        if (
            hidden.shape[-2:] == (1, 1)
            and height % 2 == 1
            and width % 2 == 1
            and self.padding == (height // 2, width // 2)
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
        ):
            centre = self.weight[:, :, height // 2, width // 2]
            return F.linear(hidden.flatten(1), centre, self.bias)[:, :, None, None]
        return super().forward(hidden)


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in VQGAN, fewer for narrow tiny models so every group has channels.
    return nn.GroupNorm(num_groups=math.gcd(32, channels), num_channels=channels, eps=1e-6, affine=True)


class UniCodeVQCellGroupNorm(nn.GroupNorm):
    """GroupNorm over cells that run as a batch (`split_into_cells`), with the statistics of the whole image.

    A cell decoded alone from a 1x1 latent would otherwise normalise each group over a handful of numbers, which
    erases most of what the codes say; sharing the image's statistics keeps the norm as in VQGAN while every
    convolution stays inside its cell."""

    def __init__(self, norm: nn.GroupNorm, cells_per_side: int):
        super().__init__(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
        self.cells = cells_per_side**2

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bn, c, h, w = hidden.shape
        b = bn // self.cells
        image = hidden.reshape(b, self.cells, c, h, w).transpose(1, 2).reshape(b, c, self.cells * h, w)
        return super().forward(image).reshape(b, c, self.cells, h, w).transpose(1, 2).reshape(bn, c, h, w)


def _share_norm_statistics_across_cells(module: nn.Module, cells_per_side: int) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, UniCodeVQCellGroupNorm(child, cells_per_side))
        else:
            _share_norm_statistics_across_cells(child, cells_per_side)


class UniCodeVQResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = UniCodeVQConv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = UniCodeVQConv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = UniCodeVQConv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(F.silu(self.norm1(hidden)))
        residual = self.conv2(self.dropout(F.silu(self.norm2(residual))))
        return self.shortcut(hidden) + residual


class UniCodeVQAttnBlock(nn.Module):
    """Single-head spatial self-attention (VQGAN), via SDPA."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = UniCodeVQConv2d(channels, 3 * channels, 1)
        self.proj_out = UniCodeVQConv2d(channels, channels, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, c, h, w = hidden.shape
        q, k, v = self.qkv(self.norm(hidden)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        # The transposed view is channels-last in memory; a 1x1 conv over it makes a channels-last weight gradient,
        # which DDP must copy into its contiguous bucket every step ("Grad strides do not match bucket view strides").
        return hidden + self.proj_out(attended.transpose(-1, -2).reshape(b, c, h, w).contiguous())


class UniCodeVQDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = UniCodeVQConv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Pad right/bottom only, so the stride-2 conv halves even sizes exactly (VQGAN).
        return self.conv(F.pad(hidden, (0, 1, 0, 1)))


class UniCodeVQUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = UniCodeVQConv2d(channels, channels, 3, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden, scale_factor=2.0, mode="nearest"))


class UniCodeVQStage(nn.Module):
    """Residual blocks (+ attention) at one resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for i in range(num_blocks):
            self.blocks.append(UniCodeVQResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout))
            if attention:
                self.attentions.append(UniCodeVQAttnBlock(out_channels))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            hidden = block(hidden)
            if len(self.attentions):
                hidden = self.attentions[i](hidden)
        return hidden


class UniCodeVQMiddle(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = UniCodeVQResnetBlock(channels, channels, dropout)
        self.attn = UniCodeVQAttnBlock(channels)
        self.block_2 = UniCodeVQResnetBlock(channels, channels, dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn(self.block_1(hidden)))


class UniCodeVQEncoder(nn.Module):
    def __init__(self, config: UniCodeVisualTokenizerConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = UniCodeVQConv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        resolution, channels = config.image_size, config.base_channels
        for level, width in enumerate(widths):
            attention = resolution in config.attention_resolutions
            self.stages.append(UniCodeVQStage(channels, width, config.num_res_blocks, attention, config.dropout))
            channels = width
            if level < len(widths) - 1:
                self.downsamples.append(UniCodeVQDownsample(channels))
                resolution //= 2
        self.middle = UniCodeVQMiddle(channels, config.dropout)
        self.norm_out = _group_norm(channels)
        self.conv_out = UniCodeVQConv2d(channels, config.z_channels, 3, padding=1)
        # `encoder_receptive_field="patch"`: the patches per side, each encoded from its own pixels.
        patches = config.latent_grid_size // config.encoder_patch_cells
        self.cells_per_side = patches if config.encoder_receptive_field == "patch" else None

    @property
    def feature_levels(self) -> list[nn.Module]:
        """The modules whose outputs are the encoder's hidden states: the stem, each stage at its resolution, and the
        middle block."""
        return [self.conv_in, *self.stages, self.middle]

    @contextmanager
    def recording_feature_maps(self, enabled: bool = True):
        """Yields a list that fills with each feature level's output while the encoder runs inside the block (the
        `hidden_states` of `UniCodeVisualTokenizer.forward` and `UniCodeModel.get_image_features`); empty if not
        `enabled`. Hooks, so the encoder's own forward stays one plain path for training."""
        feature_maps = []
        hooks = (
            [
                level.register_forward_hook(
                    lambda module, args, output: feature_maps.append(join_cells(output, self.cells_per_side))
                )
                for level in self.feature_levels
            ]
            if enabled
            else []
        )
        try:
            yield feature_maps
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(split_into_cells(pixel_values, self.cells_per_side))
        for level, stage in enumerate(self.stages):
            hidden = stage(hidden)
            if level < len(self.downsamples):
                hidden = self.downsamples[level](hidden)
        hidden = self.middle(hidden)
        return join_cells(self.conv_out(F.silu(self.norm_out(hidden))), self.cells_per_side)


class UniCodeVQDecoder(nn.Module):
    def __init__(self, config: UniCodeVisualTokenizerConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        channels = widths[-1]
        resolution = config.latent_grid_size
        self.conv_in = UniCodeVQConv2d(config.z_channels, channels, 3, padding=1)
        self.middle = UniCodeVQMiddle(channels, config.dropout)
        self.stages = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        # The decoder runs one more block per stage than the encoder, as in VQGAN.
        for level, width in enumerate(reversed(widths)):
            attention = resolution in config.attention_resolutions
            self.stages.append(UniCodeVQStage(channels, width, config.num_res_blocks + 1, attention, config.dropout))
            channels = width
            if level < len(widths) - 1:
                self.upsamples.append(UniCodeVQUpsample(channels))
                resolution *= 2
        self.norm_out = _group_norm(channels)
        self.conv_out = UniCodeVQConv2d(channels, config.in_channels, 3, padding=1)
        # `decoder_receptive_field="patch"`: each latent cell decodes its own pixels alone.
        self.cells_per_side = config.latent_grid_size if config.decoder_receptive_field == "patch" else None
        if self.cells_per_side is not None:
            _share_norm_statistics_across_cells(self, self.cells_per_side)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        hidden = self.middle(self.conv_in(split_into_cells(latent, self.cells_per_side)))
        for level, stage in enumerate(self.stages):
            hidden = stage(hidden)
            if level < len(self.upsamples):
                hidden = self.upsamples[level](hidden)
        return join_cells(self.conv_out(F.silu(self.norm_out(hidden))), self.cells_per_side)


@dataclass
class UniCodeVisualTokenizerOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`): reconstruction MSE + commitment loss.
    reconstruction (`torch.FloatTensor` of shape `(batch, channels, size, size)`): decoded pixels in [-1, 1] scale.
    codes (`torch.LongTensor` of shape `(batch, ĥ, ŵ, D)`): the code map, as vocabulary ids.
    reconstruction_loss, commitment_loss (`torch.FloatTensor`): the two terms of `loss`.
    code_counts (`torch.FloatTensor` of shape `(K,)`), code_sums (`(K, H)`): EMA statistics of this batch.
    code_features (`torch.FloatTensor` of shape `(N·levels, H)`): every level's inputs in codebook units (dead-code
    restarts).
    level_fit (`torch.FloatTensor` of shape `(levels, 2)`): terms of each level's least-squares row scale
    (`level_scales`).
    codebook_usage (`float`): fraction of the K codes used by this batch; perplexity (`float`) of its codes.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states`, the encoder's feature map
        at each level (`UniCodeVQEncoder.feature_levels`), each `(batch, channels, height, width)`.
    decoder_latents (`torch.FloatTensor` of shape `(batch, z_channels, ĥ, ŵ)`): the quantized latent map the decoder
        read (HQ: on the bottom grid); stage I's cell-colour term reads each cell's vector from it.
    """

    loss: Optional[torch.FloatTensor] = None
    reconstruction: Optional[torch.FloatTensor] = None
    codes: Optional[torch.LongTensor] = None
    reconstruction_loss: Optional[torch.FloatTensor] = None
    commitment_loss: Optional[torch.FloatTensor] = None
    code_counts: Optional[torch.FloatTensor] = None
    code_sums: Optional[torch.FloatTensor] = None
    code_features: Optional[torch.FloatTensor] = None
    level_fit: Optional[torch.FloatTensor] = None
    codebook_usage: Optional[float] = None
    perplexity: Optional[float] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    decoder_latents: Optional[torch.FloatTensor] = None


class UniCodePreTrainedVisualTokenizer(PreTrainedModel):
    config_class = UniCodeVisualTokenizerConfig
    base_model_prefix = "vision_tokenizer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["UniCodeVQResnetBlock", "UniCodeVQAttnBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            # PyTorch's default (Kaiming-uniform, a=sqrt(5)), which VQGAN trains from; the generic
            # normal(0.02) leaves deep conv stacks with vanishing activations.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, UniCodeVisualTokenizer):
            if module.codebook is not None:
                init.normal_(module.codebook, mean=0.0, std=self.config.initializer_range)
            # Non-persistent: rebuilt from the config, also after a meta-device load.
            if module.codebook_token_ids is not None:
                init.copy_(module.codebook_token_ids, torch.tensor(self.config.codebook_token_ids, dtype=torch.long))


class UniCodeVisualTokenizer(UniCodePreTrainedVisualTokenizer):
    """Image <-> code map of LLM vocabulary ids.

    `encode(pixel_values) -> codes (B, ĥ, ŵ, D)`, `decode(codes) -> pixel_values`. Pixels are
    float tensors in [-1, 1] of shape (B, in_channels, image_size, image_size) — what
    `UniCodeImageProcessor` produces. Every method takes an optional `codebook` (K, code_dim);
    without it the module's own `codebook` parameter is used (standalone checkpoints), with it
    the caller's rows (the MLLM passes its LLM's embeddings of `codebook_token_ids`).
    """

    def __init__(self, config: UniCodeVisualTokenizerConfig):
        super().__init__(config)
        self.encoder = UniCodeVQEncoder(config)
        self.quant_proj = UniCodeVQConv2d(config.z_channels, config.code_dim, 1)
        self.quantizer = UniCodeQuantizer(config)
        self.post_quant_proj = UniCodeVQConv2d(config.code_dim, config.z_channels, 1)
        self.decoder = UniCodeVQDecoder(config)
        if config.store_codebook:
            # Learned only by the paradigm's update rule (EMA / copies), never by gradients.
            self.codebook = nn.Parameter(torch.empty(config.codebook_size, config.code_dim), requires_grad=False)
        else:
            self.codebook = None
        ids = config.codebook_token_ids
        self.register_buffer(
            "codebook_token_ids", None if ids is None else torch.tensor(ids, dtype=torch.long), persistent=False
        )
        self.post_init()

    # -- validation -----------------------------------------------------------------------------
    def _resolve_codebook(self, codebook: Optional[torch.Tensor]) -> torch.Tensor:
        if codebook is None:
            if self.codebook is None:
                raise ValueError(
                    "this visual tokenizer stores no codebook (store_codebook=False: it lives in the MLLM); "
                    "pass codebook=<the LLM's embeddings of codebook_token_ids>"
                )
            return self.codebook
        expected = (self.config.codebook_size, self.config.code_dim)
        if tuple(codebook.shape) != expected:
            raise ValueError(
                f"codebook must have shape (codebook_size, code_dim) = {expected}, got {tuple(codebook.shape)}"
            )
        return codebook

    def check_pixel_values(self, pixel_values) -> None:
        """Raise a clear error for anything that is not a batch of images this tokenizer was built for."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; "
                "use UniCodeImageProcessor to turn PIL images into tensors"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a float tensor scaled to [-1, 1], got dtype {pixel_values.dtype}; "
                "convert uint8 images with pixel_values.float() / 127.5 - 1"
            )
        size, channels = self.config.image_size, self.config.in_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, {size}, {size}), got {tuple(pixel_values.shape)}"
                + ("; convert images to RGB first" if pixel_values.dim() == 4 and channels == 3 else "")
            )
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[2:])} pixels but this tokenizer's image_size is {size}; "
                f"resize to {size}x{size} (UniCodeImageProcessor does) — training and test resolution must match"
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contain NaN or inf; check the image decoding and normalisation")
        low, high = float(pixel_values.min()), float(pixel_values.max())
        if low < -1 - PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
            raise ValueError(
                f"pixel_values span [{low:.3g}, {high:.3g}] but must lie in [-1, 1]; scale 0..255 images with "
                "pixel_values / 127.5 - 1 (UniCodeImageProcessor does it)"
            )

    def check_codes(self, codes) -> torch.Tensor:
        """Validate a code map of vocabulary ids and return it as code indices 0..K-1."""
        if (
            not isinstance(codes, torch.Tensor)
            or codes.is_floating_point()
            or codes.is_complex()
            or codes.dtype == torch.bool
        ):
            raise TypeError(
                f"codes must be an integer torch.Tensor of vocabulary ids, got "
                f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}"
            )
        grid, depth = self.config.code_grid_size, self.config.depth
        if codes.dim() != 4 or tuple(codes.shape[1:]) != (grid, grid, depth):
            raise ValueError(
                f"codes must have shape (batch, {grid}, {grid}, {depth}), got {tuple(codes.shape)}; "
                "use unflatten_code_map for a flat sequence of ids"
            )
        indices = token_ids_to_code_indices(codes.long(), self.codebook_token_ids, argument="codes")
        if self.codebook_token_ids is None and bool(((indices < 0) | (indices >= self.config.codebook_size)).any()):
            raise ValueError(
                f"codes must be code indices in [0, {self.config.codebook_size}) (no codebook_token_ids set)"
            )
        return indices

    # -- the three entry points -----------------------------------------------------------------
    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> continuous features in the codebook's width, before quantization."""
        self.check_pixel_values(pixel_values)
        # The image processor gives float32; a tokenizer loaded in bfloat16 / float16 takes them as transformers'
        # vision models do, in its own precision.
        return self.quant_proj(self.encoder(pixel_values.to(self.dtype)))

    def decoder_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized vectors (B, H, ĥ, ŵ) -> the latent map the decoder reads (B, z_channels, ĥ, ŵ)."""
        # The quantizer works in float32 (distances, the straight-through sum); the decoder runs in the weights' dtype.
        return self.post_quant_proj(quantized.to(self.dtype))

    def decode_features(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decoder_latents(quantized))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, codebook: Optional[torch.Tensor] = None) -> torch.LongTensor:
        """Pixels (B, C, S, S) in [-1, 1] -> code map (B, ĥ, ŵ, D) of vocabulary ids."""
        codebook = self._resolve_codebook(codebook)
        out = self.quantizer(self.encode_features(pixel_values), codebook)
        return code_indices_to_token_ids(out.indices, self.codebook_token_ids)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, codebook: Optional[torch.Tensor] = None) -> torch.FloatTensor:
        """Code map (B, ĥ, ŵ, D) of vocabulary ids -> pixels (B, C, S, S), roughly in [-1, 1]."""
        codebook = self._resolve_codebook(codebook)
        indices = self.check_codes(codes).to(codebook.device)
        return self.decode_features(self.quantizer.lookup(indices, codebook))

    def forward(
        self,
        pixel_values: torch.Tensor,
        codebook: Optional[torch.Tensor] = None,
        return_statistics: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
    ):
        codebook = self._resolve_codebook(codebook)
        return_statistics = self.training if return_statistics is None else return_statistics
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        with self.encoder.recording_feature_maps(enabled=output_hidden_states) as feature_maps:
            features = self.encode_features(pixel_values)
        quantized = self.quantizer(features, codebook, return_statistics=return_statistics)
        latents = self.decoder_latents(quantized.quantized)
        reconstruction = self.decoder(latents)
        reconstruction_loss = F.mse_loss(reconstruction.float(), pixel_values.float())
        loss = reconstruction_loss + quantized.commitment_loss
        usage = perplexity = None
        if quantized.code_counts is not None:
            usage, perplexity = usage_statistics(quantized.code_counts)
        output = UniCodeVisualTokenizerOutput(
            loss=loss,
            reconstruction=reconstruction,
            codes=code_indices_to_token_ids(quantized.indices, self.codebook_token_ids),
            reconstruction_loss=reconstruction_loss,
            commitment_loss=quantized.commitment_loss,
            code_counts=quantized.code_counts,
            code_sums=quantized.code_sums,
            code_features=quantized.features,
            level_fit=quantized.level_fit,
            codebook_usage=usage,
            perplexity=perplexity,
            hidden_states=tuple(feature_maps) if output_hidden_states else None,
            decoder_latents=latents,
        )
        if return_dict is None:
            return_dict = self.config.return_dict
        return output if return_dict else output.to_tuple()


__all__ = ["UniCodePreTrainedVisualTokenizer", "UniCodeVisualTokenizer", "UniCodeVisualTokenizerOutput"]
