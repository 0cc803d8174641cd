"""`toyllm prepare`, `toyllm train` and `toyllm eval`: thin wrappers over `toyllm.train`.

Torch and the training code are imported inside the commands, so `toyllm --help` answers at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from toyllm.cli.app import app, err_console

MODEL, BATCH, OPTIM, SPEED, EVAL = "Model", "Batch and length", "Optimisation", "Speed and memory", "Evaluation, logs"

PREPARE_HELP = """Tokenize text files (or folders of them) into DIR/train.bin, DIR/val.bin and DIR/meta.json.

Every file is a document; documents are joined with the EOS token. The last --val-fraction of the tokens is the
validation split. The corpus is streamed, never held in memory, and the same input always gives the same files.

  toyllm prepare --input ../shared/data/tinyshakespeare.txt --output runs/data/shakespeare
"""

TRAIN_HELP = """Train GPT-2 on a directory written by `toyllm prepare`, on one CPU/GPU or, under torchrun, several.

[bold]Examples[/bold]

  toyllm train --data runs/data/shakespeare --out runs/shakespeare --model random:gpt2 --n-layer 6 --n-head 6 \\
      --n-embd 384 --block-size 256 --batch-size 8 --max-steps 600 --learning-rate 1e-3

  toyllm train --data data/mytext --out runs/ft --model gpt2 --learning-rate 3e-5 --max-steps 200   (fine-tune)

  torchrun --nproc_per_node 4 -m toyllm.cli.main train --data ... --out ...      (DDP, one process per GPU)

Run the same command again with --resume to continue from the newest checkpoint in --out.
"""

EVAL_HELP = """Perplexity of a model on a text file or a prepared directory (its val.bin), with a sliding window.

Prints tokens scored, mean loss (nats/token), perplexity and bits per byte.

  toyllm eval --model gpt2 --data wiki.test.raw --stride 512

  toyllm eval --model runs/shakespeare/best --data runs/data/shakespeare
