"""Training data: `prepare` turns text into token files, `WindowSampler` draws (x, y) windows from them.

A prepared directory holds three files:

    train.bin   uint16 GPT-2 token ids, documents separated by one EOS token (50256)
    val.bin     the last `val_fraction` of that same token stream
    meta.json   tokenizer, counts, and the sha256 of every input file

Token files are read back with `numpy.memmap`, so a corpus larger than memory trains fine: the operating system
pages in only the windows we touch. `prepare` streams too: it reads each file in blocks, tokenizes the blocks
(in parallel threads when asked) and appends them to disk, so it never holds the corpus in memory either.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toyllm.train.errors import DataError, InvalidArgumentError

FORMAT = "toyllm-tokens"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits: half the disk and page cache of int32
TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"
READ_BLOCK = 1 << 20  # bytes read (and tokenized) at a time

# A split between a character from this set and a following space or newline never changes GPT-2 tokens: its
# pre-tokenizer regex has no piece that holds a non-space character followed by whitespace. So text cut there and
# tokenized piece by piece gives exactly the tokens of the whole text (tests/test_train_data.py checks it).
_SAFE_BEFORE = frozenset(string.ascii_letters + string.digits + string.punctuation)


# -- preparing ---------------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    directory: Path
    train_tokens: int
    val_tokens: int
    documents: int
    meta: dict[str, Any]
    replaced: bool = False  # the folder held a dataset before, which this one replaced


def make_dataset_folder(out: Path, option: str) -> bool:
    """Create the output folder `option` names if need be; return whether it already held a dataset, which a new one
    replaces (file by file, once all are written).

    A `meta.json` there that is not a dataset's is someone else's file: it is refused, not overwritten.
    """
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{option} {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidArgumentError(
            f"{option} {out} holds a {META_FILE} that is not a toyllm dataset's; choose another folder"
        )
    return True


def collect_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named directly, then every non-hidden file under each folder, in sorted (reproducible) order."""
    if not inputs:
        raise InvalidArgumentError("no input given: pass one or more text files or folders with --input")
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"the folder {path} holds no files")
            files.extend(found)
        else:
            raise DataError(f"input not found: {path}")
    return files


