"""Unified-codebook quantizers: row selection, layout, nearest-code search, RQ/HQ, paradigms."""

from dataclasses import fields

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_unicode import (
    UniCodeCodebookLearning,
    UniCodeCodebookTrainer,
    UniCodeQuantizer,
    UniCodeVisualTokenizerConfig,
    blend_ratio,
    embedding_rows,
    flatten_code_map,
    hq_pack,
    hq_unpack,
    nearest_code,
    select_codebook_rows,
    token_ids_to_code_indices,
    unflatten_code_map,
    write_embedding_rows,
)


def brute_force_nearest(vectors, codebook):
    distances = torch.cdist(vectors.double(), codebook.double())
    return distances.argmin(dim=1)


@pytest.mark.parametrize("dim,num_codes", [(256, 16384), (4096, 32000)])
def test_nearest_code_matches_float64_brute_force(dim, num_codes):
    generator = torch.Generator().manual_seed(dim)
    codebook = torch.randn(num_codes, dim, generator=generator)
    vectors = torch.randn(48, dim, generator=generator)
    # A small chunk budget forces several chunks, so the chunk boundaries are exercised too.
    ours = nearest_code(vectors, codebook, chunk_bytes=num_codes * 4 * 7)
    assert torch.equal(ours, brute_force_nearest(vectors, codebook))


def test_nearest_code_finds_exact_members():
    codebook = torch.randn(300, 32)
    picks = torch.randint(0, 300, (50,))
    assert torch.equal(nearest_code(codebook[picks], codebook), picks)


def make_quantizer(kind, depth=1, dim=16, **kw):
    """(how the codebook is learned, a quantizer): `kw` holds fields of either."""
    learning_fields = {f.name for f in fields(UniCodeCodebookLearning)}
    learning = UniCodeCodebookLearning(**{k: v for k, v in kw.items() if k in learning_fields})
    tokenizer_fields = {k: v for k, v in kw.items() if k not in learning_fields}
    config = UniCodeVisualTokenizerConfig(
        quantizer=kind, depth=depth, code_dim=dim, codebook_size=64, **tokenizer_fields
    )
    learning.check_tokenizer(config)
    return learning, UniCodeQuantizer(config)


def test_rq_residual_norm_decreases_level_by_level():
    torch.manual_seed(0)
    _, quantizer = make_quantizer("rq", depth=4, dim=8, norm_handling="none")
    codebook = torch.randn(512, 8)
    features = torch.randn(4, 8, 6, 6)
    out = quantizer(features, codebook)
    residual = features.clone()
    norms = [residual.norm()]
    for level in range(4):
        residual = residual - codebook[out.indices[..., level]].permute(0, 3, 1, 2)
        norms.append(residual.norm())
    assert all(later < earlier for earlier, later in zip(norms, norms[1:])), norms
    # The straight-through value equals the sum of the chosen rows.
    assert torch.allclose(out.quantized, features - residual, atol=1e-5)


def test_hq_layout_groups_the_2x2_block_under_each_top_code():
    top = torch.arange(2 * 3 * 3).reshape(2, 3, 3)
    bottom = torch.arange(2 * 6 * 6).reshape(2, 6, 6) + 1000
    codes = hq_pack(top, bottom)
    assert codes.shape == (2, 3, 3, 5)
    # Top position (1, 2) owns bottom pixels rows 2-3, cols 4-5, in raster order.
    assert codes[0, 1, 2].tolist() == [
        top[0, 1, 2],
        bottom[0, 2, 4],
        bottom[0, 2, 5],
        bottom[0, 3, 4],
        bottom[0, 3, 5],
    ]
    back_top, back_bottom = hq_unpack(codes)
    assert torch.equal(back_top, top) and torch.equal(back_bottom, bottom)
    flat = flatten_code_map(codes)
    assert flat[0, :5].tolist() == codes[0, 0, 0].tolist()  # a position's codes are adjacent
    assert torch.equal(unflatten_code_map(flat, 3, 5), codes)


def test_hq_quantizer_reconstructs_from_its_code_map():
    torch.manual_seed(1)
    _, quantizer = make_quantizer("hq", dim=8)
    codebook = torch.randn(64, 8)
    out = quantizer(torch.randn(2, 8, 8, 8), codebook)
    assert out.indices.shape == (2, 4, 4, 5)
    assert torch.allclose(quantizer.lookup(out.indices, codebook), out.quantized, atol=1e-5)


