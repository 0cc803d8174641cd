"""The training loop: `Trainer(config).fit()`, or `train(config)`. The `toyllm train` command is a thin wrapper.

One optimizer step, in order:
  1. `grad_accum` micro-batches: forward under autocast, cross-entropy, backward of loss / grad_accum
     (DDP averages gradients across processes on the last micro-batch only: `no_sync` skips the others);
  2. the mean loss over micro-batches and ranks is checked: NaN or inf stops the run before any update;
  3. unscale (fp16), clip the global gradient norm, AdamW step, learning-rate schedule step;
  4. every `eval_interval` steps: validation loss and perplexity, a text sample, the loss curve, a checkpoint.

Everything random is seeded and saved in checkpoints: the model init (seed), dropout (torch's RNG, per rank) and
the data windows (the sampler's own generator). That is what makes `--resume` continue bitwise-identically.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from toyllm.gpt2.config import GPT2Config
from toyllm.gpt2.model import GPT2Attention, GPT2LMHeadModel
from toyllm.train import checkpoint as ckpt
from toyllm.train import ddp
from toyllm.train.config import ARCHITECTURE_FIELDS, DEFAULT_MAX_STEPS, EXACTNESS_FIELDS, TrainConfig
from toyllm.train.data import PreparedData, WindowSampler
from toyllm.train.errors import CheckpointError, DataError, InvalidArgumentError, TrainingDivergedError
from toyllm.train.metrics import MetricsLogger
from toyllm.train.optim import build_optimizer, build_scheduler
from toyllm.train.throughput import flops_per_token, peak_flops

Callback = Callable[["Trainer", dict[str, Any]], None]


@dataclass
class TrainResult:
    """What `fit` returns: enough to print a summary or assert on in a test."""

    run_dir: Path
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)  # training loss of each step run by this call
    val_loss: float | None = None  # at the last evaluation
    best_val_loss: float | None = None
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0  # mean over the steps of this call

    @property
    def val_perplexity(self) -> float | None:
        return math.exp(self.val_loss) if self.val_loss is not None else None


def build_model(config: TrainConfig) -> GPT2LMHeadModel:
    """A fresh model from a preset (seeded), or a pretrained one to fine-tune, in float32 on the CPU."""
    if config.model.startswith("random:"):
        overrides: dict[str, Any] = {
            k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd") if getattr(config, k) is not None
        }
        if config.block_size is not None:
            overrides["n_positions"] = config.block_size
        gpt_config = GPT2Config.from_name(config.model.removeprefix("random:"), **overrides)
        torch.manual_seed(config.seed)  # the same seed gives the same initial weights on every rank
        model = GPT2LMHeadModel(gpt_config)
    else:
        shape = [k for k in ("n_layer", "n_head", "n_embd") if getattr(config, k) is not None]
        if shape:
            raise InvalidArgumentError(
                f"--{shape[0].replace('_', '-')} changes the shape of a random model; the checkpoint "
                f"'{config.model}' keeps its own (use --model random:<preset> to train a new shape)"
            )
        model = GPT2LMHeadModel.from_pretrained(config.model)
    if config.dropout is not None:
        set_dropout(model, config.dropout)
    return model


def set_dropout(model: GPT2LMHeadModel, p: float) -> None:
    """Set every dropout probability (and the config, so a saved checkpoint records what was used)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, GPT2Attention):
            module.attn_dropout = p
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = p


