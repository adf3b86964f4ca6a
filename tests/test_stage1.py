"""Stage I: paradigms end unified, resume is bit-identical, two ranks agree, bad input is named."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from stage1_fixtures import make_tiny_llm, tiny_images, tiny_overrides
from utils_network import free_port, gloo_threads

from training.stage1 import CorruptCheckpointError, StageIArguments, StageITrainer
from training.text_lm import load_text_lm, packed_blocks

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("llm"))


def make_trainer(out, llm_dir, steps=6, paradigm="iterative", quantizer="rq", codebook_size=128, **kw):
    args = StageIArguments(
        output_dir=str(out),
        llm_path=str(llm_dir),
        paradigm=paradigm,
        quantizer=quantizer,
        codebook_size=codebook_size,
        max_steps=steps,
        batch_size=4,
        warmup_steps=2,
        log_every=2,
        sample_every=0,
        checkpoint_every=kw.pop("checkpoint_every", 0),
        eval_images=8,
        vision_overrides=tiny_overrides(),
        dual_sync_interval=kw.pop("dual_sync_interval", 2),
        **kw,
    )
    images = tiny_images()
    _, tokenizer = load_text_lm(llm_dir)
    blocks = packed_blocks(tokenizer, ["the red circle is at the top left"] * 50, 16)
    return StageITrainer(args, images, images[:8], text_blocks=blocks)


@pytest.mark.parametrize("paradigm", ["frozen", "dual", "iterative"])
def test_every_paradigm_ends_with_the_codebook_equal_to_the_llm_rows(tmp_path, llm_dir, paradigm):
    trainer = make_trainer(tmp_path, llm_dir, paradigm=paradigm)
    start = trainer.unwrapped.codebook.clone()
    metrics = trainer.train()
    assert metrics["unified"] and metrics["steps"] == 6
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer_model = AutoModel.from_pretrained(tmp_path / "vision_tokenizer")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm" if paradigm == "dual" else llm_dir)
    ids = torch.tensor(tokenizer_model.config.codebook_token_ids)
    assert torch.equal(tokenizer_model.codebook, llm.get_input_embeddings()(ids))
    if paradigm == "frozen":
        assert torch.equal(tokenizer_model.codebook, start)
    if paradigm == "dual":
        # The dual run really alternated: the LLM was trained on text and now holds the visual codebook.
        assert not torch.equal(tokenizer_model.codebook, start)
        assert any(
            "llm_text_loss" in json.loads(line)
            for line in (tmp_path / "stage1" / "log.jsonl").read_text().splitlines()
        )

    assert (tmp_path / "stage1" / "samples" / "final.png").is_file()
    assert json.loads((tmp_path / "stage1" / "metrics.json").read_text())["psnr"] > 0


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, llm_dir):
    # The GAN and the cell-colour term each bring their own trained module, which the checkpoint must carry too.
    terms = {"gan_weight": 0.1, "cell_colour_weight": 1.0}
    straight = make_trainer(tmp_path / "a", llm_dir, steps=6, **terms)
    straight.train()
    first = make_trainer(tmp_path / "b", llm_dir, steps=6, checkpoint_every=3, **terms)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    del first  # "crash"
    resumed = make_trainer(tmp_path / "b", llm_dir, steps=6, checkpoint_every=3, **terms)
    resumed.train(resume=True)
    a = straight.unwrapped.state_dict()
    b = resumed.unwrapped.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_cell_colour_term_teaches_the_encoder_each_cells_colour(tmp_path, llm_dir):
    """`cell_colour_weight`: a linear map from each cell's quantized vector to its patch's mean colour trains beside
    the tokenizer, its gradient reaches the encoder, and its error is logged; the saved tokenizer does not carry it."""
    plain = make_trainer(tmp_path / "plain", llm_dir)
    coloured = make_trainer(tmp_path / "coloured", llm_dir, cell_colour_weight=1.0)
    logs = [coloured.train_step() for _ in range(4)]
    for _ in range(4):
        plain.train_step()
    assert all(log["cell_colour_mse"] > 0 for log in logs) and logs[-1]["cell_colour_mse"] < logs[0]["cell_colour_mse"]
    plain_encoder, coloured_encoder = plain.unwrapped.encoder.state_dict(), coloured.unwrapped.encoder.state_dict()
    assert any(not torch.equal(plain_encoder[name], coloured_encoder[name]) for name in plain_encoder)
    assert set(plain.unwrapped.state_dict()) == set(coloured.unwrapped.state_dict())


def test_the_cell_colour_term_at_a_finer_resolution_predicts_each_cells_sub_patches(tmp_path, llm_dir):
    """`cell_colour_resolution`: r x r mean colours per cell instead of one, against the image pooled to that grid;
    a resolution that does not divide the cell is refused, naming the argument."""
    trainer = make_trainer(tmp_path / "fine", llm_dir, cell_colour_weight=1.0, cell_colour_resolution=2)
    pixels = torch.rand(2, 3, trainer.config.image_size, trainer.config.image_size) * 2 - 1
    with torch.no_grad():
        latents = trainer.unwrapped(pixels).decoder_latents
        head = trainer.accelerator.unwrap_model(trainer.cell_colour_head)
        predicted = torch.nn.functional.pixel_shuffle(head(latents), 2)
    assert predicted.shape == (2, 3, 2 * trainer.config.latent_grid_size, 2 * trainer.config.latent_grid_size)
    logs = [trainer.train_step() for _ in range(4)]
    assert logs[-1]["cell_colour_mse"] < logs[0]["cell_colour_mse"]
    cell = trainer.config.image_size // trainer.config.latent_grid_size
    with pytest.raises(ValueError, match=f"cell_colour_resolution=3 must divide the {cell} pixels"):
        make_trainer(tmp_path / "bad", llm_dir, cell_colour_weight=1.0, cell_colour_resolution=3)


def test_the_edge_term_weights_the_error_where_the_image_has_outlines(tmp_path, llm_dir):
    """`edge_weight`: the reconstruction error counted again with each pixel weighted by the target's local contrast
    (mean 1 per image): an error on a shape's outline costs, the same error in a flat area does not (the plain MSE
    still counts it), nor does a blank image or a perfect reconstruction; the trainer logs the term, and a negative
    weight is refused."""
    from training.stage1 import edge_weighted_mse

    target = -torch.ones(1, 3, 16, 16)
    target[:, :, 6:10, 6:10] = 1.0  # a small white square on black
    assert float(edge_weighted_mse(target, target)) == 0.0
    on_outline, in_flat_area = target.clone(), target.clone()
    on_outline[:, :, 6, 6] = -1.0  # the square's corner lost
    in_flat_area[:, :, 1, 1] = 1.0  # a speck in the empty background
    assert float(edge_weighted_mse(on_outline, target)) > 0 == float(edge_weighted_mse(in_flat_area, target))
    blank = torch.zeros(1, 3, 16, 16)
    assert float(edge_weighted_mse(blank + 0.5, blank)) == 0.0
    trainer = make_trainer(tmp_path / "edges", llm_dir, edge_weight=1.0)
    logs = [trainer.train_step() for _ in range(2)]
    assert all(log["edge_mse"] > 0 for log in logs)
    with pytest.raises(ValueError, match="edge_weight=-1.0 must be >= 0"):
        make_trainer(tmp_path / "negative", llm_dir, edge_weight=-1.0)


def test_corrupt_checkpoint_on_resume_is_named(tmp_path, llm_dir):
    trainer = make_trainer(tmp_path, llm_dir, steps=4)
    trainer.train_step()
    checkpoint = trainer.save_checkpoint()
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptCheckpointError, match="step-0000001.*delete that folder"):
        make_trainer(tmp_path, llm_dir, steps=4).train(resume=True)


def test_partial_checkpoint_is_never_resumed_from(tmp_path, llm_dir):
    trainer = make_trainer(tmp_path, llm_dir, steps=4)
    trainer.train_step()
    trainer.save_checkpoint()
    partial = tmp_path / "stage1" / "checkpoints" / "step-0000003"
    partial.mkdir()  # a crash mid-write: no COMPLETE marker
    from training.stage1 import latest_checkpoint

    assert latest_checkpoint(tmp_path / "stage1" / "checkpoints").name == "step-0000001"


def test_stage_one_is_the_same_draw_whatever_an_earlier_trainer_left_in_the_process(tmp_path, llm_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    weights = []
    for earlier in ("no", "bf16"):  # nothing ran before, or stage 0's bf16 Trainer did (the demo)
        AcceleratorState._reset_state()
        Accelerator(cpu=True, mixed_precision=earlier)
        trainer = make_trainer(tmp_path / earlier, llm_dir, bf16=True)
        assert trainer.accelerator.mixed_precision == "bf16"  # its own (`bf16=True`), not the earlier one's
        trainer.train()
        weights.append({k: v.clone() for k, v in trainer.unwrapped.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision="bf16")
    assert make_trainer(tmp_path / "fp32", llm_dir, bf16=False).accelerator.mixed_precision == "no"


def test_stage_one_trains_in_the_precision_bf16_auto_resolves_to(tmp_path, llm_dir, monkeypatch):
    """The recipes' `bf16: auto`: bf16 autocast on a CPU with bf16 instructions, float32 on one without."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, expected in (({"amx_bf16": True}, "bf16"), ({}, "no")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: dict(flags))
        trainer = make_trainer(tmp_path / expected, llm_dir, bf16="auto", steps=1)
        assert trainer.accelerator.mixed_precision == expected
        assert trainer.bf16 is (expected == "bf16")