def test_layout_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="batch, 8"):
        unflatten_code_map(torch.zeros(1, 7, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match="depth 5"):
        hq_unpack(torch.zeros(1, 2, 2, 4, dtype=torch.long))


def word_level_tokenizer(num_words=200):
    vocab = {f"w{i}": i for i in range(num_words)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")))
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "</s>"})
    tokenizer.add_tokens(["<extra_1>", "<extra_2>"])  # added, not special: still never codes
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def test_special_and_added_tokens_are_never_codes():
    tokenizer = word_level_tokenizer()
    table = torch.randn(len(tokenizer), 16)
    # Give the special/added rows the most "attractive" norms so a careless rule would pick them.
    banned = sorted(tokenizer.added_tokens_decoder)
    table[banned] = table[banned] / table[banned].norm(dim=1, keepdim=True)
    ids, record = select_codebook_rows(table, codebook_size=150, tokenizer=tokenizer, excluded_token_ids=[0])
    assert len(ids) == 150 and len(set(ids)) == 150
    assert not set(ids) & (set(banned) | {0})
    assert record["rule"] == "smallest_norm_above_quantile"
    all_ids, record = select_codebook_rows(
        table, codebook_size=len(tokenizer) - len(banned) - 1, tokenizer=tokenizer, excluded_token_ids=[0]
    )
    assert record["rule"] == "all_usable_rows" and not set(all_ids) & set(banned)


def test_smallest_norm_rule_and_too_large_codebook():
    norms = torch.linspace(0.1, 1.0, 100)
    table = torch.nn.functional.normalize(torch.randn(100, 8), dim=1) * norms.unsqueeze(1)
    ids, record = select_codebook_rows(table, codebook_size=10, norm_quantile=0.5)
    chosen_norms = table[ids].norm(dim=1)
    assert chosen_norms.min() >= record["norm_threshold"] - 1e-6
    assert chosen_norms.max() <= sorted(table.norm(dim=1).tolist())[60]
    with pytest.raises(ValueError, match="codebook_size=101 exceeds"):
        select_codebook_rows(table, codebook_size=101)


def test_token_ids_to_code_indices_round_trip_and_rejects_non_codes():
    token_ids = torch.tensor([7, 3, 11, 42])
    assert token_ids_to_code_indices(torch.tensor([42, 7, 3]), token_ids).tolist() == [3, 0, 1]
    with pytest.raises(ValueError, match="not visual codes.*5"):
        token_ids_to_code_indices(torch.tensor([3, 5]), token_ids)


def statistics(quantizer, codebook, features):
    out = quantizer(features, codebook, return_statistics=True)
    return out.code_counts, out.code_sums


def test_frozen_codebook_is_bit_identical_after_updates():
    learning, quantizer = make_quantizer("rq", depth=2, paradigm="frozen")
    codebook = torch.randn(64, 16)
    before = codebook.clone()
    trainer = UniCodeCodebookTrainer(learning, codebook)
    for _ in range(5):
        counts, sums = statistics(quantizer, codebook, torch.randn(2, 16, 4, 4))
        trainer.update(codebook, counts, sums, llm_rows=before, ratio=0.3)
    assert torch.equal(codebook, before)


def test_iterative_update_matches_hand_computation():
    learning, quantizer = make_quantizer("vq", paradigm="iterative", ema_decay=0.9, ema_eps=1e-5, norm_handling="none")
    codebook = torch.randn(64, 16)
    llm_rows = torch.randn(64, 16)
    trainer = UniCodeCodebookTrainer(learning, codebook)
    features = torch.randn(2, 16, 4, 4)
    counts, sums = statistics(quantizer, codebook, features)
    # Hand: assignment counts/sums, EMA from (size 1, sum = row), Laplace smoothing, blend r=0.25.
    flat = features.permute(0, 2, 3, 1).reshape(-1, 16)
    assign = torch.cdist(flat.double(), codebook.double()).argmin(1)
    hand_counts = torch.bincount(assign, minlength=64).float()
    hand_sums = torch.zeros(64, 16).index_add_(0, assign, flat)
    assert torch.equal(counts, hand_counts) and torch.allclose(sums, hand_sums, atol=1e-5)
    size = 0.9 * torch.ones(64) + 0.1 * hand_counts
    total_sum = 0.9 * codebook + 0.1 * hand_sums
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 64 * 1e-5) * n
    expected = 0.75 * total_sum / smoothed.unsqueeze(1) + 0.25 * llm_rows
    trainer.update(codebook, counts, sums, llm_rows=llm_rows, ratio=0.25)
    assert torch.allclose(codebook, expected, atol=1e-5)


