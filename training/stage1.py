"""Stage I: train the visual tokenizer with the unified codebook (UniCode Sec. 3, Fig. 1).

A plain accelerate loop rather than `Trainer`: the codebook is updated by its paradigm's rule (not
by the optimizer) between steps, `dual` interleaves LLM text steps, and the adversarial term has its
own optimizer. The same code runs on 1 CPU, 1 GPU or several processes (`accelerate launch`).

Outputs (docs/design.md, the run folder): `<out>/vision_tokenizer/` (HF folder; its codebook equals the
LLM rows of `codebook_token_ids` bit for bit), `<out>/llm/` for `dual` (the LLM the codebook was
written into), `<out>/stage1/` (checkpoints, `log.jsonl`, `samples/*.png`, `metrics.json`).
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from hub_upload.run_folder import LLM_DIR, STAGE1_DIR, VISION_TOKENIZER_DIR
from modeling_unicode import (
    UniCodeCodebookLearning,
    UniCodeCodebookTrainer,
    UniCodeImageProcessor,
    UniCodeVisualTokenizer,
    blend_ratio,
    embedding_rows,
    select_codebook_rows,
    write_embedding_rows,
)
from modeling_unicode.configuration_unicode import TRAINING_ONLY_KEYS
from modeling_unicode.image_processing_unicode import pixel_values_from_uint8, uint8_from_pixel_values

from .checkpointing import (
    atomic_directory,
    atomic_save_image,
    atomic_write_json,
    latest_complete_checkpoint,
    verify_weights,
)
from .metrics import load_metric
from .precision import use_bf16
from .presets import load_preset, load_recipe, recipe_settings, vision_tokenizer_config
from .run_guard import check_resume_settings, read_settings
from .text_lm import load_text_lm

# What a resumed stage-I run may change: how long it trains, and how often it logs, draws, saves and evaluates.
RESUMABLE_CHANGES = (
    "max_steps",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_images",
    "output_dir",
)


@dataclass
class StageIArguments:
    """Everything a stage-I run depends on; saved with each checkpoint and the final metrics."""

    output_dir: str
    llm_path: str
    preset: str = "tiny"
    # How the unified codebook is learned (`UniCodeCodebookLearning`: its defaults apply where these are None). Not
    # part of the saved tokenizer: its codebook is the LLM's rows, whichever way it got there.
    paradigm: Optional[str] = None
    ema_decay: Optional[float] = None
    ema_eps: Optional[float] = None
    blend_schedule: Optional[str] = None
    blend_lambda: Optional[float] = None
    blend_tail_fraction: Optional[float] = None
    dead_code_threshold: Optional[float] = None
    dual_sync_interval: Optional[int] = None
    dual_row_norm: Optional[str] = None
    quantizer: Optional[str] = None
    depth: Optional[int] = None
    codebook_size: Optional[int] = None
    max_steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    adam_betas: tuple = (0.9, 0.99)  # VQGAN's GAN setting (0.5, 0.9) learns the tiny AE slower (docs/results.md)
    max_grad_norm: float = 1.0
    # bf16 autocast for the convolutions (the quantizer stays in float32): True, False, or "auto", where the hardware
    # multiplies bf16 natively (training/precision.py).
    bf16: bool | str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 250
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    eval_images: int = 256
    # Dual paradigm: LLM text steps per exchange, and their learning rate.
    dual_text_steps: int = 5
    dual_text_learning_rate: float = 1e-3
    # Adversarial PatchGAN term (hinge, adaptive weight) — off when 0.
    gan_weight: float = 0.0
    gan_start_step: int = 0
    # Perceptual (LPIPS) term — needs LPIPS weights, which do not ship offline.
    perceptual_weight: float = 0.0
    # Each latent cell's quantized vector predicts its own pixel patch's mean colour through a linear map trained
    # beside the tokenizer (training only; off when 0). An image-wide decoder can take a cell's colour from its
    # neighbours, so without it a cell's codes need not say what colour it shows, and the LLM, which reads and
    # writes codes one cell at a time, must learn colour from combinations of cells (docs/results.md, "Colour in
    # every cell").
    cell_colour_weight: float = 0.0
    # The term's detail: each cell's patch predicted as an r x r grid of mean colours (1: the patch's mean). r > 1
    # asks each cell's codes for where in the patch the colour lies too, i.e. for the local shape.
    cell_colour_resolution: int = 1
    # The reconstruction error counted again, each pixel weighted by the target's local contrast (`edge_weighted_mse`;
    # off when 0). A plain MSE over all pixels counts a small shape's outline by its few pixels, so rounding a small
    # square into a circle costs the tokenizer almost nothing (docs/results.md, thirteenth stop, "Where the shape
    # answers are lost").
    edge_weight: float = 0.0
    vision_overrides: dict = field(default_factory=dict)
    # Fine-tune: a trained visual tokenizer folder to start from (its layout and codebook ids kept), not a fresh one.
    init_from: Optional[str] = None

    @classmethod
    def from_recipe(cls, output_dir, llm_path, preset: str = "tiny", **overrides) -> "StageIArguments":
        """Stage I's arguments from the preset's recipe (`configuration/recipes/<preset>.yaml`, section `stage1`),
        then `overrides` (None values are ignored): the one place the recipe's stage-I keys become arguments, for
        the CLI and the demo alike."""
        settings, _ = recipe_settings(cls, [load_recipe(preset).get("stage1")], overrides)
        return cls(output_dir=str(output_dir), llm_path=str(llm_path), preset=preset, **settings)

    @property
    def codebook_learning(self) -> UniCodeCodebookLearning:
        """The codebook-learning settings these arguments give (validated: a bad value raises naming it)."""
        given = {f.name: getattr(self, f.name) for f in fields(UniCodeCodebookLearning)}
        return UniCodeCodebookLearning(**{name: value for name, value in given.items() if value is not None})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def images_to_uint8(images, image_size: int, argument: str = "dataset", image_processor=None) -> torch.Tensor:
    """Images of any size and mode (PIL, paths, bytes, uint8 arrays) -> (N, 3, S, S) uint8, kept in memory so a
    step is a slice. Each goes through `image_processor.fit` (default: `UniCodeImageProcessor(size=S)`), so
    training sees an image exactly as the processor shows it to the model at inference."""
    processor = image_processor or UniCodeImageProcessor(size=image_size)
    if processor.size != image_size:
        raise ValueError(
            f"image_processor.size={processor.size} but the visual tokenizer reads {image_size}x{image_size} "
            "images; pass the model's own processor"
        )
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8)
    for i, image in enumerate(images):
        try:
            rgb = processor.fit(image, i)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{argument}[{i}]: {error}") from None
        out[i] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def to_pixel_values(batch_uint8: torch.Tensor) -> torch.Tensor:
    return pixel_values_from_uint8(batch_uint8)


def to_uint8_images(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, C, H, W) floats -> (B, H, W, C) uint8, as the image processor writes images."""
    return uint8_from_pixel_values(pixel_values.detach().float()).permute(0, 2, 3, 1).cpu()