def test_bad_inputs_are_named(tmp_path, llm_dir):
    args = dict(output_dir=str(tmp_path), llm_path=str(llm_dir), max_steps=2, batch_size=4)
    images = tiny_images()
    with pytest.raises(ValueError, match="hidden size 32 but vision_overrides sets code_dim=256.*drop code_dim"):
        StageITrainer(StageIArguments(**args, vision_overrides={**tiny_overrides(), "code_dim": 256}), images, images)
    with pytest.raises(ValueError, match="codebook_size=5000 exceeds the .* usable vocabulary rows"):
        StageITrainer(StageIArguments(**args, codebook_size=5000, vision_overrides=tiny_overrides()), images, images)
    with pytest.raises(ValueError, match="training dataset is empty"):
        StageITrainer(StageIArguments(**args, codebook_size=64, vision_overrides=tiny_overrides()), images[:0], images)
    with pytest.raises(ValueError, match="perceptual_weight > 0 needs LPIPS"):
        StageITrainer(
            StageIArguments(**args, codebook_size=64, perceptual_weight=1.0, vision_overrides=tiny_overrides()),
            images,
            images,
        )
    with pytest.raises(ValueError, match=r"vision_overrides sets \['dual_sync_interval'\].*StageIArguments fields"):
        StageITrainer(
            StageIArguments(**args, codebook_size=64, vision_overrides=tiny_overrides(dual_sync_interval=2)),
            images,
            images,
        )
    with pytest.raises(ValueError, match="dual_row_norm='llm' rescales the codebook rows"):
        overrides = tiny_overrides(level_scales=False, norm_handling="none")
        StageITrainer(
            StageIArguments(**args, codebook_size=64, dual_row_norm="llm", vision_overrides=overrides), images, images
        )