@pytest.mark.parametrize("schedule", ["ramp", "constant"])
def test_schedules_end_bit_identical_to_llm_rows(schedule):
    learning, quantizer = make_quantizer(
        "rq", depth=2, paradigm="iterative", blend_schedule=schedule, blend_lambda=0.9
    )
    codebook = torch.randn(64, 16)
    llm_rows = torch.randn(64, 16) * 0.3
    trainer = UniCodeCodebookTrainer(learning, codebook)
    total = 20
    ratios = [blend_ratio(learning, step, total) for step in range(total)]
    for ratio in ratios:
        counts, sums = statistics(quantizer, codebook, torch.randn(2, 16, 4, 4))
        trainer.update(codebook, counts, sums, llm_rows=llm_rows, ratio=ratio)
    assert ratios[-1] == 1.0 and ratios[0] < 1.0
    if schedule == "ramp":
        assert all(a <= b for a, b in zip(ratios, ratios[1:]))
    else:
        assert ratios[0] == pytest.approx(0.1)
    assert torch.equal(codebook, llm_rows)


def test_dual_writes_and_reads_rows_of_a_real_llama_embedding_table():
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    embedding = llama.get_input_embeddings()
    token_ids = torch.arange(100, 164)
    learning, quantizer = make_quantizer("vq", paradigm="dual")
    codebook = embedding_rows(embedding, token_ids).detach().clone()
    trainer = UniCodeCodebookTrainer(learning, codebook)
    untouched = embedding.weight[:100].detach().clone()
    for _ in range(3):
        counts, sums = statistics(quantizer, codebook, torch.randn(2, 16, 4, 4))
        trainer.update(codebook, counts, sums)
    assert not torch.equal(codebook, embedding_rows(embedding, token_ids))  # the tokenizer learned on its own
    write_embedding_rows(embedding, token_ids, codebook)
    assert torch.equal(embedding.weight[token_ids], codebook)
    assert torch.equal(embedding.weight[:100], untouched)  # text rows untouched
    with torch.no_grad():  # the LLM trains on text and moves the rows...
        embedding.weight[token_ids] += 0.01
    trainer.load_llm_rows(codebook, embedding_rows(embedding, token_ids))  # ...and they come back
    assert torch.equal(codebook, embedding.weight[token_ids])
    assert torch.allclose(trainer.ema_code_sum / trainer.ema_cluster_size.unsqueeze(1), codebook, atol=1e-6)


def test_scaled_embeddings_round_trip_through_write_and_read():
    class ScaledEmbedding(torch.nn.Embedding):
        def __init__(self, *args, embed_scale=4.0):
            super().__init__(*args)
            self.embed_scale = embed_scale

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    embedding = ScaledEmbedding(50, 8)
    ids = torch.tensor([3, 9, 20])
    rows = torch.randn(3, 8)
    write_embedding_rows(embedding, ids, rows)
    assert torch.allclose(embedding_rows(embedding, ids), rows, atol=1e-6)