def batch_indices(num_examples: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: a function of (seed, step) alone, so a resumed run sees exactly the
    batches an uninterrupted one would."""
    per_epoch = max(1, num_examples // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


# ----------------------------------------------------------------------------------------------
# Adversarial term (VQGAN's PatchGAN, hinge loss, adaptive weight)
# ----------------------------------------------------------------------------------------------
class PatchDiscriminator(torch.nn.Module):
    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks = [torch.nn.Conv2d(channels, width, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        current = width
        for i in range(1, layers):
            nxt = width * min(2**i, 8)
            blocks += [
                torch.nn.Conv2d(current, nxt, 4, 2, 1),
                torch.nn.GroupNorm(math.gcd(32, nxt), nxt),
                torch.nn.LeakyReLU(0.2),
            ]
            current = nxt
        blocks += [torch.nn.Conv2d(current, 1, 4, 1, 1)]
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, images):
        return self.net(images)


def edge_weighted_mse(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error per pixel, weighted by how far the target pixel is from the mean of its 3 x 3 neighbourhood
    (summed over channels), with the weights of each image scaled to mean 1: flat areas count for nothing here (the
    plain MSE still counts them), outlines and corners for much, and a blank image adds nothing."""
    target = target.float()
    neighbourhood = F.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    contrast = (target - neighbourhood).abs().sum(1, keepdim=True)
    weight = contrast / contrast.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (weight * (reconstruction.float() - target).pow(2)).mean()


def adaptive_gan_weight(reconstruction_loss, generator_loss, last_layer) -> torch.Tensor:
    """VQGAN: balance the GAN gradient against the reconstruction gradient at the decoder's last layer."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    # numpy/python states as JSON bytes: `torch.load(weights_only=True)` accepts tensors, not ndarrays.
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    others = {"numpy": [kind, keys.tolist(), position, has_gauss, gauss], "python": random.getstate()}
    return {
        "torch": torch.get_rng_state(),
        "others": torch.tensor(list(json.dumps(others).encode()), dtype=torch.uint8),
    }


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    others = json.loads(bytes(state["others"].tolist()).decode())
    kind, keys, position, has_gauss, gauss = others["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss = others["python"]
    random.setstate((version, tuple(internal), gauss))


def latest_checkpoint(checkpoint_root: Path) -> Optional[Path]:
    """The newest COMPLETE `step-N` checkpoint; partial folders (a crash mid-write) are never chosen."""
    return latest_complete_checkpoint(checkpoint_root, "step-")


class CorruptCheckpointError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
class StageITrainer:
    def __init__(self, args: StageIArguments, train_images, eval_images, text_blocks: Optional[torch.Tensor] = None):
        self.args = args
        # accelerate keeps one process-wide state, and an Accelerator built without a precision takes whatever an
        # earlier one set: after stage 0's Trainer (bf16) in the same process, stage I ran under that precision, and
        # the same seed gave another tokenizer than stage I alone (docs/results.md, "A leaner tokenizer and a faster
        # evaluation"). Stage I states its own, as transformers' TrainingArguments does (the process group stays).
        # With bf16, accelerate also wraps the prepared modules in its autocast (fp32 outputs) around `_autocast`:
        # the setting every demo tokenizer so far was trained in, so `make demo` keeps its draw.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.bf16 = use_bf16(args.bf16)
        precision = "bf16" if self.bf16 else "no"
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
        self.device = self.accelerator.device
        self.out = Path(args.output_dir)
        self.work = self.out / STAGE1_DIR
        self.work.mkdir(parents=True, exist_ok=True)

        self.llm, self.text_tokenizer = load_text_lm(args.llm_path)
        self.llm.to(self.device)
        preset = load_preset(args.preset)
        overrides = {
            k: v
            for k, v in {
                "quantizer": args.quantizer,
                "depth": args.depth,
                "codebook_size": args.codebook_size,
            }.items()
            if v is not None
        }
        misplaced = sorted(set(args.vision_overrides) & set(TRAINING_ONLY_KEYS))
        if misplaced:
            raise ValueError(
                f"vision_overrides sets {misplaced}, which say how stage I learns the codebook, not what the "
                "tokenizer is: pass them as StageIArguments fields (recipe section `stage1`) instead"
            )
        overrides.update(args.vision_overrides)
        self.learning = args.codebook_learning
        start = UniCodeVisualTokenizer.from_pretrained(args.init_from) if args.init_from else None
        probe = start.config if start is not None else vision_tokenizer_config(preset, **overrides)
        hidden, rows = self.llm.get_input_embeddings().weight.shape[1], self.llm.get_input_embeddings().weight.shape[0]
        if hidden != probe.code_dim and start is None and "code_dim" not in overrides:
            # The codebook rows ARE the LLM's embeddings, so their width is the LLM's; the encoder keeps the
            # preset's widths (z_channels) and its 1x1 projection maps into the LLM's.
            print(
                f"stage I: the LLM at {args.llm_path} is {hidden} wide, so code_dim={hidden} (preset {args.preset!r} "
                f"says {probe.code_dim})"
            )
            overrides["code_dim"] = hidden
            probe = vision_tokenizer_config(preset, **overrides)
        if hidden != probe.code_dim:
            raise ValueError(
                f"the LLM at llm_path={args.llm_path!r} has hidden size {hidden} but "
                + (
                    f"the tokenizer at init_from={args.init_from!r}"
                    if start is not None
                    else f"vision_overrides sets code_dim={probe.code_dim}"
                )
                + "; the codebook rows ARE the LLM's embeddings, so pass the LLM it was made for"
                + ("" if start is not None else f" (or drop code_dim: it is then {hidden})")
            )
        if start is not None:
            self.config = self._fine_tune_config(start.config, overrides, rows)
            ids = list(self.config.codebook_token_ids)
        else:
            ids, selection = select_codebook_rows(
                self.llm.get_input_embeddings().weight, probe.codebook_size, self.text_tokenizer
            )
            self.config = vision_tokenizer_config(
                preset, **overrides, codebook_token_ids=ids, codebook_selection=selection
            )
        self.learning.check_tokenizer(self.config)
        self.token_ids = torch.tensor(ids, device=self.device)

        torch.manual_seed(args.seed)
        model = (start or UniCodeVisualTokenizer(self.config)).to(self.device)
        with torch.no_grad():
            model.codebook.copy_(self.llm_rows())  # every paradigm starts from the LLM's rows
        self.codebook_trainer = UniCodeCodebookTrainer(self.learning, model.codebook).to(self.device)
        # Only `dual` trains the LLM in stage I, so the rows the iterative codebook is pulled toward
        # are read once, not gathered (K x H: 268 MB for the base preset) at every step.
        self.iterative_target = self.llm_rows() if self.learning.paradigm == "iterative" else None
        trained = [p for p in model.parameters() if p.requires_grad]
        self.cell_colour_head = None
        self.cell_colour_pool = 0  # pixels per side of one colour the term predicts
        if args.edge_weight < 0:
            raise ValueError(f"edge_weight={args.edge_weight} must be >= 0 (0: off)")
        if args.cell_colour_weight > 0:
            cell = self.config.image_size // self.config.latent_grid_size
            if args.cell_colour_resolution < 1 or cell % args.cell_colour_resolution:
                raise ValueError(
                    f"cell_colour_resolution={args.cell_colour_resolution} must divide the {cell} pixels of a latent "
                    "cell (1: each cell's mean colour)"
                )
            self.cell_colour_pool = cell // args.cell_colour_resolution
            outputs = self.config.in_channels * args.cell_colour_resolution**2
            self.cell_colour_head = nn.Conv2d(self.config.z_channels, outputs, 1).to(self.device)
            trained += list(self.cell_colour_head.parameters())
        # One fused kernel over all parameters: on CPU torch's default Adam steps tensor by tensor, a measurable share
        # of a tiny tokenizer's step (docs/results.md, "The 1 x 1 maps of the patch encoder").
        fused = self.device.type in ("cpu", "cuda")  # every trained tensor is a float on self.device
        optimizer = torch.optim.Adam(trained, lr=args.learning_rate, betas=tuple(args.adam_betas), fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if self.cell_colour_head is not None:
            self.cell_colour_head = self.accelerator.prepare(self.cell_colour_head)

        self.discriminator = self.disc_optimizer = None
        if args.perceptual_weight > 0:
            raise ValueError(
                "perceptual_weight > 0 needs LPIPS weights, which are not available offline here; "
                "set perceptual_weight=0 (the default) or train where LPIPS weights can be loaded"
            )
        if args.gan_weight > 0:
            discriminator = PatchDiscriminator(self.config.in_channels).to(self.device)
            disc_optimizer = torch.optim.Adam(
                discriminator.parameters(), lr=args.learning_rate, betas=tuple(args.adam_betas)
            )
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(discriminator, disc_optimizer)

        self.text_blocks = text_blocks
        self.text_optimizer = None
        if self.learning.paradigm == "dual":
            if text_blocks is None or len(text_blocks) == 0:
                raise ValueError(
                    "paradigm='dual' trains the LLM on text between exchanges: pass text_blocks (token blocks)"
                )
            self.text_optimizer = torch.optim.AdamW(self.llm.parameters(), lr=args.dual_text_learning_rate)

        if len(train_images) == 0:
            raise ValueError(
                "the training dataset is empty; build the Shapes world (or your dataset) with at least one image"
            )
        if len(train_images) < args.batch_size:
            raise ValueError(
                f"the training dataset has {len(train_images)} images, fewer than batch_size={args.batch_size}; "
                "pass a smaller batch size (--batch-size)"
            )
        if args.batch_size % self.accelerator.num_processes:
            raise ValueError(
                f"batch_size={args.batch_size} must divide evenly over {self.accelerator.num_processes} processes"
            )
        self.train_images = train_images
        self.eval_images = eval_images[: args.eval_images]
        self.step = 0

    # -- helpers ---------------------------------------------------------------------------------
    def _fine_tune_config(self, config, overrides: dict, llm_rows: int):
        """The config of the tokenizer at `init_from`, with the options that leave its weights' shapes alone."""
        layout = {
            k: v
            for k, v in overrides.items()
            if k in ("image_size", "quantizer", "depth", "codebook_size", "code_dim") and v != getattr(config, k)
        }
        if layout:
            raise ValueError(
                f"init_from={self.args.init_from!r} keeps that tokenizer's layout, which {layout} would change; "
                "drop those options, or train a new tokenizer without init_from"
            )
        if max(config.codebook_token_ids) >= llm_rows:
            raise ValueError(
                f"the tokenizer at init_from={self.args.init_from!r} uses vocabulary ids up to "
                f"{max(config.codebook_token_ids)}, beyond the {llm_rows} rows of the LLM at "
                f"llm_path={self.args.llm_path!r}; pass the LLM it was trained with (--llm)"
            )
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    def _lr_factor(self, step: int) -> float:
        warmup = max(1, self.args.warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.args.max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    @property
    def unwrapped(self) -> UniCodeVisualTokenizer:
        return self.accelerator.unwrap_model(self.model)

    def llm_rows(self) -> torch.Tensor:
        with torch.no_grad():
            return embedding_rows(self.llm.get_input_embeddings(), self.token_ids).float()

    @functools.cached_property
    def text_token_ids(self) -> torch.Tensor:
        """Ids of the LLM's rows that are not codes (fixed for the run)."""
        is_code = torch.zeros(
            self.llm.get_input_embeddings().weight.shape[0], dtype=torch.bool, device=self.token_ids.device
        )
        is_code[self.token_ids] = True
        return (~is_code).nonzero().squeeze(1)

    def text_row_norm(self) -> float:
        """Mean length of the LLM's rows that are not codes, as the LLM sees them now (scaled embeddings too)."""
        with torch.no_grad():
            return float(
                embedding_rows(self.llm.get_input_embeddings(), self.text_token_ids).float().norm(dim=1).mean()
            )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        args, model = self.args, self.model
        indices = batch_indices(len(self.train_images), self.step, args.batch_size, args.seed)
        share = args.batch_size // self.accelerator.num_processes
        local = indices[self.accelerator.process_index * share : (self.accelerator.process_index + 1) * share]
        pixel_values = to_pixel_values(self.train_images[local]).to(self.device)
        ratio = blend_ratio(self.learning, self.step, args.max_steps)
        model.train()
        with self._autocast():
            out = model(pixel_values, return_statistics=True)
        loss = out.loss
        logs = {}
        if self.cell_colour_head is not None:
            colours = self.cell_colour_head(out.decoder_latents.float())
            predicted = F.pixel_shuffle(colours, args.cell_colour_resolution)
            cell_colour_loss = F.mse_loss(predicted, F.avg_pool2d(pixel_values.float(), self.cell_colour_pool))
            loss = loss + args.cell_colour_weight * cell_colour_loss
            logs["cell_colour_mse"] = float(cell_colour_loss.detach())
        if args.edge_weight > 0:
            edge_loss = edge_weighted_mse(out.reconstruction, pixel_values)
            loss = loss + args.edge_weight * edge_loss
            logs["edge_mse"] = float(edge_loss.detach())
        if self.discriminator is not None and self.step >= args.gan_start_step:
            last_layer = self.unwrapped.decoder.conv_out.weight
            with self._autocast():
                generator_loss = -self.discriminator(out.reconstruction).mean()
            weight = adaptive_gan_weight(out.reconstruction_loss, generator_loss, last_layer)
            # Released code: the adversarial pull fades as the codebook is handed to the LLM.
            gan_scale = args.gan_weight * (1.0 - 0.9 * ratio)
            loss = loss + gan_scale * weight * generator_loss
            logs["generator_loss"] = float(generator_loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if args.max_grad_norm:
            self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.discriminator is not None and self.step >= args.gan_start_step:
            with self._autocast():
                real = self.discriminator(pixel_values)
                fake = self.discriminator(out.reconstruction.detach())
            disc_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
            self.disc_optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(disc_loss)
            self.disc_optimizer.step()
            logs["discriminator_loss"] = float(disc_loss.detach())

        codebook = self.unwrapped.codebook
        llm_rows = self.iterative_target if self.learning.paradigm == "iterative" else None
        self.codebook_trainer.update(
            codebook.data,
            out.code_counts,
            out.code_sums,
            llm_rows=llm_rows,
            ratio=ratio,
            restart_candidates=out.code_features,
            quantizer=self.unwrapped.quantizer,
        )
        if out.level_fit is not None:
            self.codebook_trainer.update_level_scales(self.unwrapped.quantizer.level_scale, out.level_fit)
        if self.learning.paradigm == "dual" and (self.step + 1) % self.learning.dual_sync_interval == 0:
            logs.update(self.dual_exchange())
        mse = float(out.reconstruction_loss.detach())
        self.step += 1
        return {
            "step": self.step,
            "loss": float(loss.detach()),
            "reconstruction_mse": mse,
            "commitment": float(out.commitment_loss.detach()),
            "psnr": psnr_from_mse(mse),
            "usage": out.codebook_usage,
            "perplexity": out.perplexity,
            "blend_ratio": ratio,
            "lr": self.scheduler.get_last_lr()[0],
            **logs,
        }

    def hand_codebook_to_llm(self) -> None:
        """Dual paradigm: write the codebook into the LLM rows; with `dual_row_norm="llm"`, at the length
        of the LLM's other rows (`UniCodeCodebookTrainer.match_row_norm`)."""
        codebook = self.unwrapped.codebook
        if self.learning.dual_row_norm == "llm":
            self.codebook_trainer.match_row_norm(
                codebook.data, self.text_row_norm(), quantizer=self.unwrapped.quantizer
            )
        write_embedding_rows(self.llm.get_input_embeddings(), self.token_ids, codebook.data)

    def dual_exchange(self) -> dict:
        """Dual alternating training: codebook -> LLM rows, M text steps, LLM rows -> codebook.

        Every rank runs the same text steps on the same blocks (seeded by the step), so the LLM, and
        thus the codebook read back, stays identical across processes without a second DDP wrapper.
        """
        codebook = self.unwrapped.codebook
        self.hand_codebook_to_llm()
        self.llm.train()
        generator = torch.Generator().manual_seed(self.args.seed * 7919 + self.step)
        losses = []
        for _ in range(self.args.dual_text_steps):
            pick = torch.randint(0, len(self.text_blocks), (min(8, len(self.text_blocks)),), generator=generator)
            blocks = self.text_blocks[pick].to(self.device)
            loss = self.llm(input_ids=blocks, labels=blocks).loss
            self.text_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.text_optimizer.step()
            losses.append(loss.item())
        self.llm.eval()
        self.codebook_trainer.load_llm_rows(codebook.data, self.llm_rows(), quantizer=self.unwrapped.quantizer)
        return {"llm_text_loss": sum(losses) / len(losses)}

    # -- evaluation, samples -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """PSNR (on 8-bit reconstructions, as images are seen) and codebook usage on the validation
        images, through the project's `evaluate` metric modules."""
        model = self.unwrapped.eval()
        originals, reconstructions, codes = [], [], []
        for start in range(0, len(self.eval_images), 64):
            batch = self.eval_images[start : start + 64]
            with self._autocast():
                out = model(to_pixel_values(batch).to(self.device), return_statistics=False)
            originals.extend(batch.permute(0, 2, 3, 1).numpy())
            reconstructions.extend(to_uint8_images(out.reconstruction).numpy())
            codes.extend(out.codes.reshape(len(batch), -1).cpu().tolist())
        psnr = load_metric("psnr").compute(predictions=reconstructions, references=originals)["psnr"]
        usage = load_metric("codebook_usage").compute(predictions=codes, codebook_size=self.config.codebook_size)
        return {"psnr": psnr, "usage": usage["usage"], "perplexity": usage["perplexity"], "images": len(originals)}

    @torch.no_grad()
    def save_samples(self, name: str, count: int = 8) -> Path:
        model = self.unwrapped.eval()
        originals = to_pixel_values(self.eval_images[:count]).to(self.device)
        with self._autocast():
            reconstruction = model(originals, return_statistics=False).reconstruction.float()
        rows = [originals, reconstruction.clamp(-1, 1)]
        grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 2S, count*S)
        path = self.work / "samples" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(Image.fromarray(to_uint8_images(grid.unsqueeze(0))[0].numpy()), path)
        return path

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Optional[Path]:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        root = self.work / "checkpoints"
        target = root / f"step-{self.step:07d}"
        with atomic_directory(target) as staging:
            save_model(self.unwrapped, str(staging / "model.safetensors"))
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "codebook_trainer": self.codebook_trainer.state_dict(),
                "rng": _rng_state(),
                "step": self.step,
            }
            if self.cell_colour_head is not None:
                state["cell_colour_head"] = self.accelerator.unwrap_model(self.cell_colour_head).state_dict()
            if self.discriminator is not None:
                state["discriminator"] = self.accelerator.unwrap_model(self.discriminator).state_dict()
                state["disc_optimizer"] = self.disc_optimizer.state_dict()
            if self.text_optimizer is not None:
                save_model(self.llm, str(staging / "llm.safetensors"))
                state["text_optimizer"] = self.text_optimizer.state_dict()
            torch.save(state, staging / "training_state.pt")
            (staging / "arguments.json").write_text(json.dumps(asdict(self.args), indent=2))
        for old in sorted(root.glob("step-*"), key=lambda p: p.name)[: -self.args.keep_checkpoints]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def load_checkpoint(self, path: Path) -> None:
        try:
            verify_weights(path)
            state = torch.load(path / "training_state.pt", map_location=self.device, weights_only=True)
            load_model(self.unwrapped, str(path / "model.safetensors"), device=str(self.device))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.codebook_trainer.load_state_dict(state["codebook_trainer"])
            if self.cell_colour_head is not None:
                self.accelerator.unwrap_model(self.cell_colour_head).load_state_dict(state["cell_colour_head"])
            if self.discriminator is not None:
                self.accelerator.unwrap_model(self.discriminator).load_state_dict(state["discriminator"])
                self.disc_optimizer.load_state_dict(state["disc_optimizer"])
            if self.text_optimizer is not None:
                load_model(self.llm, str(path / "llm.safetensors"), device=str(self.device))
                self.text_optimizer.load_state_dict(state["text_optimizer"])
            _restore_rng(state["rng"])
            self.step = int(state["step"])
        except Exception as error:  # noqa: BLE001 - any failure here means the checkpoint is unusable
            raise CorruptCheckpointError(
                f"checkpoint {path} cannot be loaded ({type(error).__name__}: {error}); delete that folder to resume "
                "from the previous checkpoint, or start without --resume"
            ) from error

    # -- the loop --------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        args = self.args
        if resume:
            checkpoint = latest_checkpoint(self.work / "checkpoints")
            if checkpoint is not None:
                # Before loading: another depth or quantizer would fail to load and read as a corrupt checkpoint.
                check_resume_settings(
                    read_settings(checkpoint / "arguments.json"), asdict(args), checkpoint, RESUMABLE_CHANGES
                )
                self.load_checkpoint(checkpoint)
        log_path = self.work / "log.jsonl"
        started = time.perf_counter()
        progress = tqdm(
            total=args.max_steps,
            initial=self.step,
            desc=f"stage I ({self.learning.paradigm}, {self.config.quantizer})",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        while self.step < args.max_steps:
            record = self.train_step()
            progress.update(1)
            if self.step % args.log_every == 0 or self.step == args.max_steps:
                progress.set_postfix(
                    psnr=f"{record['psnr']:.1f}", usage=f"{record['usage']:.2f}", r=f"{record['blend_ratio']:.2f}"
                )
                if self.accelerator.is_main_process:
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
            if self.accelerator.is_main_process and args.sample_every and self.step % args.sample_every == 0:
                self.save_samples(f"step-{self.step:07d}")
            if args.checkpoint_every and self.step % args.checkpoint_every == 0 and self.step < args.max_steps:
                self.save_checkpoint()
        progress.close()
        return self.finish(time.perf_counter() - started)

    def finish(self, seconds: float) -> dict:
        codebook = self.unwrapped.codebook
        if self.learning.paradigm == "dual":
            # Dual ends by handing the codebook to the LLM, which is saved beside the tokenizer.
            self.hand_codebook_to_llm()
        with torch.no_grad():
            codebook.copy_(self.llm_rows())
        unified = bool(torch.equal(codebook, self.llm_rows()))
        if not unified:
            raise RuntimeError("stage I ended with a codebook different from the LLM rows; this is a bug")
        metrics = {
            **self.evaluate(),
            "train_seconds": seconds,
            "steps": self.step,
            "unified": unified,
            "paradigm": self.learning.paradigm,
            "quantizer": self.config.quantizer,
            "depth": self.config.depth,
            "codebook_size": self.config.codebook_size,
            "tokens_per_image": self.config.tokens_per_image,
            "world_size": self.accelerator.num_processes,
        }
        self.save_checkpoint()
        if self.accelerator.is_main_process:
            self.save_samples("final")
            with atomic_directory(self.out / VISION_TOKENIZER_DIR) as staging:
                self.unwrapped.save_pretrained(staging)
            if self.learning.paradigm == "dual":
                with atomic_directory(self.out / LLM_DIR) as staging:
                    self.llm.save_pretrained(staging)
                    self.text_tokenizer.save_pretrained(staging)
            atomic_write_json(self.work / "metrics.json", {**metrics, "arguments": asdict(self.args)})
        self.accelerator.wait_for_everyone()
        return metrics


def psnr_from_mse(mse: float, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak range 2)."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak_to_peak**2 / mse)
