"""`toyllm prepare` and the window sampler: token round trip, determinism, errors, per-rank windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toyllm.tokenizer import load_tokenizer
from toyllm.train.data import PreparedData, WindowSampler, iter_pieces, prepare, safe_split
from toyllm.train.errors import DataError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip("tinyshakespeare.txt is not in ../shared/data")
    return SHAKESPEARE.read_text(encoding="utf-8")[:200_000]


def test_prepare_round_trips_tokens_in_small_blocks(tmp_path, tok, text):
    src = tmp_path / "a.txt"
    src.write_text(text, encoding="utf-8")
    # Tiny read blocks force many cuts: the streamed tokens must equal tokenizing the whole text at once.
    result = prepare([src], tmp_path / "out", val_fraction=0.1, tokenizer=tok, block=4096)
    data = PreparedData.open(result.directory)
    streamed = np.concatenate([data.train, data.val]).tolist()
    assert streamed == tok.encode(text)
    assert tok.decode(streamed) == text
    assert result.val_tokens == round(len(streamed) * 0.1)
    assert data.meta["inputs"][0]["sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()


def test_prepare_is_deterministic_whatever_the_workers(tmp_path, tok, text):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(text[i * 20_000 : (i + 1) * 20_000], encoding="utf-8")
    outputs = []
    for run, workers in enumerate((1, 3, 1)):
        out = tmp_path / f"out{run}"
        prepare([tmp_path / "docs"], out, tokenizer=tok, num_workers=workers, block=2048)
        outputs.append({name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")})
    assert outputs[0] == outputs[1] == outputs[2]


def test_documents_are_separated_by_one_eos(tmp_path, tok):
    for name, body in (("1.txt", "First document."), ("2.txt", ""), ("3.txt", "Second one.")):
        (tmp_path / name).write_text(body, encoding="utf-8")
    result = prepare(
        [tmp_path / "1.txt", tmp_path / "2.txt", tmp_path / "3.txt"], tmp_path / "o", val_fraction=0, tokenizer=tok
    )
    tokens = PreparedData.open(result.directory).train.tolist()
    assert tokens == tok.encode("First document.") + [tok.eos_token_id] + tok.encode("Second one.")
    assert result.documents == 2


def test_safe_split_never_cuts_inside_a_pretoken(tok):
    text = "Hello  world!\n\n  It's 42 o'clock.\n   end"
    for end in range(1, len(text) + 1):
        cut = safe_split(text[:end])
        if cut:
            assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text)
    assert "".join(iter_pieces(iter(["ab cd", " ef\n", "gh"]), min_chars=2)) == "ab cd ef\ngh"


def test_non_utf8_names_file_and_offset(tmp_path, tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"x" * 5000 + "é".encode() + b"\xff tail")
    with pytest.raises(DataError, match=r"bad\.txt is not UTF-8.*0xff at offset 5002"):
        prepare([bad], tmp_path / "o", tokenizer=tok, block=4096)


def test_failed_prepare_leaves_the_old_directory_intact(tmp_path, tok):
    """A bad input (here not UTF-8) must not cost the good data already prepared in the same directory."""
    (tmp_path / "good.txt").write_text("some good text to prepare " * 20, encoding="utf-8")
    prepare([tmp_path / "good.txt"], tmp_path / "o", tokenizer=tok)
    before = PreparedData.open(tmp_path / "o")
    tokens = np.concatenate([before.train, before.val]).tolist()
    files = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    (tmp_path / "bad.bin").write_bytes(b"fine text, then " + b"\xff\xfe" * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        prepare([tmp_path / "bad.bin"], tmp_path / "o", tokenizer=tok, block=8)
    after = PreparedData.open(tmp_path / "o")
    assert np.concatenate([after.train, after.val]).tolist() == tokens
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == files  # no temporary file left either


def test_empty_corpus_and_missing_input(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="corpus is empty.*empty.txt"):
        prepare([tmp_path / "empty.txt"], tmp_path / "o", tokenizer=tok)
    with pytest.raises(DataError, match="input not found"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o", tokenizer=tok)
    with pytest.raises(DataError, match="not found"):
        PreparedData.open(tmp_path / "missing")


def test_truncated_token_file_is_detected(tmp_path, tok):
    (tmp_path / "a.txt").write_text("some text to prepare " * 20, encoding="utf-8")
    prepare([tmp_path / "a.txt"], tmp_path / "o", tokenizer=tok)
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    with open(tmp_path / "o" / "train.bin", "r+b") as f:
        f.truncate(meta["train_tokens"] * 2 - 2)
    with pytest.raises(DataError, match="truncated"):
        PreparedData.open(tmp_path / "o")


def test_sampler_is_seeded_shifted_and_split_across_ranks():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = WindowSampler(tokens, 16, 4, seed=1).next_batch()
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    again, _ = WindowSampler(tokens, 16, 4, seed=1).next_batch()
    assert torch.equal(x, again)
    assert not torch.equal(x, WindowSampler(tokens, 16, 4, seed=2).next_batch()[0])
    # Two ranks with batch 2 see the two halves of one process's batch of 4: the DDP equivalence relies on it.
    r0, _ = WindowSampler(tokens, 16, 2, seed=1, rank=0, world_size=2).next_batch()
    r1, _ = WindowSampler(tokens, 16, 2, seed=1, rank=1, world_size=2).next_batch()
    assert torch.equal(torch.cat([r0, r1]), x) and not torch.equal(r0, r1)


def test_sampler_state_resumes_the_stream():
    tokens = np.arange(500, dtype=np.uint16)
    a = WindowSampler(tokens, 8, 2, seed=3)
    a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()[0]
    b = WindowSampler(tokens, 8, 2, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[0], expected)


def test_corpus_shorter_than_a_block():
    with pytest.raises(DataError, match="fewer than one block"):
        WindowSampler(np.arange(10, dtype=np.uint16), 16, 2, seed=0)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda meta: [], "not written by this version"),  # JSON, but not an object
        (lambda meta: {k: v for k, v in meta.items() if k != "train_tokens"}, "no valid train_tokens"),
        (lambda meta: {**meta, "val_tokens": "many"}, "no valid val_tokens"),
    ],
    ids=["a-list", "no-count", "count-not-a-number"],
)
def test_damaged_meta_is_a_one_line_error(tmp_path, tok, damage, message):
    (tmp_path / "a.txt").write_text("some text to prepare " * 20, encoding="utf-8")
    prepare([tmp_path / "a.txt"], tmp_path / "o", tokenizer=tok)
    meta_file = tmp_path / "o" / "meta.json"
    meta_file.write_text(json.dumps(damage(json.loads(meta_file.read_text()))))
    with pytest.raises(DataError, match=message):
        PreparedData.open(tmp_path / "o")