def test_code_width_follows_the_llm(tmp_path, llm_dir, capsys):
    """The tiny preset says code_dim=256; a 32-wide LLM's rows are 32 wide, so the codebook is too."""
    overrides = {k: v for k, v in tiny_overrides().items() if k != "code_dim"}
    args = StageIArguments(
        output_dir=str(tmp_path),
        llm_path=str(llm_dir),
        max_steps=2,
        batch_size=4,
        codebook_size=64,
        vision_overrides=overrides,
    )
    trainer = StageITrainer(args, tiny_images(), tiny_images())
    assert trainer.config.code_dim == 32 and trainer.config.z_channels == 8
    assert "code_dim=32 (preset 'tiny' says 256)" in capsys.readouterr().out


WORKER = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from stage1_fixtures import tiny_images, tiny_overrides
from training.stage1 import StageIArguments, StageITrainer
args = StageIArguments(output_dir=sys.argv[1], llm_path=sys.argv[2], codebook_size=128, max_steps=50, batch_size=8,
                       sample_every=0, checkpoint_every=0, vision_overrides=tiny_overrides(), dead_code_threshold=0.9,
                       cell_colour_weight=1.0)
trainer = StageITrainer(args, tiny_images(), tiny_images()[:8])
for _ in range(4):
    trainer.train_step()  # mid-run: r < 1, so the codebook is the EMA blend, not yet the LLM rows
