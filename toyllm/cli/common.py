"""What the text-generation entry points share: checking options, loading the model, tokenizer and draft, printing.

`toyllm generate` and the seed-compatible scripts (`run_gpt2.py`, `run_gpt2_kv.py`) all go through `run_generate`,
so they validate the same way, fail with the same one-line errors and report the same statistics. Other commands
can reuse the pieces (`check_options`, `load_model`, `load_tokenizer_for`, `load_draft`, `format_stats`).

The order matters for the user: everything that is cheap to check (sampling knobs, prompt, device, dtype) is checked
before the model is loaded, which can mean reading or downloading gigabytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

from toyllm.cli.app import err_console, run_guarded
from toyllm.device import resolve_device, resolve_dtype
from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, GenerationStats, generate_text, stream_text
from toyllm.gpt2.config import PRESET_ALIASES, PRESETS
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.gpt2.weights import HUB_ALIASES
from toyllm.tokenizer import (
    FILE_PAIRS,
    Tokenizer,
    first_different_id,
    hub_cache_folder,
    load_tokenizer,
    looks_like_path,
)

# Names whose vocabulary is standard GPT-2's, cached or not.
GPT2_NAMES = frozenset(PRESETS) | frozenset(PRESET_ALIASES) | frozenset(HUB_ALIASES)

DEFAULT_PROMPT = "Alan Turing theorized that computers would one day become"
DEFAULT_MODEL = "gpt2"


def check_options(
    config: GenerationConfig, prompt: str, device: str = "auto", dtype: str | None = "float32"
) -> tuple[torch.device, torch.dtype | None]:
    """Validate everything that does not need the model; return the resolved (device, dtype).

    Raises `InvalidArgumentError` (one line, exit 2 in the CLI) for an out-of-range knob, an empty prompt, an unknown
    dtype or `cuda` on a machine without CUDA.
    """
    config.validate()
    if prompt == "":
        raise InvalidArgumentError("the prompt is empty: give at least one character of text")
    return resolve_device(device), resolve_dtype(dtype)


def load_model(
    name_or_path: str | Path, device: torch.device, dtype: torch.dtype | None, seed: int | None = None
) -> GPT2LMHeadModel:
    """Load a Hub id, a local checkpoint directory or `random:<preset>`.

    Seeding first makes `random:<preset>` weights repeatable, so `--seed` fixes the whole run, not only sampling.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return GPT2LMHeadModel.from_pretrained(name_or_path, device=device, dtype=dtype)


