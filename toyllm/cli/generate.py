"""`toyllm generate` and `toyllm download`: text generation from the command line, a thin layer over the library.

The heavy imports (torch, the model) happen inside the commands, so that `toyllm --help` and usage errors answer
at once instead of after importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toyllm.cli.app import app

SAMPLING = "Sampling"
DECODING = "Decoding"
MODEL = "Model"
SPECULATIVE = "Speculative decoding"

GENERATE_HELP = """Continue PROMPT with GPT-2 and print the prompt followed by the completion.

The text goes to stdout; timing (prompt tokens, new tokens, time to first token, decode tokens/s) goes to stderr.
Every mistake (a bad option value, an unknown model, a broken checkpoint, no network) is one line and exit code 2.

[bold]Examples[/bold]

  toyllm generate "Alan Turing theorized that" --max-new-tokens 50 --temperature 0.7 --top-p 0.9 --seed 0

  toyllm generate "Once upon a time" --stream --stop $'\\n\\n'      (stop at the first blank line; bash quoting)

  toyllm generate "Hello" --model gpt2-medium --draft gpt2 --lookahead 4      (speculative decoding)

  toyllm generate "Hello" --model gpt2-medium --draft-layers 6                 (self-speculative)

[bold]Offline[/bold] (no Hugging Face Hub needed)

  toyllm generate "Hello" --model random:gpt2 --seed 0      (random weights: checks the pipeline, prints noise)

  toyllm generate "Hello" --model ./checkpoints/my-gpt2     (a directory with config.json and model.safetensors)

  HF_HUB_OFFLINE=1 toyllm generate "Hello" --model gpt2     (a model already in the Hugging Face cache)