def iter_text(path: Path, hasher: Any | None = None, block: int = READ_BLOCK) -> Iterator[str]:
    """Decode a file as UTF-8, block by block. A bad byte is a `DataError` that names the file and byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes read before this block

    def bad(exc: UnicodeDecodeError, buffered: int) -> DataError:
        where = offset - buffered + exc.start
        return DataError(
            f"{path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {where} cannot be decoded "
            "(convert the file to UTF-8, e.g. with iconv)"
        )

    with open(path, "rb") as f:
        while chunk := f.read(block):
            if hasher is not None:
                hasher.update(chunk)
            buffered = len(decoder.getstate()[0])  # bytes of a character split across the previous block
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise bad(exc, buffered) from None
            offset += len(chunk)
            if text:
                yield text
        buffered = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise bad(exc, buffered) from None


def safe_split(text: str) -> int:
    """The last index where `text` can be cut without changing its tokens, or 0 if there is none."""
    end = len(text)
    while True:
        i = max(text.rfind("\n", 0, end), text.rfind(" ", 0, end))
        if i <= 0:
            return 0
        if text[i - 1] in _SAFE_BEFORE:
            return i
        end = i


def iter_pieces(texts: Iterable[str], min_chars: int = READ_BLOCK) -> Iterator[str]:
    """Regroup decoded blocks into pieces of at least `min_chars` characters, each cut at a safe point."""
    buf = ""
    for text in texts:
        buf += text
        if len(buf) >= min_chars:
            cut = safe_split(buf)
            if cut > 0:
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """The tokenizer's `encode`. As in Hugging Face, a literal '<|endoftext|>' in the text becomes the EOS token,
    so a corpus that already separates its documents that way keeps its separators."""
    fn = getattr(tokenizer, "encode", None)
    if not callable(fn):
        raise InvalidArgumentError("the tokenizer has no encode method")
    return fn


def prepare(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    val_fraction: float = 0.05,
    num_workers: int = 1,
    tokenizer: Any | None = None,
    progress: bool = False,
    block: int = READ_BLOCK,
) -> PrepareResult:
    """Tokenize text files (or folders of them) into `output/{train,val}.bin` and `meta.json`.

    Every file is one document; one EOS token separates consecutive documents. The last `val_fraction` of the
    token stream becomes the validation split (like nanoGPT's tinyshakespeare split: the held-out text is a
    contiguous tail, so no training window overlaps it). Same inputs, same options: byte-identical outputs,
    whatever `num_workers` is.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgumentError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_workers < 1:
        raise InvalidArgumentError(f"num_workers must be >= 1, got {num_workers}")
    files = collect_files(inputs)
    if tokenizer is None:
        from toyllm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    encode = _encoder(tokenizer)
    eos = int(tokenizer.eos_token_id)
    out = Path(output).expanduser()
    replaced = make_dataset_folder(out, "--output")
    # Everything is written to temporary files first: a bad input, an error or Ctrl-C while tokenizing leaves an
    # existing prepared directory exactly as it was. Its files are replaced only at the end, once all succeeded.
    stream = out / ".tokens.tmp"  # the whole token stream, then (its tail cut off) the new train.bin
    val_tmp = out / ".val.tmp"

    inputs_meta: list[dict[str, Any]] = []
    total = documents = 0
    max_id = 0
    bar = _ProgressBar(sum(f.stat().st_size for f in files), enabled=progress)
    pool = ThreadPoolExecutor(num_workers) if num_workers > 1 else None
    try:
        with open(stream, "wb") as sink, bar:
            for path in files:
                hasher = hashlib.sha256()
                texts = bar.track(iter_text(path, hasher, block))
                n_doc = 0
                for ids in _encode_all(iter_pieces(texts, block), encode, pool, num_workers):
                    if not ids:
                        continue
                    if n_doc == 0 and documents > 0:
                        sink.write(np.array([eos], dtype=TOKEN_DTYPE).tobytes())
                        total += 1
                    arr = np.asarray(ids, dtype=np.int64)
                    max_id = max(max_id, int(arr.max()))
                    sink.write(arr.astype(TOKEN_DTYPE).tobytes())
                    n_doc += len(ids)
                total += n_doc
                documents += n_doc > 0
                inputs_meta.append(
                    {"path": path.as_posix(), "bytes": path.stat().st_size, "sha256": hasher.hexdigest()}
                )
        if total == 0:
            raise DataError(f"the corpus is empty: no text in {', '.join(str(f) for f in files)}")
        if max(max_id, eos) >= 2**16:
            raise DataError(
                f"token id {max(max_id, eos)} does not fit in uint16; this format needs a vocabulary < 65536"
            )
        n_val = round(total * val_fraction)
        if val_fraction > 0:
            n_val = min(max(n_val, 1), total - 1)
        n_train = total - n_val
        _split_tail(stream, n_train, val_tmp)
        corpus_hash = hashlib.sha256("".join(m["sha256"] for m in inputs_meta).encode()).hexdigest()
        meta = token_files_meta(
            str(getattr(tokenizer, "name", "gpt2")),
            int(getattr(tokenizer, "vocab_size", getattr(tokenizer, "n_vocab", 50257))),
            eos,
            n_train,
            n_val,
            documents,
            val_fraction,
            inputs=inputs_meta,
            sha256=corpus_hash,
        )
        # Only now touch what was there (as `distill` does). Without meta.json the directory is never mistaken for
        # a finished one, so it goes first and comes back last.
        (out / META_FILE).unlink(missing_ok=True)
        os.replace(stream, out / TRAIN_FILE)
        os.replace(val_tmp, out / VAL_FILE)
        _write_json_atomic(out / META_FILE, meta)
    finally:
        if pool is not None:
            pool.shutdown()
        stream.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
    return PrepareResult(out, n_train, n_val, documents, meta, replaced)


def _encode_all(
    pieces: Iterator[str], encode: Callable[[str], list[int]], pool: ThreadPoolExecutor | None, workers: int
) -> Iterator[list[int]]:
    """Encode pieces in order. With a pool, `workers` pieces at a time in threads (tiktoken releases the GIL)."""
    if pool is None:
        yield from map(encode, pieces)
        return
    batch: list[str] = []
    for piece in pieces:
        batch.append(piece)
        if len(batch) == workers:
            yield from pool.map(encode, batch)
            batch = []
    yield from pool.map(encode, batch)


