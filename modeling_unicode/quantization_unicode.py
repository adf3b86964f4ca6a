"""The unified codebook: row selection, code-map layout, nearest-code search, VQ/RQ/HQ quantizers
and the three ways of learning the codebook (UniCode, arXiv 2403.09072, Sec. 3 and Fig. 1).

The codebook is never owned by the quantizer: every lookup takes it as an argument, so a standalone
visual tokenizer passes its own K x H parameter and the MLLM passes its LLM's embedding rows — one
codebook, stored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .configuration_unicode import HQ_DEPTH, UniCodeVisualTokenizerConfig

# Bound on the (rows x K) float32 score block of one nearest-code chunk: 64 MiB keeps the search's
# extra memory flat whatever the batch, while a block this large still runs the GEMM at full speed.
NEAREST_CODE_CHUNK_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------------------------
# Codebook rows: which vocabulary ids are visual codes
# ----------------------------------------------------------------------------------------------
def non_code_token_ids(tokenizer) -> set[int]:
    """Ids that must never be visual codes: every special token and every added token.

    `all_special_ids` is not enough: Gemma's tokenizer has thousands of `added_tokens_decoder`
    entries that are not in it, and an added token's row was never trained as ordinary text.
    """
    excluded = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    excluded.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}).keys())
    return excluded


def select_codebook_rows(
    embedding_weight: torch.Tensor,
    codebook_size: int,
    tokenizer=None,
    excluded_token_ids: Iterable[int] = (),
    norm_quantile: float = 0.25,
) -> tuple[list[int], dict]:
    """Choose the K vocabulary ids whose embedding rows form the unified codebook.

    All usable rows when K equals their number; otherwise the released code's rule — the K rows of
    smallest L2 norm among rows at or above a norm threshold — with the threshold taken as a
    quantile of the usable rows' norms rather than the absolute 1.0 tuned for Vicuna (a freshly
    initialised small LM has row norms near 0.3, so 1.0 would exclude every row).

    Returns the ids in ascending order (code k <-> ids[k]) and a record of the rule for the config.
    """
    if embedding_weight.dim() != 2:
        raise ValueError(
            f"embedding_weight must be the (vocab_size, hidden_size) table, got shape {tuple(embedding_weight.shape)}"
        )
    vocab_rows = embedding_weight.shape[0]
    limit = vocab_rows if tokenizer is None else min(vocab_rows, len(tokenizer))
    excluded = set(int(i) for i in excluded_token_ids)
    if tokenizer is not None:
        excluded |= non_code_token_ids(tokenizer)
    usable = torch.tensor([i for i in range(limit) if i not in excluded], dtype=torch.long)
    if codebook_size > usable.numel():
        raise ValueError(
            f"codebook_size={codebook_size} exceeds the {usable.numel()} usable vocabulary rows "
            f"(vocabulary {limit}, {limit - usable.numel()} special/added tokens excluded); use a smaller "
            "codebook_size or an LLM with a larger vocabulary"
        )
    if codebook_size == usable.numel():
        return usable.tolist(), {"rule": "all_usable_rows", "usable_rows": int(usable.numel())}
    # On the CPU: the ids are small host-side bookkeeping, whatever device the LLM's table is on.
    norms = embedding_weight.detach()[usable.to(embedding_weight.device)].float().norm(dim=1).cpu()
    threshold = float(torch.quantile(norms, norm_quantile)) if norms.numel() > 1 else 0.0
    order = torch.argsort(norms, stable=True)
    first_above = int((norms[order] < threshold).sum())
    # Too few rows above the threshold: slide down so K rows still fit, nearest the threshold.
    start = min(first_above, usable.numel() - codebook_size)
    chosen = usable[order[start : start + codebook_size]].sort().values
    record = {
        "rule": "smallest_norm_above_quantile",
        "norm_quantile": norm_quantile,
        "norm_threshold": threshold,
        "usable_rows": int(usable.numel()),
    }
    return chosen.tolist(), record


def token_ids_to_code_indices(
    token_ids: torch.Tensor, codebook_token_ids: Optional[torch.Tensor], argument: str = "codes"
) -> torch.Tensor:
    """Vocabulary ids -> code indices 0..K-1; a `ValueError` names any id that is not a code."""
    if codebook_token_ids is None:
        return token_ids
    sorted_ids, order = codebook_token_ids.sort()
    position = torch.searchsorted(sorted_ids, token_ids).clamp_(max=sorted_ids.numel() - 1)
    valid = sorted_ids[position] == token_ids
    if not bool(valid.all()):
        bad = token_ids[~valid].unique()[:5].tolist()
        raise ValueError(
            f"{argument} contains ids that are not visual codes, e.g. {bad}; every id must be one of the "
            "config's codebook_token_ids (take codes from `encode` or from a code-constrained `generate`)"
        )
    return order[position]


def code_indices_to_token_ids(indices: torch.Tensor, codebook_token_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Code indices 0..K-1 -> vocabulary ids (identity before rows are chosen)."""
    return indices if codebook_token_ids is None else codebook_token_ids[indices]