def test_usage_statistics_count_codes():
    from modeling_unicode import usage_statistics

    usage, perplexity = usage_statistics(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert usage == 0.5 and perplexity == pytest.approx(2.0)


def test_dead_code_restarts_reseed_unused_codes_from_features():
    learning, quantizer = make_quantizer("vq", paradigm="iterative", dead_code_threshold=0.05, norm_handling="none")
    codebook = torch.randn(64, 16)
    trainer = UniCodeCodebookTrainer(learning, codebook)
    out = quantizer(torch.randn(1, 16, 2, 2), codebook, return_statistics=True)  # 4 vectors: >= 60 codes unused
    trainer.update(
        codebook,
        out.code_counts,
        out.code_sums,
        llm_rows=torch.zeros(64, 16),
        ratio=0.0,
        restart_candidates=out.features,
    )
    used = out.code_counts > 0
    # Every unused code now sits on one of the batch's features (up to Laplace smoothing).
    nearest_feature_distance = torch.cdist(codebook[~used], out.features).min(dim=1).values
    assert nearest_feature_distance.max() < 1e-3 * out.features.norm(dim=1).min()
    assert torch.allclose(codebook[used], out.code_sums[used] / out.code_counts[used].unsqueeze(1), rtol=1e-2)


def test_level_scales_let_a_fixed_codebook_quantize_residuals_at_their_own_scale():
    # Features are 3·row_a + 1·row_b: rows of one fixed length cannot express either part, a
    # fitted multiplier per RQ level can.
    torch.manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    rows = codebook.clone()
    pick = torch.randint(0, 64, (2, 2, 4, 4))
    features = (3 * codebook[pick[0]] + codebook[pick[1]]).permute(0, 3, 1, 2)

    def residual_error(level_scales):
        learning, quantizer = make_quantizer(
            "rq", depth=2, paradigm="frozen", norm_handling="none", level_scales=level_scales, ema_decay=0.5
        )
        trainer = UniCodeCodebookTrainer(learning, codebook)
        for _ in range(30 if level_scales else 0):
            out = quantizer(features, codebook, return_statistics=True)
            trainer.update_level_scales(quantizer.level_scale, out.level_fit)
        out = quantizer(features, codebook)
        return float((out.quantized - features).pow(2).mean()), quantizer

    plain, _ = residual_error(False)
    fitted, quantizer = residual_error(True)
    assert quantizer.level_scale[0] == pytest.approx(3.0, rel=0.1) and quantizer.level_scale[1] == pytest.approx(
        1.0, rel=0.2
    )
    assert fitted < 0.05 * plain
    assert torch.equal(codebook, rows)  # the rows themselves never move


def test_codebook_projection_learns_from_the_codebook_loss_and_iterative_blends_through_it():
    torch.manual_seed(0)
    learning, quantizer = make_quantizer("vq", paradigm="iterative", norm_handling="none", codebook_projection=True)
    with torch.no_grad():
        quantizer.codebook_projection.weight.copy_(torch.eye(16) + 0.1 * torch.randn(16, 16))
        quantizer.codebook_projection.bias.normal_(0, 0.1)
    codebook, llm_rows = torch.randn(64, 16), torch.randn(64, 16)
    features = torch.randn(2, 16, 4, 4)
    out = quantizer(features, codebook, return_statistics=True)
    out.commitment_loss.backward()
    assert quantizer.codebook_projection.weight.grad.abs().sum() > 0  # the search metric learns
    with torch.no_grad():  # an encoder-only forward adds no codebook loss
        plain = quantizer(features, codebook).commitment_loss
        searched = quantizer.project(codebook)
        assert plain == pytest.approx(
            float(0.25 * (features - searched[out.indices[..., 0]].permute(0, 3, 1, 2)).pow(2).mean()), rel=1e-5
        )
    trainer = UniCodeCodebookTrainer(learning, codebook)
    trainer.update(codebook, out.code_counts, out.code_sums, llm_rows=llm_rows, ratio=0.25, quantizer=quantizer)
    size = trainer.ema_cluster_size
    smoothed = (size + 1e-5) / (size.sum() + 64 * 1e-5) * size.sum()
    ema = trainer.ema_code_sum / smoothed.unsqueeze(1)
    with torch.no_grad():  # the search sees (1 - r)·EMA + r·projection(LLM rows)
        assert torch.allclose(quantizer.project(codebook), 0.75 * ema + 0.25 * quantizer.project(llm_rows), atol=1e-4)
    trainer.update(codebook, out.code_counts, out.code_sums, llm_rows=llm_rows, ratio=1.0, quantizer=quantizer)
    assert torch.equal(codebook, llm_rows)  # and the codebook ends as the LLM rows themselves


@pytest.mark.parametrize("kind,depth,norm_handling", [("rq", 2, "none"), ("vq", 1, "normalize"), ("hq", 5, "none")])
def test_match_row_norm_rescales_the_rows_and_keeps_every_decoder_input(kind, depth, norm_handling):
    """Dual paradigm: the rows handed to the LLM take the LLM's row length, and neither the codes nor
    the quantized latent change (the projection bias and level scales absorb the factor)."""
    torch.manual_seed(0)
    learning, quantizer = make_quantizer(
        kind, depth=depth, paradigm="dual", norm_handling=norm_handling, level_scales=True, codebook_projection=True
    )
    with torch.no_grad():
        quantizer.codebook_projection.weight.add_(0.1 * torch.randn(16, 16))
        quantizer.codebook_projection.bias.normal_()
        quantizer.level_scale.copy_(torch.tensor([3.0, 1.5])[: quantizer.level_scale.numel()])
    codebook = 40.0 * torch.randn(64, 16)  # drifted far from LLM-sized rows
    features = 20.0 * torch.randn(2, 16, 8, 8)
    before = quantizer(features, codebook)
    trainer = UniCodeCodebookTrainer(learning, codebook)
    alpha = trainer.match_row_norm(codebook, 0.75, quantizer)
    assert alpha < 0.1 and torch.isclose(codebook.norm(dim=1).mean(), torch.tensor(0.75), rtol=1e-4)
    after = quantizer(features, codebook)
    assert torch.equal(after.indices, before.indices)
    assert torch.allclose(after.quantized, before.quantized, rtol=1e-4, atol=1e-4)


def test_dual_row_norm_llm_needs_a_quantizer_that_can_absorb_the_scale():
    with pytest.raises(ValueError, match="dual_row_norm='llm'.*level_scales=True"):
        make_quantizer("vq", paradigm="dual", norm_handling="none", level_scales=False, dual_row_norm="llm")
    with pytest.raises(ValueError, match="dual_row_norm='often'.*'free', 'llm'"):
        make_quantizer("vq", paradigm="dual", dual_row_norm="often")
    _, quantizer = make_quantizer("vq", paradigm="dual", norm_handling="none", level_scales=False)
    with pytest.raises(ValueError, match="level_scales=True"):
        quantizer.absorb_row_scale(0.5)


def test_entropy_term_spreads_assignments_and_only_trains():
    """The assignment-entropy term: per-feature entropy minus batch entropy of the soft assignments,
    added only in training; descending it moves features from one shared code to many."""
    torch.manual_seed(0)
    learning, quantizer = make_quantizer(
        "rq", depth=2, norm_handling="none", entropy_weight=1.0, entropy_temperature=0.1
    )
    codebook = torch.randn(64, 16)
    features = (0.05 * torch.randn(2, 16, 4, 4) + codebook[3].reshape(1, 16, 1, 1)).requires_grad_(True)
    plain_config, plain = make_quantizer("rq", depth=2, norm_handling="none")
    with torch.no_grad():
        baseline = float(plain(features, codebook).commitment_loss)
    quantizer.train()
    loss = quantizer(features, codebook).commitment_loss
    flat_features = features.permute(0, 2, 3, 1).reshape(-1, 16)
    entropy = quantizer.assignment_entropy(flat_features / quantizer.level_scales(codebook)[0], codebook)
    assert float(loss.detach()) == pytest.approx(baseline + float(entropy.detach()), rel=1e-5)
    # By hand: every feature close to code 3 -> confident and identical assignments, batch entropy ~ 0.
    d = torch.cdist(flat_features.detach(), codebook).pow(2)
    p = (-d / (d.std(1, keepdim=True) * 0.1)).softmax(1)
    expected = -(p * p.clamp_min(1e-30).log()).sum(1).mean() + (p.mean(0) * (p.mean(0) + 1e-12).log()).sum()
    assert float(entropy.detach()) == pytest.approx(float(expected), abs=1e-4)
    quantizer.eval()
    with torch.no_grad():
        assert float(quantizer(features, codebook).commitment_loss) == pytest.approx(
            baseline, rel=1e-6
        )  # eval: no term
    # Gradient descent on the term alone spreads the batch over more codes.
    quantizer.train()
    moving = features.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([moving], lr=0.05)
    before = len(set(quantizer(moving.detach(), codebook).indices[..., 0].flatten().tolist()))
    for _ in range(100):
        optimizer.zero_grad()
        quantizer.assignment_entropy(moving.permute(0, 2, 3, 1).reshape(-1, 16), codebook).backward()
        optimizer.step()
    after = len(set(quantizer(moving.detach(), codebook).indices[..., 0].flatten().tolist()))
    assert before == 1 and after >= 3


def test_entropy_settings_are_validated():
    with pytest.raises(ValueError, match="entropy_weight=-0.1 must be >= 0"):
        UniCodeVisualTokenizerConfig(entropy_weight=-0.1)
    with pytest.raises(ValueError, match="entropy_temperature=0.0 must be > 0"):
        UniCodeVisualTokenizerConfig(entropy_temperature=0.0)