"""


@app.command(help=PREPARE_HELP, no_args_is_help=True)
def prepare(
    inputs: Annotated[
        list[Path], typer.Option("--input", "-i", help="A text file or folder; repeat for several.", show_default=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.", show_default=False)],
    val_fraction: Annotated[float, typer.Option(help="Share of tokens held out for validation.")] = 0.05,
    num_workers: Annotated[int, typer.Option(help="Threads tokenizing in parallel.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    from toyllm.train.data import prepare as run_prepare

    result = run_prepare(inputs, output, val_fraction=val_fraction, num_workers=num_workers, progress=progress)
    err_console.print(
        f"wrote {result.directory}{_REPLACED if result.replaced else ''}: {result.train_tokens:,} train + "
        f"{result.val_tokens:,} val tokens from {result.documents} document(s)"
    )


# Said out loud: a resumed run reading that folder would train on the new tokens.
_REPLACED = " (replacing the dataset that was there)"


@app.command(help=TRAIN_HELP, no_args_is_help=True)
def train(
    data: Annotated[str, typer.Option(help="Directory written by `toyllm prepare`.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "--out-dir", help="Run directory: checkpoints, logs, loss curve.")] = (
        "runs/train"
    ),
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="random:<preset> to start from scratch (gpt2, gpt2-tiny, ...), or a checkpoint directory or Hub "
            "id to fine-tune.",
            rich_help_panel=MODEL,
        ),
    ] = "random:gpt2",
    n_layer: Annotated[int | None, typer.Option(help="Override the preset's layers.", rich_help_panel=MODEL)] = None,
    n_head: Annotated[int | None, typer.Option(help="Override the preset's heads.", rich_help_panel=MODEL)] = None,
    n_embd: Annotated[int | None, typer.Option(help="Override the preset's width.", rich_help_panel=MODEL)] = None,
    block_size: Annotated[
        int | None,
        typer.Option(help="Tokens per window (a random model's context length too).", rich_help_panel=MODEL),
    ] = None,
    dropout: Annotated[
        float | None, typer.Option(help="Dropout everywhere; default: the model's.", rich_help_panel=MODEL)
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", "--batch_size", help="Sequences per micro-batch, per process.", rich_help_panel=BATCH
        ),
    ] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=BATCH)] = 1,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default 1000).", rich_help_panel=BATCH)
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Or: training tokens.", rich_help_panel=BATCH)] = None,
    num_epochs: Annotated[
        float | None,
        typer.Option(
            "--num-epochs", "--num_epochs", help="Or: passes' worth of train.bin tokens.", rich_help_panel=BATCH
        ),
    ] = None,
    learning_rate: Annotated[
        float,
        typer.Option("--learning-rate", "--learning_rate", "--lr", help="Peak learning rate.", rich_help_panel=OPTIM),
    ] = 6e-4,
    min_lr_ratio: Annotated[float, typer.Option(help="Final LR as a share of the peak.", rich_help_panel=OPTIM)] = 0.1,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.", rich_help_panel=OPTIM)] = 100,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", "--weight_decay", help="AdamW decay on matrices.", rich_help_panel=OPTIM)
    ] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm; 0 disables.", rich_help_panel=OPTIM)] = 1.0,
    precision: Annotated[
        str, typer.Option(help="32, bf16 or 16 (mixed precision with autocast).", rich_help_panel=SPEED)
    ] = "32",
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            "--use_gradient_checkpointing",
            help="Recompute activations in backward: less memory, about 1/3 more compute.",
            rich_help_panel=SPEED,
        ),
    ] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.", rich_help_panel=SPEED)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=SPEED)] = "auto",
    eval_interval: Annotated[
        int, typer.Option(help="Steps between evaluations and checkpoints.", rich_help_panel=EVAL)
    ] = 250,
    eval_iters: Annotated[int, typer.Option(help="Validation batches per evaluation.", rich_help_panel=EVAL)] = 20,
    log_interval: Annotated[int, typer.Option(help="Steps between console lines.", rich_help_panel=EVAL)] = 10,
    sample_tokens: Annotated[
        int, typer.Option(help="Sample length at each evaluation; 0: none.", rich_help_panel=EVAL)
    ] = 64,
    sample_prompt: Annotated[str, typer.Option(help="Prompt of the samples.", rich_help_panel=EVAL)] = "\n",
    save_interval: Annotated[int | None, typer.Option(help="Steps between checkpoints.", rich_help_panel=EVAL)] = None,
    keep_last: Annotated[int, typer.Option(help="Checkpoints kept (plus the best).", rich_help_panel=EVAL)] = 2,
    tensorboard: Annotated[bool, typer.Option(help="Log to TensorBoard if installed.", rich_help_panel=EVAL)] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.", rich_help_panel=EVAL)] = True,
    peak_flops: Annotated[float | None, typer.Option(help="Peak FLOP/s for MFU.", rich_help_panel=EVAL)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of init, dropout and data order.")] = 1337,
) -> None:
    from toyllm.train import TrainConfig
    from toyllm.train import train as run_train

    config = TrainConfig(
        data=data,
        out_dir=out,
        model=model,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        dropout=dropout,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        max_tokens=max_tokens,
        num_epochs=num_epochs,
        learning_rate=learning_rate,
        min_lr_ratio=min_lr_ratio,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        compile=compile,
        device=device,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        log_interval=log_interval,
        sample_tokens=sample_tokens,
        sample_prompt=sample_prompt,
        save_interval=save_interval,
        keep_last=keep_last,
        tensorboard=tensorboard,
        progress=progress,
        peak_flops=peak_flops,
        resume=resume,
        seed=seed,
    )
    result = run_train(config)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process trains; rank 0 alone reports, as it logs
        return
    val = f", val loss {result.val_loss:.4f} (perplexity {result.val_perplexity:.2f})" if result.val_loss else ""
    err_console.print(
        f"done: step {result.steps}, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s{val}; "
        f"checkpoints in {result.run_dir}"
    )


@app.command(name="eval", help=EVAL_HELP, no_args_is_help=True)
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint directory, Hub id or random:<preset>.")],
    data: Annotated[Path, typer.Option(help="A text file, or a directory from `toyllm prepare`.", show_default=False)],
    stride: Annotated[
        int | None, typer.Option(help="Tokens the window moves each step; default: half the window (512 for GPT-2).")
    ] = None,
    max_length: Annotated[int | None, typer.Option(help="Window length; default: the model's context.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Evaluate only the first N tokens.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    from rich.progress import Progress

    from toyllm.device import resolve_device, resolve_dtype
    from toyllm.gpt2.model import GPT2LMHeadModel
    from toyllm.tokenizer import load_tokenizer
    from toyllm.train.evaluate import check_window, load_eval_tokens, perplexity

    target, torch_dtype = resolve_device(device), resolve_dtype(dtype)  # cheap checks before loading anything
    check_window(stride, max_length)
    tokenizer = load_tokenizer(model)
    ids = load_eval_tokens(data, tokenizer, max_tokens)
    lm = GPT2LMHeadModel.from_pretrained(model, device=target, dtype=torch_dtype)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("evaluating", total=ids.numel())
        result = perplexity(lm, ids, tokenizer, stride, max_length, lambda end: bar.update(task, completed=end))
    if as_json:
        typer.echo(json.dumps({"model": model, "data": str(data), **result.to_dict()}))
        return
    typer.echo(f"tokens        {result.tokens:,}")
    typer.echo(f"loss          {result.loss:.4f} nats/token")
    typer.echo(f"perplexity    {result.perplexity:.3f}")
    typer.echo(f"bits/byte     {result.bits_per_byte:.4f}")
    typer.echo(f"windows       {result.windows} (length {result.max_length}, stride {result.stride})")


DISTILL_HELP = """Write distillation data for a speculative draft: the teacher's own continuations of real prompts.