def load_tokenizer_for(name_or_path: str | Path, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer that belongs to a model: its checkpoint's `vocab.json`/`merges.txt`, else standard GPT-2.

    Call it after `load_model`: for a Hub id the tokenizer files are then in the Hugging Face cache, where
    `load_tokenizer` finds them without another round trip to the Hub.
    """
    return load_tokenizer(override if override is not None else name_or_path)


def check_tokenizer_folder(override: str | Path) -> None:
    """`--tokenizer` names vocabulary files on purpose, so a path without them is an error, not standard GPT-2 (which
    `load_tokenizer` falls back to for a checkpoint that carries weights only). A file means the folder it is in.
    Hub ids are checked by `check_tokenizer_hub_id`, once the model (perhaps that same id) is downloaded; the empty
    name is left to `load_tokenizer`."""
    if str(override) == "":
        return
    path = Path(override).expanduser()
    folder = path.parent if path.is_file() else path
    if path.exists() and not any(
        (folder / ids).is_file() and (folder / merges).is_file() for ids, merges in FILE_PAIRS
    ):
        raise InvalidArgumentError(f"--tokenizer {path}: {folder} holds no vocab.json and merges.txt")


def check_tokenizer_hub_id(override: str | Path) -> None:
    """A bare `--tokenizer NAME` that is no folder: a GPT-2 name (all share standard GPT-2's vocabulary), or a Hub id
    whose vocabulary files are in the local cache. Anything else is most likely a typo, which used to mean standard
    GPT-2 without a word. Asked after the model loads, since loading `--model NAME` is what fetches its files."""
    name = str(override)
    if name == "" or Path(name).expanduser().exists() or looks_like_path(name) or name in GPT2_NAMES:
        return
    if hub_cache_folder(name) is None:  # (HUB_ALIASES' names are GPT-2 names: they returned above)
        raise InvalidArgumentError(
            f"--tokenizer {name}: no such folder, and no Hub tokenizer of that name in the local cache "
            "(give a folder with vocab.json and merges.txt)"
        )


def check_draft_options(
    draft: str | Path | None, draft_layers: int | None, draft_vocab: int | None, draft_vocab_data: str | Path | None
) -> None:
    """Draft options that contradict each other, caught before anything is loaded."""
    if draft is not None and draft_layers is not None:
        raise InvalidArgumentError("give either --draft MODEL or --draft-layers N, not both")
    if draft_vocab_data is not None and draft_vocab is None:
        raise InvalidArgumentError("--draft-vocab-data needs --draft-vocab N, the number of tokens to keep")
    if draft_vocab is not None and draft is None and draft_layers is None:
        raise InvalidArgumentError("--draft-vocab needs a draft (--draft MODEL or --draft-layers N)")


def lookahead_bounds(lookahead: int | None, schedule: str) -> tuple[int, int]:
    """`--lookahead` as (config.lookahead, config.max_lookahead) for a schedule.

    threshold decides K itself, round by round: a `--lookahead` given with it is its cap (as transformers caps its
    confidence-based assistant at num_assistant_tokens), 16 when none is given. heuristic starts at `--lookahead`
    (default 4) and grows up to 16, or to `--lookahead` if that is more; constant uses it every round.
    """
    if schedule == "threshold" and lookahead is not None:
        return lookahead, lookahead
    k = lookahead if lookahead is not None else 4
    return k, max(16, k)


def check_speculative_options(
    has_draft: bool, lookahead: int | None, lookahead_schedule: str | None, kv_cache: bool
) -> None:
    """Options that would be silently ignored: lookahead settings without a draft, no cache with one."""
    if not has_draft and (lookahead is not None or lookahead_schedule is not None):
        raise InvalidArgumentError(
            "--lookahead and --lookahead-schedule set speculative decoding: they need a draft "
            "(--draft MODEL or --draft-layers N)"
        )
    if has_draft and not kv_cache:
        raise InvalidArgumentError("speculative decoding always uses the KV cache: drop --no-kv-cache")


def load_draft(
    model: GPT2LMHeadModel,
    draft: str | Path | None,
    draft_layers: int | None,
    device: torch.device,
    dtype: torch.dtype | None,
    draft_vocab: int | None = None,
    draft_vocab_data: str | Path | None = None,
    eos_token_id: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> GPT2LMHeadModel | None:
    """The draft for speculative decoding: a separate model, the target's first layers, or None (plain decoding).

    `draft_vocab` restricts the draft's output to that many tokens (`GPT2LMHeadModel.restrict_vocab`), the most
    frequent in the prepared directory `draft_vocab_data`, else GPT-2's first ids; plus `eos_token_id` (the end of
    text that generation stops on; default: the model config's), so the draft can propose the end. `tokenizer`, the
    one in use: a separate draft must map every id to the same text (one without vocabulary files counts as
    standard GPT-2, as any model does).
    """
    check_draft_options(draft, draft_layers, draft_vocab, draft_vocab_data)
    if draft is None and draft_layers is None:
        return None
    if draft_layers is not None:
        n_layer = model.config.n_layer
        if not 1 <= draft_layers <= n_layer:
            raise InvalidArgumentError(f"--draft-layers must be in 1..{n_layer} for this model, got {draft_layers}")
        draft_model = model.first_layers(draft_layers)
    else:
        assert draft is not None
        draft_model = GPT2LMHeadModel.from_pretrained(draft, device=device, dtype=dtype)
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise InvalidArgumentError(
                f"the draft '{draft}' has a vocabulary of {draft_model.config.vocab_size} tokens but the model has "
                f"{model.config.vocab_size}; both must share one tokenizer"
            )
        if tokenizer is not None:
            # The draft's vocabulary as generation would take it (its files, else standard GPT-2, as for any model)
            # must agree with the tokenizer in use id for id, or its proposals would mean other text.
            differs = first_different_id(tokenizer, load_tokenizer_for(draft))
            if differs is not None:
                raise InvalidArgumentError(
                    f"the draft '{draft}' has another tokenizer than the one in use (they differ first at id "
                    f"{differs}); both must share one tokenizer"
                )
    if draft_vocab is not None:
        from toyllm.speculative import draft_vocabulary

        c = model.config
        eos = eos_token_id if eos_token_id is not None else c.eos_token_id
        draft_model.restrict_vocab(draft_vocabulary(draft_vocab, c.vocab_size, draft_vocab_data, (eos,)))
    return draft_model


def check_prompt_fits(tokenizer: Tokenizer, model: GPT2LMHeadModel, prompt: str, config: GenerationConfig) -> None:
    """With the window fixed (`--no-window`), a prompt longer than the context is an error worth a precise message."""
    if config.sliding_window:
        return
    n_prompt, window = len(tokenizer.encode(prompt)), model.config.n_positions
    if n_prompt > window:
        raise InvalidArgumentError(
            f"the prompt has {n_prompt} tokens but the model's context window is {window}; "
            "shorten it, or drop --no-window to keep the most recent tokens and go on"
        )


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def format_stats(stats: GenerationStats) -> list[str]:
    """Human-readable timing lines: throughput first, then the speculative statistics when there are any."""
    total = stats.prefill_seconds + stats.decode_seconds
    rate = stats.tokens_per_second
    # No decode rate when every token came with the prefill (one speculative round made them all).
    decode = f"decode {rate:.1f} tokens/s" if math.isfinite(rate) else "decode - (every token came with the prefill)"
    lines = [
        f"{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new tokens in {total:.2f} s | "
        f"time to first token {stats.prefill_seconds * 1000:.1f} ms | {decode}"
    ]
    if stats.extra:
        lines.append("speculative: " + ", ".join(f"{key} {_number(value)}" for key, value in stats.extra.items()))
    return lines


def run_generate(
    prompt: str,
    config: GenerationConfig,
    *,
    model: str | Path = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str | None = "float32",
    tokenizer: str | Path | None = None,
    draft: str | Path | None = None,
    draft_layers: int | None = None,
    draft_vocab: int | None = None,
    draft_vocab_data: str | Path | None = None,
    stream: bool = False,
    out: TextIO | None = None,
    cpu_kernel: bool = False,
    amx: bool = False,
) -> GenerationStats:
    """The whole of `toyllm generate`: check, load, generate, print the prompt and completion, report the stats.

    The text goes to `out` (stdout); statistics go to stderr, so `toyllm generate ... > story.txt` keeps only text.
    """
    out = out if out is not None else sys.stdout
    if cpu_kernel and amx:
        raise InvalidArgumentError("choose one of --cpu-kernel and --amx")
    target_device, target_dtype = check_options(config, prompt, device, dtype)
    check_draft_options(draft, draft_layers, draft_vocab, draft_vocab_data)  # (load_draft checks too, but later)
    if tokenizer is not None:
        check_tokenizer_folder(tokenizer)  # before the model loads
    lm = load_model(model, target_device, target_dtype, config.seed)
    if tokenizer is not None:
        check_tokenizer_hub_id(tokenizer)
    tok = load_tokenizer_for(model, tokenizer)
    draft_model = load_draft(
        lm, draft, draft_layers, target_device, target_dtype, draft_vocab, draft_vocab_data, tok.eos_token_id, tok
    )
    if cpu_kernel:
        from toyllm import kernels

        kernels.enable("--cpu-kernel", *[m for m in (lm, draft_model) if m is not None])
    if amx:
        from toyllm.kernels.amx import use_amx

        for m in (lm, draft_model):  # a self draft shares the target's layers: each is converted once
            if m is not None:
                use_amx(m)
    check_prompt_fits(tok, lm, prompt, config)
    config = dataclasses.replace(config, eos_token_id=tok.eos_token_id)  # this tokenizer's end of text

    stats = GenerationStats()
    if stream:
        out.write(prompt)
        out.flush()
        for piece in stream_text(lm, tok, prompt, config, draft_model=draft_model, stats=stats):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        completion = generate_text(lm, tok, prompt, config, draft_model=draft_model, stats=stats)
        out.write(f"{prompt}{completion}\n")
    out.flush()

    for line in format_stats(stats):
        err_console.print(line, markup=False, soft_wrap=True)
    window = lm.config.n_positions
    if (
        not config.sliding_window
        and stats.new_tokens < config.max_new_tokens
        and stats.prompt_tokens + stats.new_tokens >= window
    ):
        err_console.print(
            f"note: stopped at the context window ({window} tokens); drop --no-window to keep generating",
            markup=False,
            soft_wrap=True,
        )
    return stats


# -- the seed-compatible scripts (`python toyllm/cli/run_gpt2.py`, `run_gpt2_kv.py`) ----------------------------


class ScriptParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: a usage error is one `error:` line and exit code 2 (argparse prints its
    whole usage block first; `--help` still shows it)."""

    def __init__(self, description: str, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (run with --help for the options)\n")


def script_parser(description: str) -> argparse.ArgumentParser:
    """The flags of the original scripts, spelled with underscores as they were; `toyllm generate` has them all."""
    parser = ScriptParser(description)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="Hub id, local checkpoint directory, or random:<preset> (offline)"
    )
    add_generation_arguments(parser, max_new_tokens=100)
    return parser


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The prompt, sampling, device and output flags that every seed script shares."""
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue")
    parser.add_argument(
        "--max_length",
        "--max_new_tokens",
        dest="max_new_tokens",
        type=int,
        default=max_new_tokens,
        help="new tokens to generate",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=50, help="0 disables")
    parser.add_argument("--top_p", type=float, default=1.0, help="in (0, 1]; 1 disables")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="1 disables")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="make the run repeatable (not quite with the threshold schedule at temperature > 0: its draft counts "
        "follow measured timings)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--stream", action="store_true", help="print the completion as it is generated")


def script_config(args: argparse.Namespace, **options: Any) -> GenerationConfig:
    """The `GenerationConfig` of a seed script's parsed sampling flags, plus script-specific `options`."""
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        **options,
    )


def run_script(args: argparse.Namespace, *, use_kv_cache: bool, chunk_size: int | None = None) -> int:
    """Run one of the seed scripts through `run_generate`; returns the exit code (2 with one line on a mistake)."""
    config = script_config(args, use_kv_cache=use_kv_cache, chunk_size=chunk_size)
    return run_guarded(
        lambda: run_generate(
            args.prompt, config, model=args.model, device=args.device, dtype=args.dtype, stream=args.stream
        )
    )
