"""`toyllm distill`: the teacher's own continuations, written in the format `toyllm train` reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import prepared_shakespeare, tiny_config

from toyllm.cli.main import run_app
from toyllm.generation import GenerationConfig, generate
from toyllm.gpt2.config import GPT2Config
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.train import train
from toyllm.train.data import PreparedData
from toyllm.train.distill import distill_data
from toyllm.train.errors import DataError, InvalidArgumentError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_shakespeare(tmp_path_factory.mktemp("distill"), chars=20_000)


@pytest.fixture(scope="module")
def teacher() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_positions=24, n_embd=16, n_layer=1, n_head=2)).eval()


def test_sequences_are_prompts_from_train_and_the_teachers_greedy_continuations(data, teacher, tmp_path) -> None:
    P, N, S = 6, 30, 7  # 6 + 30 tokens pass the 24-token window: the teacher slides it, as plain generation does
    result = distill_data(teacher, data, tmp_path / "d", sequences=S, prompt_len=P, new_tokens=N, batch_size=3)
    out = PreparedData.open(result.directory)  # readable as a prepared directory
    assert out.meta["distilled"]["sequences"] == S and out.meta["documents"] == S
    n_val = 1  # round(7 * 0.05) = 0, but a split asked for gets at least one sequence
    assert len(out.train) == (S - n_val) * (P + N) + (S - n_val - 1)  # one EOS between sequences
    assert len(out.val) == n_val * (P + N)
    source = PreparedData.open(data)
    starts = torch.randint(0, len(source.train) - P, (S,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = np.concatenate([out.train, [50256], out.val]).astype(np.int64)
    greedy = GenerationConfig(max_new_tokens=N, temperature=0.0, eos_token_id=None)
    for i, start in enumerate(starts):
        row = stream[i * (P + N + 1) : i * (P + N + 1) + P + N]
        prompt = torch.from_numpy(source.train[start : start + P].astype(np.int64))[None]
        assert np.array_equal(row[:P], prompt[0].numpy())  # a real prompt from the train split
        with torch.inference_mode():
            assert np.array_equal(row, generate(teacher, prompt, greedy)[0].numpy())  # the teacher's own greedy text


def test_distill_errors(data, teacher, tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="must differ"):
        distill_data(teacher, data, data, sequences=2)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"mine": "notes"}')
    with pytest.raises(InvalidArgumentError, match="not a toyllm dataset"):  # someone else's file: not overwritten
        distill_data(teacher, data, foreign, sequences=2)
    assert (foreign / "meta.json").read_text() == '{"mine": "notes"}' and sorted(foreign.iterdir()) == [
        foreign / "meta.json"
    ]
    with pytest.raises(InvalidArgumentError, match="sequences"):
        distill_data(teacher, data, tmp_path / "x", sequences=0)
    with pytest.raises(InvalidArgumentError, match="sequences must be in 1..2"):  # was an overflow inside torch
        distill_data(teacher, data, tmp_path / "x", sequences=10**20)
    with pytest.raises(InvalidArgumentError, match="seed must be in"):
        distill_data(teacher, data, tmp_path / "x", sequences=2, seed=10**20)
    assert not (tmp_path / "x" / "meta.json").exists()
    small = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=24, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(DataError, match="vocabulary of 50257"):
        distill_data(small, data, tmp_path / "y", sequences=2)


def test_a_failed_run_leaves_the_previous_data_intact(data, teacher, tmp_path) -> None:
    first = distill_data(teacher, data, tmp_path / "d", sequences=3, prompt_len=4, new_tokens=4, batch_size=2)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_data(teacher, data, tmp_path / "d", sequences=5, prompt_len=4, new_tokens=8, progress=interrupt)
    again = PreparedData.open(tmp_path / "d")  # still the first run's complete, consistent files
    assert again.meta == json.loads(json.dumps(first.meta)) and len(again.train) == first.train_tokens
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_distill_command_then_train_a_draft_on_it(data, tmp_path, capsys) -> None:
    argv = ["distill", "--teacher", "random:gpt2-tiny", "--data", data, "--out", tmp_path / "d", "--sequences", "4"]
    argv += ["--prompt-len", "8", "--new-tokens", "24", "--batch-size", "2", "--device", "cpu"]
    code = run_app([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "wrote" in err and "4 sequences" in err and "replacing" not in err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["distilled"]["teacher"] == "random:gpt2-tiny" and meta["train_tokens"] == 3 * 32 + 2
    result = train(tiny_config(tmp_path / "d", tmp_path / "run", block_size=16, max_steps=2, eval_interval=2))
    assert result.steps == 2 and np.isfinite(result.val_loss)
    capsys.readouterr()

    code = run_app([str(a) for a in argv])  # the same folder again: replaced, and said so
    assert code == 0 and "(replacing the dataset that was there)" in " ".join(capsys.readouterr().err.split())

    code = run_app([str(a) for a in [*argv[:5], "--out", tmp_path / "e", "--temperature=-1"]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "temperature" in lines[0], err