Cuts --sequences random prompts of --prompt-len tokens from DIR's train split, lets the teacher continue each by
--new-tokens (greedy by default: the draft is then trained on exactly what greedy speculative decoding will ask it
to guess), and writes prompt + continuation in the format of `toyllm prepare`. Train the draft on it as usual:

  toyllm distill --teacher runs/shakespeare-6x384/best --data runs/data/shakespeare --out runs/data/distill-6x384

  toyllm train --data runs/data/distill-6x384 --model runs/shakespeare-draft-2x128/best --out runs/draft-distilled
"""


@app.command(help=DISTILL_HELP, no_args_is_help=True)
def distill(
    teacher: Annotated[str, typer.Option(help="The target model: checkpoint directory, Hub id or random:<preset>.")],
    data: Annotated[Path, typer.Option(help="Directory from `toyllm prepare`; prompts come from its train split.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write.", show_default=False)],
    sequences: Annotated[int, typer.Option(help="How many prompts to continue.")] = 1024,
    prompt_len: Annotated[int, typer.Option(help="Real tokens per prompt.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Tokens the teacher writes per prompt.")] = 160,
    batch_size: Annotated[int, typer.Option(help="Prompts continued together.")] = 16,
    temperature: Annotated[float, typer.Option(help="0 is greedy (what greedy speculative decoding needs).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the prompt positions and of sampling.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of sequences held out for validation.")] = 0.05,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    cpu_kernel: Annotated[
        bool, typer.Option("--cpu-kernel", help="Generate through toyllm's AVX2 kernel (batches up to 32).")
    ] = False,
) -> None:
    from rich.progress import Progress

    from toyllm import kernels
    from toyllm.device import resolve_device, resolve_dtype
    from toyllm.gpt2.model import GPT2LMHeadModel
    from toyllm.sampling import validate_sampling
    from toyllm.train.distill import distill_data

    validate_sampling(temperature, 0, 1.0, 1.0)
    target, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    lm = GPT2LMHeadModel.from_pretrained(teacher, device=target, dtype=torch_dtype).eval()
    if cpu_kernel:
        kernels.enable("--cpu-kernel", lm)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("teacher writing", total=sequences)
        result = distill_data(
            lm,
            data,
            out,
            sequences=sequences,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            seed=seed,
            val_fraction=val_fraction,
            teacher_name=teacher,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    err_console.print(
        f"wrote {result.directory}{_REPLACED if result.replaced else ''}: {result.train_tokens:,} train + "
        f"{result.val_tokens:,} val tokens, {result.sequences} sequences by {teacher} in {result.seconds:.0f} s"
    )