def embedding_rows(embedding: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """The LLM's input embeddings of `token_ids`, as the LLM itself sees them.

    Called through the module so scaled embeddings (Gemma multiplies by sqrt(hidden) inside
    forward) are what the visual tokenizer sees too.
    """
    return embedding(token_ids)


@torch.no_grad()
def write_embedding_rows(embedding: nn.Module, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
    """Inverse of `embedding_rows`: set the rows so the embedding module outputs `rows` (dual paradigm)."""
    scale = getattr(embedding, "embed_scale", None)
    values = rows.to(embedding.weight.dtype)
    if scale is not None:
        values = values / torch.as_tensor(scale, dtype=values.dtype, device=values.device)
    embedding.weight[token_ids.to(embedding.weight.device)] = values.to(embedding.weight.device)


# ----------------------------------------------------------------------------------------------
# Code-map layout: (B, ĥ, ŵ, D) and its flattened order — owned here, used everywhere
# ----------------------------------------------------------------------------------------------
def flatten_code_map(codes: torch.Tensor) -> torch.Tensor:
    """(B, ĥ, ŵ, D) -> (B, ĥ·ŵ·D): raster order over positions, then depth within a position.

    Every code sequence the LLM reads or writes uses this order, so a position's D codes are
    adjacent and an image can be cut into whole rows of positions.
    """
    if codes.dim() != 4:
        raise ValueError(f"codes must have shape (batch, height, width, depth), got {tuple(codes.shape)}")
    return codes.reshape(codes.shape[0], -1)


def unflatten_code_map(sequence: torch.Tensor, grid_size: int, depth: int) -> torch.Tensor:
    """(B, ĥ·ŵ·D) -> (B, ĥ, ŵ, D); inverse of `flatten_code_map`."""
    expected = grid_size * grid_size * depth
    if sequence.dim() != 2 or sequence.shape[1] != expected:
        raise ValueError(
            f"a flattened code sequence must have shape (batch, {expected}) = (batch, "
            f"{grid_size}x{grid_size}x{depth}), "
            f"got {tuple(sequence.shape)}"
        )
    return sequence.reshape(sequence.shape[0], grid_size, grid_size, depth)


def code_coordinates(index: torch.Tensor, grid_size: int, depth: int) -> tuple[torch.Tensor, ...]:
    """(grid row, grid column, level) of each index into a flattened code sequence (`flatten_code_map`'s order)."""
    return index // (grid_size * depth), (index // depth) % grid_size, index % depth


def placeholder_grid(grid_size: int, depth: int, quantizer: str, visual_input: str) -> tuple[int, int]:
    """(side, levels) of the grid `placeholder_coordinates` addresses: rows and columns run over `side`, levels over
    `levels`."""
    if visual_input == "flatten":
        return grid_size, depth
    return (2 * grid_size if quantizer == "hq" else grid_size), 1


def placeholder_coordinates(
    grid_size: int, depth: int, quantizer: str, visual_input: str, device=None
) -> tuple[torch.Tensor, ...]:
    """(row, column, level) of each placeholder of an input image, in `image_input_embeddings`' order.

    `flatten` holds every code, so its coordinates are `code_coordinates`'. `aggregate` holds one vector per
    position (level 0); for HQ the position is on the bottom grid (2ĥ x 2ŵ), walked per top position, its 2x2
    block. `placeholder_grid` gives the grid's size.
    """
    if visual_input == "flatten":
        return code_coordinates(torch.arange(grid_size * grid_size * depth, device=device), grid_size, depth)
    if quantizer == "hq":
        index = torch.arange(4 * grid_size * grid_size, device=device)
        top, quadrant = index // 4, index % 4
        rows = 2 * (top // grid_size) + quadrant // 2
        columns = 2 * (top % grid_size) + quadrant % 2
    else:
        index = torch.arange(grid_size * grid_size, device=device)
        rows, columns = index // grid_size, index % grid_size
    return rows, columns, torch.zeros_like(rows)


def hq_pack(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """HQ codes -> code map: top (B, h, w) + bottom (B, 2h, 2w) -> (B, h, w, 5) with depth order
    [top, bottom(0,0), bottom(0,1), bottom(1,0), bottom(1,1)], the 2x2 block under each top code.

    The released code grouped bottom codes in 1x4 raster strips instead, which separates a top
    code from the bottom codes it actually refines (docs/paper.md, "Visual tokenizer").
    """
    b, h, w = top.shape
    if bottom.shape != (b, 2 * h, 2 * w):
        raise ValueError(
            f"bottom codes must have shape {(b, 2 * h, 2 * w)} for top {(b, h, w)}, got {tuple(bottom.shape)}"
        )
    blocks = bottom.reshape(b, h, 2, w, 2).permute(0, 1, 3, 2, 4).reshape(b, h, w, 4)
    return torch.cat([top.unsqueeze(-1), blocks], dim=-1)


def hq_unpack(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `hq_pack`: (B, h, w, 5) -> top (B, h, w), bottom (B, 2h, 2w)."""
    b, h, w, d = codes.shape
    if d != HQ_DEPTH:
        raise ValueError(f"HQ code maps have depth {HQ_DEPTH} (top + 2x2 bottom), got depth {d}")
    bottom = codes[..., 1:].reshape(b, h, w, 2, 2).permute(0, 1, 3, 2, 4).reshape(b, 2 * h, 2 * w)
    return codes[..., 0], bottom


def image_input_embeddings(
    code_embeddings: torch.Tensor, quantizer: str, visual_input: str = "aggregate"
) -> torch.Tensor:
    """Embeddings of a code map (B, ĥ, ŵ, D, H) -> the image's LLM input sequence (B, N, H).

    `flatten`: every code in the flattened layout (N = ĥ·ŵ·D), i.e. exactly what the LLM would see
    had the ids been written as text. `aggregate` (the paper's compressed input ẑ_ij = F(e(M_ij·))):
    - `vq`: identity (D = 1), N = ĥ·ŵ;
    - `rq`: the sum over depth of the rows, N = ĥ·ŵ. Without level scales and a search projection
      that is the quantized vector the decoder sees; with them the decoder sees Σ s_l·(W·row_l + b),
      and giving the LLM that instead measured no VQA gain (docs/results.md, "Stage-0 initialisation");
    - `hq`: e(top) + e(bottom) for each of the 4 bottom codes under a top code, N = 4·ĥ·ŵ, in the
      flattened layout's order (per top position, its 2x2 block). A sum of all five would make
      the four bottom codes indistinguishable, so the LLM could not learn to decompress it.
    `configuration_unicode.image_placeholder_count` gives N; the two must change together.
    """
    if code_embeddings.dim() != 5:
        raise ValueError(
            f"code_embeddings must have shape (batch, ĥ, ŵ, depth, hidden), got {tuple(code_embeddings.shape)}"
        )
    b, h, w, d, hidden = code_embeddings.shape
    if visual_input == "flatten":
        return code_embeddings.reshape(b, h * w * d, hidden)
    if visual_input != "aggregate":
        raise ValueError(f"visual_input={visual_input!r} is not supported; use 'aggregate' or 'flatten'")
    if quantizer == "hq":
        if d != HQ_DEPTH:
            raise ValueError(f"HQ code maps have depth {HQ_DEPTH} (top + 2x2 bottom), got depth {d}")
        return (code_embeddings[:, :, :, :1] + code_embeddings[:, :, :, 1:]).reshape(b, h * w * (HQ_DEPTH - 1), hidden)
    return code_embeddings.sum(dim=3).reshape(b, h * w, hidden)


# ----------------------------------------------------------------------------------------------
# Nearest-code search
# ----------------------------------------------------------------------------------------------
def squared_row_norms(codebook: torch.Tensor) -> torch.Tensor:
    """|c_k|^2 per row, without the K x H temporary of `pow(2)` (500 MB for Vicuna's 32000 x 4096)."""
    return torch.linalg.vector_norm(codebook.detach(), dim=1).pow_(2)


def nearest_code(
    vectors: torch.Tensor,
    codebook: torch.Tensor,
    codebook_sq_norms: Optional[torch.Tensor] = None,
    chunk_bytes: int = NEAREST_CODE_CHUNK_BYTES,
) -> torch.Tensor:
    """Index of the nearest codebook row (L2) for each of the N vectors (N, H) -> (N,).

    argmin_k |x - c_k|^2 = argmin_k (|c_k|^2 - 2 x.c_k): one `addmm` per chunk of rows and an argmin,
    so the N x K distance matrix never exists at once and the cost is the GEMM.
    """
    if vectors.dim() != 2 or codebook.dim() != 2 or vectors.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code needs vectors (N, H) and codebook (K, H), got {tuple(vectors.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    vectors = vectors.detach()
    codebook = codebook.detach().to(vectors.dtype)
    if codebook_sq_norms is None:
        codebook_sq_norms = squared_row_norms(codebook)
    codebook_sq_norms = codebook_sq_norms.to(vectors.dtype).unsqueeze(0)
    codebook_t = codebook.t()
    num_codes = codebook.shape[0]
    rows_per_chunk = max(1, chunk_bytes // (num_codes * vectors.element_size()))
    out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    for start in range(0, vectors.shape[0], rows_per_chunk):
        block = vectors[start : start + rows_per_chunk]
        scores = torch.addmm(codebook_sq_norms, block, codebook_t, beta=1.0, alpha=-2.0)
        torch.argmin(scores, dim=1, out=out[start : start + rows_per_chunk])
    return out


# ----------------------------------------------------------------------------------------------
# Quantizer
# ----------------------------------------------------------------------------------------------
@dataclass
class QuantizerOutput:
    """What a quantizer forward returns.

    quantized: decoder-side features (B, H, latent, latent), straight-through to the encoder.
    indices: code map of code indices 0..K-1, (B, ĥ, ŵ, D).
    commitment_loss: β-weighted commitment term.
    level_fit: (levels, 2) terms (Σ x·c, Σ |c|²) of each level's least-squares row scale, with
        `level_scales`; None otherwise or unless requested.
    code_counts / code_sums: per-code assignment counts (K,) and feature sums (K, H) in codebook
        units, the sufficient statistics of the EMA k-means update; None unless requested.
    features: every level's input vectors (N·levels, H) in codebook units, candidates for
        restarting dead codes; None unless requested.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment_loss: torch.Tensor
    code_counts: Optional[torch.Tensor] = None
    code_sums: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    level_fit: Optional[torch.Tensor] = None


def usage_statistics(code_counts: torch.Tensor) -> tuple[float, float]:
    """(fraction of codes used, perplexity of the code distribution) from assignment counts."""
    total = code_counts.sum()
    if total <= 0:
        return 0.0, 0.0
    probs = code_counts.float() / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float((code_counts > 0).float().mean()), float(entropy.exp())


class UniCodeQuantizer(nn.Module):
    """Stacked quantization with a shared, externally owned codebook.

    - `vq`: one code per latent position.
    - `rq`: D levels; level l quantizes what levels < l left over, all with the same codebook
      (RQ-VAE, Lee et al. 2022), so every level's code is an LLM token.
    - `hq`: a top code per 2x2 block of the latent grid (on the block average) and a bottom code per
      latent position on the residual (HQ-VAE lineage); 5 codes per top position.

    Norm handling (`normalize`, the released code's idea): features are L2-normalised to a fixed
    length and the codebook is multiplied by one scalar with the same mean row length, so the
    encoder cannot drift in scale away from the LLM's rows and the rows keep their relative norms.
    """

    def __init__(self, config: UniCodeVisualTokenizerConfig):
        super().__init__()
        self.kind = config.quantizer
        self.depth = config.depth
        self.num_levels = config.num_levels
        self.commitment_beta = config.commitment_beta
        self.entropy_weight = config.entropy_weight
        self.entropy_temperature = config.entropy_temperature
        self.normalize = config.norm_handling == "normalize"
        self.code_norm = config.effective_code_norm
        # Each level's row multiplier, fitted in closed form by `UniCodeCodebookTrainer.update_level_scales`
        # (the least-squares scale of the chosen rows onto that level's inputs), like BatchNorm's
        # running statistics: a gradient-learned scalar moves at most ~lr per Adam step, far too slow.
        if config.level_scales:
            self.register_buffer("level_scale", torch.ones(config.num_levels))
        else:
            self.level_scale = None
        # SimVQ (Zhu et al. 2024): a frozen codebook is searched through a learned linear map, so the
        # gradient moves ALL codes toward the features at once instead of the encoder chasing a few
        # rows. The rows stay the LLM's; only the metric used to pick among them is learned.
        self.codebook_projection = nn.Linear(config.code_dim, config.code_dim) if config.codebook_projection else None

    def codebook_scale(self, codebook: torch.Tensor) -> torch.Tensor:
        """Scalar s mapping codebook rows into feature space: decoder input = row x s."""
        if not self.normalize:
            return codebook.new_ones(())
        return (self.code_norm / codebook.detach().float().norm(dim=1).mean().clamp_min(1e-12)).to(codebook.dtype)

    def level_scales(self, codebook: torch.Tensor) -> list[torch.Tensor]:
        """One multiplier per level (`codebook_scale` times the learned level scale)."""
        base = self.codebook_scale(codebook).float()
        if self.level_scale is None:
            return [base] * self.num_levels
        return [base * self.level_scale[level].float() for level in range(self.num_levels)]

    def prepare_features(self, features: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return features
        return F.normalize(features, dim=1) * self.code_norm

    def project(self, codebook: torch.Tensor) -> torch.Tensor:
        """The codebook as the search sees it: the rows themselves, or W·rows + b (`codebook_projection`)."""
        if self.codebook_projection is None:
            return codebook
        return self.codebook_projection(codebook.to(self.codebook_projection.weight.dtype))

    @torch.no_grad()
    def absorb_row_scale(self, alpha: float) -> None:
        """Compensate for every codebook row having been multiplied by `alpha`, so that the search and
        the decoder input, level_scale·base·(W·row + b), stay exactly what they were: the projection's
        bias scales with the rows, the fitted level scales (or, normalized, the base scale, which
        divides by the mean row norm by itself) by 1/alpha."""
        if not (self.normalize or self.level_scale is not None):
            raise ValueError(
                "this quantizer has neither level_scales nor normalized features, so a row scale "
                "would change its decoder input; build it with level_scales=True"
            )
        if self.codebook_projection is not None and self.codebook_projection.bias is not None:
            self.codebook_projection.bias.mul_(alpha)
        if not self.normalize:
            self.level_scale.div_(alpha)

    @torch.no_grad()
    def unproject(self, searched: torch.Tensor) -> torch.Tensor:
        """Rows c with project(c) = `searched` (solved in float64 for stability): brings statistics
        gathered in the searched space back to codebook rows."""
        if self.codebook_projection is None:
            return searched
        weight = self.codebook_projection.weight.double()
        solution = torch.linalg.solve(weight, (searched.double() - self.codebook_projection.bias.double()).T).T
        return solution.to(searched.dtype)

    def forward(
        self, features: torch.Tensor, codebook: torch.Tensor, return_statistics: bool = False
    ) -> QuantizerOutput:
        """features (B, H, latent, latent) -> QuantizerOutput.

        Runs in float32 even under autocast: nearest-code decisions between close codebook rows
        are not representable in bf16's 8-bit mantissa.
        """
        z = self.prepare_features(features.float())
        codebook = self.project(codebook)
        scales = self.level_scales(codebook)
        level_fit = []  # per level: (Σ x·c, Σ |c|²) in base units — the least-squares scale's terms
        # Search |x - s·c| as s·|x/s - c|: the (K, H) codebook is never copied, only (N, H) vectors.
        book = codebook.detach().to(z.dtype)
        sq_norms = squared_row_norms(book)
        # Each level's (input vectors in codebook units, chosen indices), for the EMA statistics.
        assignments: list[tuple[torch.Tensor, torch.Tensor]] = []
        entropy_inputs = []  # level 0's search inputs with their gradient, when the entropy term is on
        with_entropy = self.entropy_weight > 0 and self.training and torch.is_grad_enabled()

        def quantize(x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
            b, h, gh, gw = x.shape
            scale = scales[level]
            flat = x.permute(0, 2, 3, 1).reshape(-1, h) / scale
            idx = nearest_code(flat, book, sq_norms)
            assignments.append((flat.detach(), idx))
            if level == 0 and with_entropy:
                entropy_inputs.append(flat)
            if return_statistics and self.level_scale is not None:
                in_base_units = flat.detach() * self.level_scale[level]
                level_fit.append(torch.stack([(in_base_units * book[idx]).sum(), sq_norms[idx].sum()]))
            # From the undetached codebook, so a codebook projection gets the codebook loss's gradient.
            q = (codebook[idx].to(z.dtype) * scale).reshape(b, gh, gw, h).permute(0, 3, 1, 2)
            return q, idx.reshape(b, gh, gw)

        partials = []  # partial reconstructions, for the commitment loss
        if self.kind == "hq":
            top_q, top_idx = quantize(F.avg_pool2d(z, 2), 0)
            upsampled = F.interpolate(top_q, scale_factor=2, mode="nearest")
            bottom_q, bottom_idx = quantize(z - upsampled, 1)
            quantized = upsampled + bottom_q
            partials = [upsampled, quantized]
            indices = hq_pack(top_idx, bottom_idx)
        else:
            quantized = torch.zeros_like(z)
            level_indices = []
            for level in range(self.depth):
                q, idx = quantize(z - quantized, level)
                quantized = quantized + q
                partials.append(quantized)
                level_indices.append(idx)
            indices = torch.stack(level_indices, dim=-1)

        # Commit the encoder to every partial sum (RQ-VAE), so early levels alone are meaningful.
        commitment = sum(F.mse_loss(z, p.detach()) for p in partials) / len(partials)
        loss = self.commitment_beta * commitment
        if self.codebook_projection is not None and codebook.requires_grad:
            # VQ-VAE's codebook loss; the rows are fixed here, so only the projection learns from it.
            loss = loss + sum(F.mse_loss(p, z.detach()) for p in partials) / len(partials)
        if with_entropy:
            loss = loss + self.entropy_weight * self.assignment_entropy(entropy_inputs[0], codebook)
        output = QuantizerOutput(
            quantized=z + (quantized - z).detach(),  # straight-through estimator
            indices=indices,
            commitment_loss=loss,
        )
        if return_statistics:
            num_codes, dim = codebook.shape
            counts = torch.zeros(num_codes, dtype=torch.float32, device=z.device)
            sums = torch.zeros(num_codes, dim, dtype=torch.float32, device=z.device)
            for vectors, idx in assignments:
                counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
                sums.index_add_(0, idx, vectors.float())
            output.code_counts = counts
            output.code_sums = sums
            # Candidates from every level, so residual levels get re-seeded at residual scale.
            output.features = torch.cat([vectors for vectors, _ in assignments]).float()
            output.level_fit = torch.stack(level_fit) if level_fit else None
        return output

    def assignment_entropy(self, inputs: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """MAGVIT-v2's entropy penalty (Yu et al. 2023) on soft nearest-code assignments of `inputs`
        (N, H, in codebook units) over the searched `codebook` (K, H): mean per-feature entropy
        minus the entropy of the mean assignment. Minimising it makes each feature's choice confident
        while the batch uses many codes, which the hard argmin alone does not ask for: with the
        codebook fixed to LLM rows (iterative at r = 1, frozen), dead-code restarts cannot help.
        Distances are scaled per feature by their spread, so the temperature needs no tuning per
        code length. The distances are recomputed here, not taken from the search: that one is
        detached and chunked, and this term needs the gradient to the features and the projection."""
        flat = inputs.float()
        book = codebook.float()
        distances = (flat * flat).sum(1, keepdim=True) - 2 * flat @ book.t() + (book * book).sum(1)
        logits = -distances / (distances.std(dim=1, keepdim=True).detach() * self.entropy_temperature + 1e-8)
        log_p = logits.log_softmax(dim=1)
        per_feature = -(log_p.exp() * log_p).sum(dim=1).mean()
        mean_p = log_p.exp().mean(dim=0)
        batch = -(mean_p * (mean_p + 1e-12).log()).sum()
        return per_feature - batch

    def lookup(self, indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Code map of indices (B, ĥ, ŵ, D) -> decoder-side features (B, H, latent, latent)."""
        codebook = self.project(codebook)
        scales = [scale.to(codebook.dtype) for scale in self.level_scales(codebook)]
        if self.kind == "hq":
            top, bottom = hq_unpack(indices)
            top_q = (codebook[top] * scales[0]).permute(0, 3, 1, 2)
            bottom_q = (codebook[bottom] * scales[1]).permute(0, 3, 1, 2)
            return F.interpolate(top_q, scale_factor=2, mode="nearest") + bottom_q
        level_scales = torch.stack(scales).reshape(1, 1, 1, -1, 1)
        return (codebook[indices] * level_scales).sum(dim=3).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Learning the unified codebook: the three paradigms
# ----------------------------------------------------------------------------------------------
PARADIGMS = ("frozen", "dual", "iterative")
DUAL_ROW_NORMS = ("free", "llm")
BLEND_SCHEDULES = ("ramp", "constant")


@dataclass
class UniCodeCodebookLearning:
    """How stage I learns the unified codebook: training-only settings, so they are not part of a saved tokenizer's
    config (a trained tokenizer's codebook is the LLM's rows, whichever way it got there).

    Args:
        paradigm: `"frozen"` (the LLM rows, fixed), `"dual"` (alternating copies between tokenizer and LLM) or
            `"iterative"` (EMA k-means pulled toward the LLM rows, the paper's choice; Sec. 3.2).
        ema_decay, ema_eps: EMA k-means statistics (the released code's 0.99 and 1e-5); `ema_decay` also paces the
            fitted level scales.
        blend_schedule: the ratio r of C <- (1 - r) C_ema + r C_llm. `"ramp"`: r rises linearly 0 -> 1 over the
            first `1 - blend_tail_fraction` of training, then stays 1 (released code). `"constant"`: r = 1 -
            `blend_lambda` (the paper's C' = λC + (1-λ)C_llm), then a tail at r = 1.
        blend_lambda: λ of the constant schedule.
        blend_tail_fraction: final fraction of stage I with r = 1, so the codebook ends equal to the LLM rows.
        dead_code_threshold: EMA count below which a code is restarted from a batch feature (0 disables). Affects
            only the EMA estimate, never the LLM rows.
        dual_sync_interval: `"dual"`: steps between codebook exchanges with the LLM.
        dual_row_norm: `"dual"`: `"free"` (the paper's) writes the learned codebook into the LLM rows as it is;
            `"llm"` first scales it to the mean length of the LLM's other rows (the quantizer absorbs the factor
            exactly, so it needs `level_scales` or `norm_handling="normalize"`; docs/results.md measures both).
    """

    paradigm: str = "iterative"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    blend_schedule: str = "ramp"
    blend_lambda: float = 0.99
    blend_tail_fraction: float = 0.1
    dead_code_threshold: float = 0.0
    dual_sync_interval: int = 100
    dual_row_norm: str = "free"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("paradigm", PARADIGMS),
            ("blend_schedule", BLEND_SCHEDULES),
            ("dual_row_norm", DUAL_ROW_NORMS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of {list(allowed)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0.0 <= self.blend_lambda <= 1.0:
            raise ValueError(f"blend_lambda={self.blend_lambda} must be in [0, 1]")
        if not 0.0 <= self.blend_tail_fraction < 1.0:
            raise ValueError(f"blend_tail_fraction={self.blend_tail_fraction} must be in [0, 1)")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={self.dead_code_threshold} must be >= 0 (0 disables restarts)")
        if self.dual_sync_interval < 1:
            raise ValueError(f"dual_sync_interval={self.dual_sync_interval} must be >= 1")

    def check_tokenizer(self, config: UniCodeVisualTokenizerConfig) -> None:
        """Raise if these settings cannot train a tokenizer of `config`."""
        if self.dual_row_norm == "llm" and not (config.level_scales or config.norm_handling == "normalize"):
            raise ValueError(
                "dual_row_norm='llm' rescales the codebook rows, which only level_scales=True or "
                "norm_handling='normalize' can absorb exactly; set one of them or dual_row_norm='free'"
            )


def blend_ratio(learning: UniCodeCodebookLearning, step: int, total_steps: int) -> float:
    """r of C <- (1 - r) C_ema + r C_llm at `step` (0-based) of `total_steps`.

    `ramp` (released code): r grows linearly to exactly 1 at the end of the ramp, then a tail at 1.
    `constant` (paper, C' = λC + (1-λ)C_llm): r = 1 - λ, then the same tail, so both schedules end
    with the codebook equal to the LLM rows.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    ramp_steps = max(1, int(round(total_steps * (1.0 - learning.blend_tail_fraction))))
    if step + 1 >= ramp_steps:
        return 1.0
    if learning.blend_schedule == "ramp":
        return (step + 1) / ramp_steps
    return 1.0 - learning.blend_lambda


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


class UniCodeCodebookTrainer(nn.Module):
    """Training-time state and update rule of the unified codebook (not part of a saved model).

    - `frozen`: the codebook stays the LLM's rows; no update.
    - `iterative` (paper's choice): EMA k-means on the assigned features (decay 0.99, Laplace
      smoothing eps 1e-5, as released), then C <- (1 - r) C_ema + r C_llm — language drives the
      codebook one way, LLM -> tokenizer. At r = 1 the codebook IS the LLM rows, bit for bit.
    - `dual`: the tokenizer learns its own EMA codebook; every `dual_sync_interval` steps the
      trainer writes it into the LLM (`write_embedding_rows`) and, after the LLM's text steps,
      reads the rows back (`load_llm_rows`).

    Cluster statistics are summed over processes before the update, so every rank computes the same
    codebook from the same numbers.
    """

    def __init__(self, learning: UniCodeCodebookLearning, codebook: torch.Tensor):
        super().__init__()
        self.paradigm = learning.paradigm
        self.decay = learning.ema_decay
        self.eps = learning.ema_eps
        self.dead_code_threshold = learning.dead_code_threshold
        # Without restarts, start as if every code had been seen once at its current value, so an
        # unseen code keeps its row (sum / size = row). With restarts, start from zero counts: every
        # code the first batch leaves unused is re-seeded from a feature at once — otherwise a fresh
        # encoder, whose features all point the same way, collapses onto a handful of codes.
        initial_size = 0.0 if self.dead_code_threshold > 0 else 1.0
        size = torch.full((codebook.shape[0],), initial_size, dtype=torch.float32, device=codebook.device)
        self.register_buffer("ema_cluster_size", size)
        self.register_buffer("ema_code_sum", codebook.detach().float() * size.unsqueeze(1))

    @torch.no_grad()
    def update(
        self,
        codebook: torch.Tensor,
        code_counts: torch.Tensor,
        code_sums: torch.Tensor,
        llm_rows: Optional[torch.Tensor] = None,
        ratio: float = 0.0,
        restart_candidates: Optional[torch.Tensor] = None,
        quantizer: Optional["UniCodeQuantizer"] = None,
    ) -> None:
        """Update `codebook` (K, H) in place from one step's statistics.

        The statistics live in the space the search sees; with a `quantizer` that has a codebook
        projection, the EMA estimate is mapped back through its inverse before blending, so the search
        then sees (1 - r)·EMA + r·projection(LLM rows), exactly."""
        if self.paradigm == "frozen":
            return
        counts, sums = code_counts.float().clone(), code_sums.float().clone()
        _all_reduce_sum(counts, sums)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_code_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        if self.dead_code_threshold > 0 and restart_candidates is not None:
            self._restart_dead_codes(restart_candidates, used_now=counts > 0)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (total + codebook.shape[0] * self.eps) * total
        ema_codebook = self.ema_code_sum / smoothed.unsqueeze(1)
        if quantizer is not None:
            ema_codebook = quantizer.unproject(ema_codebook)
        if self.paradigm == "iterative":
            if llm_rows is None:
                raise ValueError("the iterative paradigm needs llm_rows (the LLM's embeddings of codebook_token_ids)")
            if ratio >= 1.0:
                codebook.copy_(llm_rows.detach().to(codebook.dtype))  # exact: the codebook is unified
                return
            ema_codebook = (1.0 - ratio) * ema_codebook + ratio * llm_rows.detach().float()
        codebook.copy_(ema_codebook.to(codebook.dtype))

    def _restart_dead_codes(self, candidates: torch.Tensor, used_now: torch.Tensor) -> None:
        """Re-seed codes whose EMA count fell below the threshold, and that no process used this
        step, from batch features (in codebook units). Rank 0's draw is broadcast so all ranks
        restart identically."""
        dead = ((self.ema_cluster_size < self.dead_code_threshold) & ~used_now).nonzero().squeeze(1)
        if dead.numel() == 0 or candidates.numel() == 0:
            return
        pick = torch.randint(0, candidates.shape[0], (dead.numel(),), device=candidates.device)
        replacement = candidates[pick].float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(replacement, src=0)
        # A re-seeded code starts AT the threshold: unless the next batch uses it, it is re-seeded
        # again from fresh features, so spare codes keep following the moving encoder.
        self.ema_code_sum[dead] = replacement * self.dead_code_threshold
        self.ema_cluster_size[dead] = self.dead_code_threshold

    @torch.no_grad()
    def update_level_scales(self, level_scale: torch.Tensor, level_fit: torch.Tensor) -> None:
        """Move each level's row multiplier toward the least-squares fit of this step's chosen rows
        onto that level's inputs (summed over processes first). Runs under every paradigm: the
        scales are the tokenizer's, never the LLM's, so the codebook stays the LLM rows."""
        fit = level_fit.float().clone()
        _all_reduce_sum(fit)
        target = (fit[:, 0] / fit[:, 1].clamp_min(1e-12)).clamp_min(1e-3)
        level_scale.mul_(self.decay).add_(target.to(level_scale.dtype), alpha=1.0 - self.decay)

    @torch.no_grad()
    def match_row_norm(self, codebook: torch.Tensor, target_norm: float, quantizer: "UniCodeQuantizer") -> float:
        """Dual paradigm with `dual_row_norm="llm"`, before the codebook is written into the LLM: scale
        every row to the mean length `target_norm` of the LLM's own rows, the quantizer absorbing the
        scale exactly. Returns the factor applied.

        Why it is an option: the EMA codebook follows the encoder's features, and with fitted level
        scales nothing pins its length (rows x a, scales / a reconstruct alike). Under the paper's dual
        ("free") the code rows grow far longer than the text rows, so with tied input and output
        embeddings every code token's logit dwarfs the text's and the MLLM stops writing language: the
        paper's finding that the visual codebook moves faster than the text one (Sec. 3.2). "llm" tests
        whether the length alone is to blame (docs/results.md, the previous recipe's ablation)."""
        alpha = float(target_norm) / float(codebook.float().norm(dim=1).mean().clamp_min(1e-12))
        codebook.mul_(alpha)
        quantizer.absorb_row_scale(alpha)
        self.ema_code_sum.mul_(alpha)  # the statistics are in codebook units
        return alpha

    @torch.no_grad()
    def load_llm_rows(
        self, codebook: torch.Tensor, llm_rows: torch.Tensor, quantizer: Optional["UniCodeQuantizer"] = None
    ) -> None:
        """Dual paradigm: take the LLM's rows back as the codebook and restart the EMA from them (in
        the searched space, like the statistics)."""
        codebook.copy_(llm_rows.detach().to(codebook.dtype))
        searched = codebook if quantizer is None else quantizer.project(codebook)
        self.ema_code_sum.copy_(searched.float() * self.ema_cluster_size.unsqueeze(1))


__all__ = [
    "select_codebook_rows",
    "non_code_token_ids",
    "token_ids_to_code_indices",
    "code_indices_to_token_ids",
    "embedding_rows",
    "write_embedding_rows",
    "flatten_code_map",
    "unflatten_code_map",
    "code_coordinates",
    "placeholder_grid",
    "placeholder_coordinates",
    "hq_pack",
    "hq_unpack",
    "image_input_embeddings",
    "nearest_code",
    "usage_statistics",
    "QuantizerOutput",
    "UniCodeQuantizer",
    "UniCodeCodebookLearning",
    "UniCodeCodebookTrainer",
    "blend_ratio",
]
