"""Distillation data for a speculative draft: text written by the target itself.

A draft is only useful when it guesses what the *target* will say next (its acceptance rate), not what the
training text says. Sequence-level knowledge distillation (Kim & Rush 2016) trains the student on the teacher's
own outputs; for speculative drafts, DistillSpec (Zhou et al. 2024) found such on-policy data to be the main lever.
At temperature 0 the target's greedy continuations are exactly the contexts and next tokens the draft will be
judged on, so training on them with the plain next-token loss optimises the greedy acceptance rate directly.

`distill_data` cuts random prompts from a prepared directory's *train* split, lets the teacher continue each
(batched, with the KV cache and the sliding window of plain generation) and writes prompt + continuation, one
document per sequence, in the format of `toyllm prepare`. So `toyllm train --data OUT --model DRAFT` fine-tunes
the draft on it with nothing new in the trainer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toyllm.errors import check_count
from toyllm.generation import GenerationConfig, generate
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.sampling import validate_seed
from toyllm.train.data import (
    META_FILE,
    TOKEN_DTYPE,
    TRAIN_FILE,
    VAL_FILE,
    PreparedData,
    _write_json_atomic,
    make_dataset_folder,
    token_files_meta,
)
from toyllm.train.errors import DataError, InvalidArgumentError


@dataclass
class DistillResult:
    directory: Path
    train_tokens: int
    val_tokens: int
    sequences: int
    seconds: float
    meta: dict[str, Any]
    replaced: bool = False  # the folder held a dataset before, which this one replaced


def distill_data(
    teacher: GPT2LMHeadModel,
    data: str | Path,
    output: str | Path,
    *,
    sequences: int = 1024,
    prompt_len: int = 32,
    new_tokens: int = 160,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    val_fraction: float = 0.05,
    teacher_name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> DistillResult:
    """Write `sequences` teacher continuations of prompts from `data`'s train split to `output`, as `prepare` does.

    Each sequence is `prompt_len` real tokens and then `new_tokens` the teacher wrote (greedy at temperature 0,
    else sampled without top-k); EOS does not end it early. The last `val_fraction` of the sequences (whole ones,
    at least one when `val_fraction > 0` and there are two or more) are the validation split.
    `progress(done, total)` is called after every batch.
    """
    for name, value in (("sequences", sequences), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        check_count(name, value)
    check_count("batch_size", batch_size)
    validate_seed(seed)
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgumentError(f"val_fraction must be in [0, 1), got {val_fraction}")
    source = PreparedData.open(data)
    if len(source.train) <= prompt_len:
        raise DataError(
            f"{source.directory} has {len(source.train)} train tokens, too few for {prompt_len}-token prompts"
        )
    if teacher.config.vocab_size >= 2**16:
        raise DataError(f"a vocabulary of {teacher.config.vocab_size} does not fit the uint16 token files")
    data_vocab = int(source.meta.get("vocab_size", teacher.config.vocab_size))
    if data_vocab > teacher.config.vocab_size:
        raise DataError(
            f"{source.directory} was tokenized with a vocabulary of {data_vocab} tokens, but the teacher has only "
            f"{teacher.config.vocab_size}; prepare the data with the teacher's tokenizer"
        )
    out = Path(output).expanduser()
    if out.resolve() == source.directory.resolve():
        raise InvalidArgumentError("--out must differ from --data: distilling would overwrite its own prompts")
    replaced = make_dataset_folder(out, "--out")

    device = next(teacher.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(source.train) - prompt_len, (sequences,), generator=generator).tolist()
    eos = int(source.meta.get("eos_token_id", 50256))
    n_val = min(max(round(sequences * val_fraction), 1), sequences - 1) if val_fraction > 0 else 0
    n_train = sequences - n_val
    tmp = {name: out / f".{name}.tmp" for name in (TRAIN_FILE, VAL_FILE)}
    counts = {TRAIN_FILE: 0, VAL_FILE: 0}
    begin = time.perf_counter()
    try:
        with open(tmp[TRAIN_FILE], "wb") as train_sink, open(tmp[VAL_FILE], "wb") as val_sink:
            for first in range(0, sequences, batch_size):
                rows = starts[first : first + batch_size]
                prompts = np.stack([source.train[s : s + prompt_len] for s in rows]).astype(np.int64)
                config = GenerationConfig(
                    max_new_tokens=new_tokens,
                    temperature=temperature,
                    top_k=0,
                    seed=seed + first,
                    eos_token_id=None,  # the teacher may write EOS; the draft should learn that too
                )
                with torch.inference_mode():
                    ids = generate(teacher, torch.from_numpy(prompts).to(device), config)  # (b, prompt + new)
                for i, row in enumerate(ids.cpu().numpy()):
                    name = TRAIN_FILE if first + i < n_train else VAL_FILE
                    sink = train_sink if name == TRAIN_FILE else val_sink
                    if counts[name]:
                        sink.write(np.array([eos], dtype=TOKEN_DTYPE).tobytes())  # one EOS between documents
                        counts[name] += 1
                    sink.write(row.astype(TOKEN_DTYPE).tobytes())
                    counts[name] += len(row)
                if progress is not None:
                    progress(min(first + batch_size, sequences), sequences)
        # Only now touch what was there: a failed run leaves an earlier distillation intact. Without meta.json the
        # directory is never mistaken for a finished one, so it goes first and comes back last.
        (out / META_FILE).unlink(missing_ok=True)
        for name in (TRAIN_FILE, VAL_FILE):
            os.replace(tmp[name], out / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    seconds = time.perf_counter() - begin
    meta = token_files_meta(
        source.meta.get("tokenizer", "gpt2"),
        teacher.config.vocab_size,
        eos,
        counts[TRAIN_FILE],
        counts[VAL_FILE],
        sequences,
        val_fraction,
        distilled={
            "teacher": teacher_name,
            "prompts_from": source.directory.as_posix(),
            "prompts_sha256": source.meta.get("sha256"),
            "sequences": sequences,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "temperature": temperature,
            "seed": seed,
            "seconds": round(seconds, 1),
        },
    )
    _write_json_atomic(out / META_FILE, meta)
    return DistillResult(out, counts[TRAIN_FILE], counts[VAL_FILE], sequences, seconds, meta, replaced)