"""


@app.command(help=GENERATE_HELP, no_args_is_help=True)
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue.", show_default=False)],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Hub id (gpt2, gpt2-medium, openai-community/gpt2-xl), a local checkpoint directory, "
            "or random:<preset> (gpt2, gpt2-tiny, ...) for random weights.",
            rich_help_panel=MODEL,
        ),
    ] = "gpt2",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="How many tokens to generate (at most).")
    ] = 100,
    temperature: Annotated[
        float, typer.Option(help="Softmax temperature; 0 is greedy.", rich_help_panel=SAMPLING)
    ] = 1.0,
    top_k: Annotated[
        int, typer.Option(help="Sample among the k most likely tokens; 0 disables.", rich_help_panel=SAMPLING)
    ] = 50,
    top_p: Annotated[
        float,
        typer.Option(
            help="Nucleus sampling: the smallest set reaching this probability, in (0, 1].", rich_help_panel=SAMPLING
        ),
    ] = 1.0,
    repetition_penalty: Annotated[
        float, typer.Option(help="> 1 makes tokens already seen less likely; 1 disables.", rich_help_panel=SAMPLING)
    ] = 1.0,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Make the run repeatable (sampling, and random:<preset> weights). Not quite with "
            "--lookahead-schedule threshold at a temperature above 0: its draft counts follow measured timings.",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            "--stop",
            metavar="TEXT",
            help="Stop when the completion contains this text (repeatable).",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Print the completion as it is generated.")
    ] = False,
    kv_cache: Annotated[
        bool,
        typer.Option(
            "--kv-cache/--no-kv-cache",
            help="Reuse past keys/values (fast); --no-kv-cache recomputes everything at each step (the reference).",
            rich_help_panel=DECODING,
        ),
    ] = True,
    chunk_size: Annotated[
        int | None,
        typer.Option(
            help="Prefill the prompt in chunks of this many tokens (less peak memory).", rich_help_panel=DECODING
        ),
    ] = None,
    window: Annotated[
        bool,
        typer.Option(
            "--window/--no-window",
            help="Past the context window, keep the most recent tokens and go on; --no-window makes a too-long "
            "prompt an error and stops at the window.",
            rich_help_panel=DECODING,
        ),
    ] = True,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.", rich_help_panel=MODEL)
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.", rich_help_panel=MODEL)] = "float32",
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="A directory with vocab.json and merges.txt; default: the model's own, else standard GPT-2.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    draft: Annotated[
        str | None,
        typer.Option(
            help="A smaller model that proposes tokens for the main one to verify (same tokenizer).",
            rich_help_panel=SPECULATIVE,
        ),
    ] = None,
    draft_layers: Annotated[
        int | None,
        typer.Option(help="Self-speculative: draft with the model's own first N layers.", rich_help_panel=SPECULATIVE),
    ] = None,
    draft_vocab: Annotated[
        int | None,
        typer.Option(
            help="The draft scores only this many tokens, the most frequent ones (a cheaper draft; still exact).",
            rich_help_panel=SPECULATIVE,
        ),
    ] = None,
    draft_vocab_data: Annotated[
        Path | None,
        typer.Option(
            help="A directory from `toyllm prepare` or `toyllm distill` to count token frequencies in "
            "(default: GPT-2's id order, which follows its BPE merges).",
            rich_help_panel=SPECULATIVE,
        ),
    ] = None,
    lookahead: Annotated[
        int | None,
        typer.Option(
            help="Tokens the draft proposes per round: always (constant), to start with (heuristic, then up to 16 or "
            "this), at most (threshold).",
            show_default="4; threshold: 16",
            rich_help_panel=SPECULATIVE,
        ),
    ] = None,
    lookahead_schedule: Annotated[
        str | None,
        typer.Option(
            help="constant, heuristic (grow/shrink with acceptance) or threshold (stop drafting when unsure).",
            show_default="constant",
            rich_help_panel=SPECULATIVE,
        ),
    ] = None,
    cpu_kernel: Annotated[
        bool,
        typer.Option(
            "--cpu-kernel",
            help="Decode through toyllm's AVX2 (and AVX-512) matrix-vector kernel (compiled on first use; CPU only).",
            rich_help_panel=MODEL,
        ),
    ] = False,
    amx: Annotated[
        bool,
        typer.Option(
            "--amx",
            help="Run every Linear on AMX tiles in bfloat16 (Intel Xeon CPUs with AMX; compiled on first use).",
            rich_help_panel=MODEL,
        ),
    ] = False,
) -> None:
    from toyllm.cli.common import check_speculative_options, lookahead_bounds, run_generate
    from toyllm.generation import GenerationConfig

    check_speculative_options(draft is not None or draft_layers is not None, lookahead, lookahead_schedule, kv_cache)
    schedule = lookahead_schedule if lookahead_schedule is not None else "constant"
    lookahead, cap = lookahead_bounds(lookahead, schedule)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
        use_kv_cache=kv_cache,
        chunk_size=chunk_size,
        sliding_window=window,
        lookahead=lookahead,
        lookahead_schedule=schedule,
        max_lookahead=cap,
    )
    run_generate(
        prompt,
        config,
        model=model,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        draft=draft,
        draft_layers=draft_layers,
        draft_vocab=draft_vocab,
        draft_vocab_data=draft_vocab_data,
        stream=stream,
        cpu_kernel=cpu_kernel,
        amx=amx,
    )


@app.command(no_args_is_help=True)
def download(
    name: Annotated[str, typer.Argument(help="A Hub id such as gpt2, gpt2-medium or openai-community/gpt2-xl.")],
    cache_dir: Annotated[
        str | None, typer.Option(help="Where to store it; default: the Hugging Face cache (HF_HUB_CACHE).")
    ] = None,
) -> None:
    """Fetch a model (weights and tokenizer files) ahead of time and print the local directory it landed in.

    Later runs find it in the cache, also offline (HF_HUB_OFFLINE=1). The weights are checked against the Hub's sha256.

    [bold]Example[/bold]

      toyllm download gpt2-medium
    """
    from toyllm.gpt2.weights import download as fetch

    typer.echo(str(fetch(name, cache_dir=cache_dir)))