def _split_tail(stream: Path, n_train: int, val_path: Path) -> None:
    """Copy the tokens after `n_train` to `val_path`, then cut them off `stream`: no second copy of train.

    `val_path` is a temporary file: `prepare` moves it into place only once everything else succeeded."""
    start = n_train * np.dtype(TOKEN_DTYPE).itemsize
    with open(stream, "rb") as src, open(val_path, "wb") as dst:
        src.seek(start)
        while chunk := src.read(READ_BLOCK):
            dst.write(chunk)
    os.truncate(stream, start)


def token_files_meta(
    tokenizer: str,
    vocab_size: int,
    eos_token_id: int,
    train_tokens: int,
    val_tokens: int,
    documents: int,
    val_fraction: float,
    **extra: Any,
) -> dict[str, Any]:
    """The meta.json of a prepared directory: what `PreparedData.open` checks, then `extra` (where it came from)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eos_token_id": eos_token_id,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "documents": documents,
        "val_fraction": val_fraction,
        **extra,
    }


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _ProgressBar:
    """A rich progress bar over bytes read; a no-op when disabled (tests, pipes)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.progress: Any = None
        if enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=False
            )
            self.task = self.progress.add_task("tokenizing", total=total)

    def __enter__(self) -> _ProgressBar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def track(self, texts: Iterator[str]) -> Iterator[str]:
        for text in texts:
            if self.progress is not None:
                self.progress.advance(self.task, len(text.encode("utf-8")))
            yield text


# -- reading back ------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """A prepared directory, opened: `train` and `val` are read-only memmaps of token ids."""

    directory: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def open(cls, directory: str | Path) -> PreparedData:
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise DataError(f"prepared data directory not found: {path} (create it with `toyllm prepare`)")
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(
                f"{path} has no {META_FILE}: it is not a prepared directory, or `toyllm prepare` did not finish"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path / META_FILE} is unreadable: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise DataError(f"{path} was not written by this version of `toyllm prepare`; prepare it again")
        splits = {}
        for name, key in ((TRAIN_FILE, "train_tokens"), (VAL_FILE, "val_tokens")):
            file = path / name
            count = meta.get(key)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise DataError(f"{path / META_FILE} has no valid {key}: it is damaged; prepare again")
            expected = count * np.dtype(TOKEN_DTYPE).itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(f"{file} is missing or truncated (meta.json expects {expected} bytes); prepare again")
            # np.memmap refuses empty files; an empty split is an empty array.
            splits[name] = np.memmap(file, dtype=TOKEN_DTYPE, mode="r") if expected else np.zeros(0, TOKEN_DTYPE)
        return cls(path, meta, splits[TRAIN_FILE], splits[VAL_FILE])


def load_tokens(path: str | Path) -> np.ndarray:
    """One token file as a read-only memmap."""
    return np.memmap(Path(path), dtype=TOKEN_DTYPE, mode="r")


# -- sampling ----------------------------------------------------------------------------------------------------


class WindowSampler:
    """Random (x, y) windows of `block_size` tokens, y being x shifted by one.

    Every rank draws the same `batch_size * world_size` start offsets from one seeded generator and keeps its own
    slice of them. So the stream is fixed by the seed alone, each DDP rank sees different windows, and N ranks
    with batch b see exactly the windows one process with batch N * b would: the DDP equivalence test relies
    on it. The generator's state is the data position a checkpoint saves.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(
                f"the data has {len(tokens)} tokens, fewer than one block of {block_size} plus the next token; "
                "use a smaller --block-size or more text"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.vocab_size = vocab_size  # ids at or above it mean a damaged file (checked per batch: a scan of a large
        # train.bin up front would cost seconds per run)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0  # how many batches were drawn: the data position, for logs

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64 tensors on the CPU."""
        n_starts = len(self.tokens) - self.block_size  # a window needs block_size + 1 tokens
        starts = torch.randint(n_starts, (self.batch_size * self.world_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in mine]).astype(np.int64)
        if self.vocab_size is not None and rows.max() >= self.vocab_size:
            where = getattr(self.tokens, "filename", None) or "the token file"
            raise DataError(
                f"{where} holds token id {rows.max()}, outside the model's vocabulary of {self.vocab_size}: "
                "the file is damaged or was prepared for another tokenizer; prepare it again"
            )
        self.batches += 1
        data = torch.from_numpy(rows)  # (b, T + 1)
        return data[:, :-1], data[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches = int(state["batches"])
