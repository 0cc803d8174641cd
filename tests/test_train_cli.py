"""`toyllm prepare / train / eval` from the command line: the happy path and one clear error per bad input."""

from __future__ import annotations

import json

import pytest
from train_helpers import prepared_shakespeare

from toyllm.cli.main import run_app

TINY = ["--model", "random:gpt2-tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
QUICK = ["--batch-size", "2", "--eval-iters", "1", "--sample-tokens", "0", "--peak-flops", "1e12", "--no-progress"]
QUICK += ["--no-tensorboard", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_shakespeare(tmp_path_factory.mktemp("cli"), chars=30_000)


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = run_app([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_prepare_train_eval(tmp_path, data, capsys):
    src = tmp_path / "t.txt"
    src.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
    code, out = run(["prepare", "--input", src, "--output", tmp_path / "d", "--no-progress"], capsys)
    assert code == 0 and "train" in out and (tmp_path / "d" / "train.bin").is_file()
    assert "replacing" not in out
    code, again = run(["prepare", "--input", src, "--output", tmp_path / "d", "--no-progress"], capsys)
    assert code == 0 and "(replacing the dataset that was there)" in " ".join(again.split())  # rich wraps lines
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "meta.json").write_text('{"mine": "notes"}')
    code, refused = run(["prepare", "--input", src, "--output", notes, "--no-progress"], capsys)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "not a toyllm dataset" in lines[0], refused
    assert (notes / "meta.json").read_text() == '{"mine": "notes"}' and not (notes / "train.bin").exists()

    argv = [
        "train",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        *TINY,
        *QUICK,
        "--max-steps",
        "2",
        "--eval-interval",
        "2",
    ]
    argv += ["--use_gradient_checkpointing", "--precision", "16"]  # the seed project's spellings
    code, out = run(argv, capsys)
    assert code == 0, out
    assert "done: step 2" in out and (tmp_path / "run" / "best" / "model.safetensors").is_file()

    text = tmp_path / "eval.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate." * 3)
    code, out = run(["eval", "--model", tmp_path / "run" / "best", "--data", text, "--stride", "8", "--json"], capsys)
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens"] > 0 and result["perplexity"] > 1 and result["bits_per_byte"] > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "corpus is empty"),
        (b"fine text\n" * 10 + b"\xc3\x28", "bad.txt is not UTF-8 text: byte 0xc3 at offset 100"),
    ],
)
def test_prepare_rejects_bad_corpus(tmp_path, capsys, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    code, out = run(["prepare", "--input", tmp_path / "bad.txt", "--output", tmp_path / "d", "--no-progress"], capsys)
    assert code == 2 and message in out and "Traceback" not in out


def test_train_errors(tmp_path, data, capsys):
    base = ["train", "--data", data, *TINY, *QUICK, "--max-steps", "1", "--eval-interval", "1"]

    code, out = run(["train", "--data", tmp_path / "nope", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "prepared data directory not found" in out

    code, out = run([*base, "--out", tmp_path / "r", "--grad-accum", "0"], capsys)
    assert code == 2 and "grad_accum must be >= 1" in out

    short = tmp_path / "short.txt"
    short.write_text("Only a few tokens here.", encoding="utf-8")
    assert run(["prepare", "--input", short, "--output", tmp_path / "short", "--no-progress"], capsys)[0] == 0
    code, out = run(["train", "--data", tmp_path / "short", "--out", tmp_path / "r", *TINY[2:]], capsys)
    assert code == 2 and "fewer than one block" in out

    code, out = run([*base, "--out", tmp_path / "ok"], capsys)
    assert code == 0, out
    code, out = run(
        [
            "train",
            "--data",
            data,
            "--out",
            tmp_path / "ft",
            "--model",
            tmp_path / "ok" / "latest",
            "--block-size",
            "64",
        ],
        capsys,
    )
    assert code == 2 and "larger than the model's context of 32" in out

    code, out = run([*base, "--out", tmp_path / "ok", "--resume", "--n-embd", "64"], capsys)
    assert code == 2 and "cannot resume" in out and "n_embd=32" in out


def test_nan_loss_stops_with_its_step(tmp_path, data, capsys):
    """A learning rate of 1e30 wrecks the weights in the first update; the bad weights are never saved."""
    argv = ["train", "--data", data, "--out", tmp_path / "r", *TINY, *QUICK, "--max-steps", "4", "--eval-interval", "1"]
    code, out = run([*argv, "--learning-rate", "1e30", "--warmup-steps", "0"], capsys)
    assert code == 2 and "at step 1" in out and "no checkpoint was saved yet" in out, out
    assert not (tmp_path / "r" / "checkpoints").exists()