def resolve_total_steps(config: TrainConfig, tokens_per_step: int, train_tokens: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        return max(1, math.ceil(config.max_tokens / tokens_per_step))
    if config.num_epochs is not None:
        return max(1, math.ceil(config.num_epochs * train_tokens / tokens_per_step))
    return DEFAULT_MAX_STEPS


class Trainer:
    """Builds everything from a `TrainConfig` (process group, data, model, optimizer), then `fit()` trains.

    `callbacks` are called after every optimizer step with the trainer and that step's log record.
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = ()) -> None:
        config.validate()
        self.config = config
        self.callbacks = list(callbacks)
        self.ctx = ddp.setup(config.device)
        self.console = Console(stderr=True, highlight=False, quiet=not self.ctx.is_main)
        self.run_dir = Path(config.out_dir).expanduser()
        self.data = PreparedData.open(config.data)

        existing = ckpt.latest_checkpoint(self.run_dir)
        if existing is not None and not config.resume:  # a new run here would overwrite and mix in the old one's
            raise InvalidArgumentError(
                f"{self.run_dir} already holds a run's checkpoints ({existing.name}): pass --resume to continue it, "
                "or choose another --out"
            )
        resume_from = existing if config.resume else None
        state = ckpt.load_training_state(resume_from) if resume_from is not None else None
        if state is not None:
            check_compatible(state["config"], config, state.get("world_size", 1), self.ctx.world_size, self.console)
        if config.resume and resume_from is None:
            self.console.print(f"no checkpoint in {self.run_dir}: starting from scratch")

        # The model: from the checkpoint when resuming (its weights are the ones we need), else as configured.
        self.model = _load_for_resume(resume_from, config) if resume_from is not None else build_model(config)
        cfg = self.model.config
        self.block_size = config.block_size or min(cfg.n_positions, 1024)
        if self.block_size > cfg.n_positions:
            raise InvalidArgumentError(
                f"block_size {self.block_size} is larger than the model's context of {cfg.n_positions} tokens"
            )
        vocab = int(self.data.meta.get("vocab_size", 0))
        if vocab > cfg.vocab_size:
            raise DataError(f"the data's vocabulary ({vocab}) is larger than the model's ({cfg.vocab_size})")
        self.model.to(self.ctx.device).train()
        self.model.gradient_checkpointing = config.gradient_checkpointing

        # The data: every rank draws the same global batch and keeps its slice (see WindowSampler).
        self.sampler = WindowSampler(
            self.data.train,
            self.block_size,
            config.batch_size,
            config.seed,
            self.ctx.rank,
            self.ctx.world_size,
            vocab_size=cfg.vocab_size,
        )
        self.has_val = len(self.data.val) > 0
        if self.has_val and len(self.data.val) < self.block_size + 1:
            raise DataError(
                f"the validation split has {len(self.data.val)} tokens, fewer than one block of {self.block_size} "
                "plus one; use a smaller --block-size or prepare with a larger --val-fraction"
            )
        self.tokens_per_step = config.batch_size * self.block_size * config.grad_accum * self.ctx.world_size
        self.total_steps = resolve_total_steps(config, self.tokens_per_step, len(self.data.train))

        # Optimisation.
        self.optimizer = build_optimizer(
            self.model,
            config.learning_rate,
            config.weight_decay,
            (config.beta1, config.beta2),
            1e-8,
            self.ctx.device.type,
        )
        warmup = min(config.warmup_steps, self.total_steps // 2)
        self.scheduler = build_scheduler(self.optimizer, warmup, self.total_steps, config.min_lr_ratio)
        # fp16 has a narrow range: small gradients underflow to zero. The scaler multiplies the loss before
        # backward and divides the gradients after, skipping steps whose gradients overflowed.
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=config.precision == "16")
        self.autocast_dtype = config.autocast_dtype

        # What the model trains with: compiled and/or wrapped in DDP. `self.model` stays the plain module.
        self.train_model: nn.Module = self.model
        if config.compile:
            self.train_model = torch.compile(self.model)  # type: ignore[assignment]
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)

        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.elapsed_s = 0.0
        self.tokenizer: Any = None
        if self.ctx.is_main:
            # Loaded now, not at the first sample: a damaged vocab.json stops the run before any step is spent (and
            # is not copied into every checkpoint the run saves, as save_pretrained carries the vocabulary along).
            self.tokenizer = self._load_tokenizer()
        self.logger = MetricsLogger(self.run_dir, enabled=self.ctx.is_main, tensorboard=config.tensorboard)
        self.flops_per_token = flops_per_token(self.model, self.block_size)
        self.peak_flops = config.peak_flops if config.peak_flops else peak_flops(self.ctx.device)
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_saves(self.run_dir)

        if state is not None and resume_from is not None:
            self._restore(state)
            self.console.print(f"resumed from {resume_from} at step {self.step}")
            self.logger.truncate_after(self.step)
        else:
            # Dropout masks differ per rank (each process drops different units), yet are reproducible.
            torch.manual_seed(config.seed + self.ctx.rank)
            random.seed(config.seed + self.ctx.rank)

    # -- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        config = self.config
        result = TrainResult(self.run_dir, self.step, self.tokens_seen, best_val_loss=self.best_val_loss)
        save_every = config.save_interval or config.eval_interval
        bar = _Progress(self.console, self.total_steps, self.step, enabled=config.progress and self.ctx.is_main)
        start = time.perf_counter()
        try:
            with bar as progress:
                while self.step < self.total_steps:
                    record = self.train_step()
                    result.losses.append(record["loss"])
                    self.logger.log(record)
                    progress.update(record)
                    if self.step % config.log_interval == 0 and not progress.live:
                        self.console.print(_describe(record, self.total_steps))
                    last = self.step == self.total_steps
                    improved = False
                    if self.has_val and (self.step % config.eval_interval == 0 or last):
                        evaluation = self.evaluate()
                        if not math.isfinite(evaluation["val_loss"]):
                            raise self._diverged(
                                f"the validation loss is {evaluation['val_loss']} at step {self.step}", self.step
                            )
                        result.val_loss = evaluation["val_loss"]
                        improved = self.best_val_loss is None or evaluation["val_loss"] < self.best_val_loss
                        if improved:
                            self.best_val_loss = evaluation["val_loss"]
                        self.logger.log(evaluation)
                        self.logger.plot(f"{self.run_dir.name}: {self.model.num_parameters() / 1e6:.1f}M parameters")
                        progress.print(_describe(evaluation, self.total_steps))
                    if self.step % save_every == 0 or last or improved:
                        self.save(is_best=improved)
                    for callback in self.callbacks:
                        callback(self, record)
        finally:
            self.logger.close()
        result.steps, result.tokens, result.best_val_loss = self.step, self.tokens_seen, self.best_val_loss
        result.elapsed_s = time.perf_counter() - start
        run_tokens = len(result.losses) * self.tokens_per_step
        result.tokens_per_s = run_tokens / result.elapsed_s if result.elapsed_s > 0 else 0.0
        return result

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns its log record."""
        config, device = self.config, self.ctx.device
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in self.sampler.next_batch())
            # DDP all-reduces gradients in backward; between micro-batches that would only waste bandwidth.
            sync = self.ctx.distributed and micro < config.grad_accum - 1
            with self.train_model.no_sync() if sync else contextlib.nullcontext():  # type: ignore[operator]
                with self._autocast():
                    logits = self.train_model(x)  # (B, T, vocab)
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
                self.scaler.scale(loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        loss_mean = ddp.all_reduce_mean(loss_sum / config.grad_accum, self.ctx)
        loss_value = float(loss_mean)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(f"the loss is {loss_value} at step {self.step + 1}", self.step + 1)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        self.elapsed_s += dt
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        tokens_per_s = self.tokens_per_step / dt
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.ctx.world_size)
        return {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "elapsed_s": self.elapsed_s,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss over `eval_iters` batches (the same windows every time, so values compare)."""
        config = self.config
        self.model.eval()  # dropout off
        sampler = WindowSampler(
            self.data.val,
            self.block_size,
            config.batch_size,
            config.seed + 1,
            self.ctx.rank,
            self.ctx.world_size,
            vocab_size=self.model.config.vocab_size,
        )
        total = torch.zeros((), device=self.ctx.device)
        for _ in range(config.eval_iters):
            x, y = (t.to(self.ctx.device) for t in sampler.next_batch())
            with self._autocast():
                logits = self.model(x)
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        val_loss = float(ddp.all_reduce_mean(total / config.eval_iters, self.ctx))
        record: dict[str, Any] = {
            "kind": "eval",
            "step": self.step,
            "tokens": self.tokens_seen,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 700.0)),
            "elapsed_s": self.elapsed_s,
        }
        if self.ctx.is_main and config.sample_tokens > 0:
            record["sample"] = self.sample()
        self.model.train()
        return record

    def sample(self) -> str:
        """Text from the model, generated by the inference engine (KV cache), seeded so runs compare."""
        from toyllm.generation import GenerationConfig, generate_text

        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        was_training = self.model.training
        self.model.eval()
        gen = GenerationConfig(
            max_new_tokens=self.config.sample_tokens, temperature=0.8, top_k=200, seed=self.config.seed
        )
        text = generate_text(self.model, self.tokenizer, self.config.sample_prompt, gen)
        self.model.train(was_training)
        return str(text)

    def _load_tokenizer(self) -> Any:
        """The vocabulary the samples are decoded with: the fine-tuned checkpoint's own, else standard GPT-2."""
        from toyllm.tokenizer import load_tokenizer

        return load_tokenizer(None if self.config.model.startswith("random:") else self.config.model)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, is_best: bool = False) -> Path | None:
        """Every rank hands its RNG state to rank 0, which writes the checkpoint. Returns its path on rank 0.

        Weights holding NaN or inf are never saved: the last checkpoint on disk stays the last good one.
        """
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise self._diverged(f"the weights hold NaN or inf after step {self.step}", self.step)
        rng = _gather(_rng_state(self.ctx.device), self.ctx)
        path = None
        if self.ctx.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "best_val_loss": self.best_val_loss,
                "elapsed_s": self.elapsed_s,
                "config": self.config.to_dict(),
                "world_size": self.ctx.world_size,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": rng,
                "data_sha256": self.data.meta.get("sha256"),
            }
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, self.model, state, keep_last=self.config.keep_last, is_best=is_best
            )
        ddp.barrier(self.ctx)
        return path

    def _diverged(self, what: str, step: int) -> TrainingDivergedError:
        latest = ckpt.latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        return TrainingDivergedError(
            f"{what}: training stopped, {kept} (try a lower --learning-rate, more --warmup-steps, "
            "or --precision bf16 instead of 16)",
            step=step,
        )

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the training state does not fit this run: {exc}") from exc
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_val_loss = state["best_val_loss"]
        self.elapsed_s = float(state["elapsed_s"])
        if state.get("data_sha256") != self.data.meta.get("sha256"):
            self.console.print("[yellow]warning:[/] the prepared data differs from the checkpoint's")
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            _set_rng_state(rngs[self.ctx.rank], self.ctx.device)
        else:  # a different number of processes: reproducible, but not the interrupted run's continuation
            torch.manual_seed(self.config.seed + self.step + self.ctx.rank)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train as `config` says and return a summary. Under torchrun, every process calls this."""
    try:
        return Trainer(config, callbacks).fit()
    finally:
        ddp.cleanup()


# -- helpers -------------------------------------------------------------------------------------------------------


def check_compatible(
    saved: dict[str, Any], config: TrainConfig, saved_world: int, world: int, console: Console
) -> None:
    """A checkpoint resumes only a run with the same model; other differences are allowed but break exactness."""

    def shown(value: Any) -> str:  # None is an option left out: the model's own value
        return "(not given)" if value is None else repr(value)

    for name in ARCHITECTURE_FIELDS:
        if saved.get(name) != getattr(config, name):
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with {name}={shown(saved.get(name))} but this run asks "
                f"for {name}={shown(getattr(config, name))}; use the original options or another --out"
            )
    changed = [n for n in EXACTNESS_FIELDS if saved.get(n) != getattr(config, n)]
    if saved_world != world:
        changed.append("number of processes")
    if changed:
        console.print(f"[yellow]warning:[/] resuming with a different {', '.join(changed)}: not an exact continuation")


def _load_for_resume(directory: Path, config: TrainConfig) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel.from_pretrained(directory)
    if config.dropout is not None:
        set_dropout(model, config.dropout)
    return model


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather(obj: dict[str, Any], ctx: ddp.DistContext) -> list[dict[str, Any]]:
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _describe(record: dict[str, Any], total: int) -> str:
    if record["kind"] == "eval":
        text = f"step {record['step']}/{total}: val loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.2f}"
        if "sample" in record:
            text += f"\n[dim]sample:[/] {record['sample']!r}"
        return text
    mfu = f", MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    return (
        f"step {record['step']}/{total}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
        f"{record['tokens_per_s']:,.0f} tok/s{mfu}"
    )


class _Progress:
    """A rich progress bar showing loss, tokens/s and MFU; silent when disabled or not on a terminal."""

    def __init__(self, console: Console, total: int, done: int, enabled: bool) -> None:
        self.console = console
        self.live = enabled and console.is_terminal
        self.bar: Any = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=done, stats="")

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            mfu = f" MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
            stats = f"loss {record['loss']:.3f} {record['tokens_per_s']:,.0f} tok/s{mfu}"
            self.bar.update(self.task, completed=record["step"], stats=stats)

    def print(self, text: str) -> None:
        self.console.print(text)
