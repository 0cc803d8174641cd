"""The training loop on a tiny model: learning, exact resume, crash safety, precision, checkpoint compatibility."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from train_helpers import full_and_resumed, prepared_shakespeare, tiny_config

from toyllm.generation import GenerationConfig, generate_text
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.tokenizer import load_tokenizer
from toyllm.train import Trainer, TrainingDivergedError, train
from toyllm.train.checkpoint import latest_checkpoint, list_checkpoints
from toyllm.train.errors import CheckpointError, DataError, InvalidArgumentError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_shakespeare(tmp_path_factory.mktemp("shakespeare"))


def test_seed_snippet_overfits_one_batch():
    """The seed project's API: the model, torch's AdamW and nn.CrossEntropyLoss on its logits."""
    torch.manual_seed(0)
    # A 1000-word vocabulary keeps this fast; the 50257-word head would dominate every step.
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=1000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # the seed used 1e-4; 1e-2 gets there in CI time
    loss_fn = nn.CrossEntropyLoss()
    batch = torch.randint(0, 1000, (2, 17))
    x, y = batch[:, :-1], batch[:, 1:]
    model.train()
    for _ in range(60):
        logits = model(x)
        loss = loss_fn(logits.view(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()


def test_loss_decreases_on_shakespeare(data, tmp_path):
    result = train(
        tiny_config(data, tmp_path / "run", max_steps=20, eval_interval=20, eval_iters=4, learning_rate=1e-2)
    )
    assert result.steps == 20 and result.tokens == 20 * 4 * 32
    assert result.losses[0] > 10.0  # about ln(50257) = 10.8 at the start
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 2.5
    assert result.val_loss is not None and result.val_loss < 7.8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 21))
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("kind,step,tokens,loss")
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000


def test_resume_continues_bitwise(data, tmp_path):
    """Interrupted at step 3 (after the step-2 checkpoint) and resumed == uninterrupted, bit for bit (on CPU)."""
    options = dict(max_steps=5, eval_interval=2, dropout=0.1, grad_accum=2)  # dropout: the RNG state must resume too
    full, resumed = full_and_resumed(data, tmp_path, **options)
    assert resumed.losses == full.losses[2:]  # exact equality, not allclose
    assert resumed.val_loss == full.val_loss
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1  # the interrupted run's step-3 record was dropped


def test_token_ids_beyond_the_vocabulary_are_one_error(data, tmp_path):
    """A train.bin of the right size whose ids run past the vocabulary (damage, or another tokenizer's data) stopped
    the embedding with an IndexError; now the first batch that holds one is a DataError."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    size = (bad / "train.bin").stat().st_size
    (bad / "train.bin").write_bytes(b"\xff" * size)  # uint16 id 65535, beyond GPT-2's 50257
    with pytest.raises(DataError, match="token id 65535, outside the model's vocabulary of 50257"):
        train(tiny_config(bad, tmp_path / "run", max_steps=1, eval_interval=1))


def test_a_damaged_metrics_log_does_not_stop_resume(data, tmp_path):
    """Lines that are not records (binary junk, a list, a step that is not a number) are dropped on --resume; the
    records around them are kept. (A `[1, 2]` line stopped the resume with an AttributeError.)"""
    run = tmp_path / "run"
    train(tiny_config(data, run, max_steps=2, eval_interval=2))
    log = run / "metrics.jsonl"
    good = log.read_bytes()
    log.write_bytes(good + b"\xff\xfe junk\n[1, 2]\n" + b'{"kind": "train", "step": "three", "loss": 1.0}\n')
    result = train(tiny_config(data, run, max_steps=3, eval_interval=3, resume=True))
    assert result.steps == 3
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_kill_during_save_keeps_previous_checkpoint(data, tmp_path):
    """A process killed (os._exit, no cleanup) in the middle of writing a checkpoint."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from train_helpers import tiny_config
        from toyllm.train import checkpoint, train

        def dying_write(path, state):
            if state["step"] == 4:
                path.write_bytes(b"half a file")
                os._exit(9)
            real(path, state)

        real = checkpoint.write_training_state
        checkpoint.write_training_state = dying_write
        train(tiny_config({str(data)!r}, {str(tmp_path / "run")!r}, max_steps=4, eval_interval=2))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    assert any(p.name.startswith(".step-00000004") for p in (run / "checkpoints").iterdir())  # the torn save
    assert (run / "latest").resolve().name == "step-00000002"
    GPT2LMHeadModel.from_pretrained(run / "latest")  # the previous checkpoint loads
    result = train(tiny_config(data, run, max_steps=4, eval_interval=2, resume=True))
    assert result.steps == 4 and len(result.losses) == 2
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # the torn save was cleaned


def test_keeps_last_k_and_best(data, tmp_path):
    train(tiny_config(data, tmp_path / "run", max_steps=6, eval_interval=2, keep_last=2))
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    best = (tmp_path / "run" / "best").resolve().name
    assert names[-2:] == ["step-00000004", "step-00000006"] and best in names and len(names) <= 3


def test_a_new_run_will_not_overwrite_an_old_one(data, tmp_path):
    """Training into a directory that holds checkpoints, without --resume, is refused before anything is written:
    it would replace the old run's step checkpoints and mix the two runs' `latest` and `best`."""
    run = tmp_path / "run"
    train(tiny_config(data, run, max_steps=2, eval_interval=2))
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(InvalidArgumentError, match="already holds a run's checkpoints.*--resume"):
        train(tiny_config(data, run, max_steps=1, eval_interval=1, seed=7))
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_a_damaged_training_state_is_one_error_on_resume(data, tmp_path):
    """A training_state.pt of the right version but missing a key, or holding the wrong type, stops --resume with a
    CheckpointError naming the key (it was a KeyError halfway through restoring)."""
    from toyllm.train.checkpoint import STATE_FILE

    run = tmp_path / "run"
    train(tiny_config(data, run, max_steps=2, eval_interval=2))
    path = latest_checkpoint(run) / STATE_FILE
    good = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in [("config", None), ("step", "two"), ("rng", {"cpu": 1})]:
        torch.save({**good, key: value} if value is not None else {k: v for k, v in good.items() if k != key}, path)
        with pytest.raises(CheckpointError, match=f"damaged: its '{key}'"):
            train(tiny_config(data, run, max_steps=3, eval_interval=3, resume=True))


def test_a_damaged_vocabulary_stops_a_fine_tune_before_its_first_step(data, tmp_path):
    """The checkpoint being fine-tuned has a broken vocab.json: the run stops at setup with a CheckpointError. It was
    found at the first evaluation, after unsaved steps, or, with samples off, copied into every checkpoint saved."""
    train(tiny_config(data, tmp_path / "base", max_steps=1, eval_interval=1))
    base = tmp_path / "base" / "best"
    (base / "vocab.json").write_text('{"broken": ')
    config = tiny_config(data, tmp_path / "ft", model=str(base), n_layer=None, n_head=None, n_embd=None, max_steps=1)
    for samples in (4, 0):
        with pytest.raises(CheckpointError, match="unreadable tokenizer files"):
            Trainer(dataclasses.replace(config, sample_tokens=samples))
    assert not (tmp_path / "ft").exists()


def test_checkpoint_loads_in_generate_and_transformers(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    train(tiny_config(data, tmp_path / "run", max_steps=2, eval_interval=2))
    path = tmp_path / "run" / "best"
    ours = GPT2LMHeadModel.from_pretrained(path)
    text = generate_text(ours, load_tokenizer(path), "ROMEO:", GenerationConfig(max_new_tokens=5, seed=0))
    assert isinstance(text, str)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_mixed_precision_runs(data, tmp_path, precision):
    result = train(tiny_config(data, tmp_path / "run", precision=precision, max_steps=3, eval_interval=3))
    assert all(math.isfinite(x) for x in result.losses) and result.val_loss is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ).train()
    ids = torch.randint(0, 50257, (2, 16))

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_a_bigger_batch(data, tmp_path):
    big = train(tiny_config(data, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=3, dropout=0.0))
    accum = train(tiny_config(data, tmp_path / "b", batch_size=2, grad_accum=2, max_steps=3, dropout=0.0))
    assert big.losses == pytest.approx(accum.losses, rel=1e-5)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    def poison(trainer: Trainer, record: dict) -> None:
        if record["step"] == 3:
            with torch.no_grad():
                trainer.model.transformer.wte.weight[:] = float("nan")

    with pytest.raises(TrainingDivergedError, match="at step 4") as info:
        Trainer(tiny_config(data, tmp_path / "run", max_steps=6, eval_interval=2), callbacks=[poison]).fit()
    assert info.value.step == 4
    good = latest_checkpoint(tmp_path / "run")
    assert good is not None and good.name == "step-00000002"
    assert not torch.isnan(GPT2LMHeadModel.from_pretrained(good).transformer.wte.weight).any()


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_epochs=math.inf), "num_epochs must be a finite number"),
        (dict(max_steps=None, num_epochs=float("nan")), "num_epochs must be a finite number"),
        (dict(learning_rate=math.inf), "learning_rate must be a finite number"),
        (dict(weight_decay=math.nan), "weight_decay must be a finite number"),
        (dict(grad_clip=math.inf), "grad_clip must be a finite number"),
        (dict(seed=2**64), "seed must be in"),
        (dict(sample_prompt="", sample_tokens=4), "sample prompt is empty"),
    ],
    ids=["epochs-inf", "epochs-nan", "lr-inf", "wd-nan", "clip-inf", "seed", "empty-prompt"],
)
def test_values_that_would_fail_mid_run_are_refused_up_front(tmp_path, override, message):
    """Each of these used to be accepted, then crash or train nonsense later (an empty sample prompt only at the
    first evaluation, after steps that no checkpoint kept)."""
    overrides = {"max_steps": None, **override} if "num_epochs" in override else override
    with pytest.raises(InvalidArgumentError, match=message):
        tiny_config(tmp_path, tmp_path / "run", **overrides).validate()


def test_out_must_be_a_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidArgumentError, match="exists and is not a directory"):
        tiny_config(tmp_path, tmp_path / "afile").validate()


def test_configuration_errors(data, tmp_path):
    with pytest.raises(InvalidArgumentError, match="grad_accum must be >= 1"):
        train(tiny_config(data, tmp_path / "r", grad_accum=0))
    with pytest.raises(DataError, match="not found"):
        train(tiny_config(tmp_path / "missing", tmp_path / "r"))
    with pytest.raises(DataError, match="fewer than one block"):
        train(tiny_config(data, tmp_path / "r", block_size=40_000, n_embd=32))
    train(tiny_config(data, tmp_path / "small", max_steps=1, eval_interval=1))
    with pytest.raises(InvalidArgumentError, match="larger than the model's context of 32"):
        train(
            tiny_config(
                data,
                tmp_path / "ft",
                model=str(tmp_path / "small" / "latest"),
                n_layer=None,
                n_head=None,
                n_embd=None,
                block_size=64,
            )
        )
    finetuned = train(  # fine-tuning a checkpoint: its shape and context (32) are kept
        tiny_config(
            data,
            tmp_path / "ft",
            model=str(tmp_path / "small" / "latest"),
            n_layer=None,
            n_head=None,
            n_embd=None,
            block_size=None,
            max_steps=1,
            eval_interval=1,
        )
    )
    assert finetuned.steps == 1 and GPT2LMHeadModel.from_pretrained(tmp_path / "ft" / "latest").config.n_positions == 32
    with pytest.raises(CheckpointError, match="n_layer=2 but this run asks for n_layer=3"):
        train(tiny_config(data, tmp_path / "small", n_layer=3, resume=True))
    with pytest.raises(CheckpointError, match=r"block_size=32 but this run asks for block_size=\(not given\)"):
        train(tiny_config(data, tmp_path / "small", block_size=None, resume=True))  # it printed 'None'