rank = trainer.accelerator.process_index
torch.save({"world_size": dist.get_world_size(), "codebook": trainer.unwrapped.codebook.detach().clone(),
            "encoder": trainer.unwrapped.encoder.conv_in.weight.detach().clone(),
            "cell_colour_head": trainer.accelerator.unwrap_model(trainer.cell_colour_head).weight.detach().clone()},
           f"{sys.argv[1]}/rank{rank}.pt")
del trainer  # the DDP model holds the gloo group's threads; freed at interpreter exit, they can SIGABRT the rank
from training.distributed import release_process_group
release_process_group()
from utils_network import gloo_threads
assert not gloo_threads(), f"rank {rank}: gloo threads outlive release_process_group: {gloo_threads()}"
"""


def test_two_process_run_keeps_codebooks_bit_identical(tmp_path, llm_dir):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        str(tmp_path),
        str(llm_dir),
        str(REPO / "tests"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in done.stderr  # DDP would copy those grads every step
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert torch.equal(ranks[0]["codebook"], ranks[1]["codebook"])
    assert torch.equal(ranks[0]["encoder"], ranks[1]["encoder"])
    # The cell-colour head is a module beside the model: its gradients must be synced too.
    assert torch.equal(ranks[0]["cell_colour_head"], ranks[1]["cell_colour_head"])


def test_two_process_stage0_writes_one_complete_loadable_text_lm(tmp_path):
    # Every rank used to stage and rename its own copy; transformers writes weights on the main rank only, so the
    # last rename could leave text_lm/ marked COMPLETE with no model in it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "training.cli",
        "train-text",
        "--preset",
        "tiny",
        "--output",
        str(tmp_path),
        "--steps",
        "4",
        "--scenes",
        "50",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "find_unused_parameters=True" not in done.stderr
    folder = tmp_path / "text_lm"
    assert sorted(p.name for p in folder.iterdir()) == [
        "COMPLETE",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "text_lm"]  # no staging copy left behind
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)


@pytest.mark.parametrize("command_fails", [False, True])
def test_cli_joins_the_gloo_threads_before_it_exits(tmp_path, monkeypatch, command_fails):
    # A run under `accelerate launch` whose gloo threads outlive the interpreter can abort after saving everything
    # (SIGABRT, exit status != 0). destroy_process_group() alone does not stop them while a DDP model, caught in a
    # reference cycle or in a failed command's traceback, still holds the group; the CLI must free those first.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import training.cli as cli

    def train(model):
        model(torch.ones(1, 2)).sum().backward()
        if command_fails:
            raise RuntimeError("a step failed")  # this frame, holding the model, is only in this error's traceback

    def command_that_keeps_a_ddp_model_in_a_cycle(args):
        model = DistributedDataParallel(torch.nn.Linear(2, 2))
        cycle = [model]
        cycle.append(cycle)
        try:
            train(model)
        except RuntimeError:
            raise ValueError("no-such-preset") from None  # the step's error stays on as __context__
        return 0

    monkeypatch.setattr(cli, "_cmd_presets", command_that_keeps_a_ddp_model_in_a_cycle)
    before = set(gloo_threads())  # another test's group may still be alive; only this one's threads count
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        started = time.monotonic()  # each thread names itself once it runs, a moment after init returns
        while not set(gloo_threads()) - before and time.monotonic() - started < 30:
            time.sleep(0.01)
        ours = set(gloo_threads()) - before
        assert ours
        if command_fails:
            try:
                cli.main(["presets"])
            except ValueError as error:
                failure = error  # kept, as an uncaught error is until the interpreter exits
            assert "no-such-preset" in str(failure) and failure.__context__.__traceback__ is not None
        else:
            assert cli.main(["presets"]) == 0
        assert not dist.is_initialized()
        assert not ours & set(gloo_threads())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("row_norm", ["free", "llm"])
def test_dual_row_norm_llm_hands_over_rows_as_long_as_the_text_rows(tmp_path, llm_dir, row_norm):
    """Under the paper's dual the codebook reaches the LLM at the length the EMA gave it (far from the
    text rows' here); `dual_row_norm="llm"` hands it over at the text rows' length, still unified."""
    args = StageIArguments(
        output_dir=str(tmp_path),
        llm_path=str(llm_dir),
        paradigm="dual",
        quantizer="rq",
        codebook_size=128,
        max_steps=6,
        batch_size=4,
        warmup_steps=2,
        log_every=2,
        sample_every=0,
        checkpoint_every=0,
        eval_images=8,
        vision_overrides=tiny_overrides(level_scales=True, norm_handling="none"),
        dual_row_norm=row_norm,
        dual_sync_interval=2,
    )
    _, tokenizer = load_text_lm(llm_dir)
    blocks = packed_blocks(tokenizer, ["the red circle is at the top left"] * 50, 16)
    images = tiny_images()
    assert StageITrainer(args, images, images[:8], text_blocks=blocks).train()["unified"]
    from transformers import AutoModel, AutoModelForCausalLM

    codebook = AutoModel.from_pretrained(tmp_path / "vision_tokenizer").codebook
    weight = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").get_input_embeddings().weight
    is_code = torch.zeros(weight.shape[0], dtype=torch.bool)
    is_code[AutoModel.from_pretrained(tmp_path / "vision_tokenizer").config.codebook_token_ids] = True
    ratio = float(codebook.norm(dim=1).mean() / weight[~is_code].norm(dim=1).mean())
    if row_norm == "llm":
        assert ratio == pytest.approx(1.0, rel=0.05)
    else:
        assert ratio > 3.0


def test_stage1_arguments_come_from_the_recipe_once(tmp_path):
    """The CLI and the demo build stage I through `StageIArguments.from_recipe`: the recipe's `stage1`, then the
    caller's values (None keeps the recipe's)."""
    from training.presets import load_recipe
    from training.stage1 import StageIArguments

    recipe = load_recipe("tiny")["stage1"]
    args = StageIArguments.from_recipe(tmp_path, tmp_path / "text_lm", "tiny", learning_rate=None)
    assert (args.max_steps, args.batch_size, args.learning_rate) == (
        recipe["max_steps"],
        recipe["batch_size"],
        recipe["learning_rate"],
    )
    assert StageIArguments.from_recipe(tmp_path, "llm", "tiny", max_steps=7).max_steps == 7
    with pytest.raises(TypeError, match="max_step"):
        StageIArguments.from_recipe(tmp_path, "llm", "tiny", max_step=7)
