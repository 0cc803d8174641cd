"""`TrainConfig`: every knob of a training run, with the reason for its default.

The seed project's names map as follows: `learning_rate`, `batch_size` and `weight_decay` are fields of the same
name; `num_epochs` is a field too, turned into a step count (one epoch = as many tokens as train.bin holds,
drawn as random windows, so an epoch is a budget rather than one pass in order).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toyllm.generation import MAX_NEW_TOKENS
from toyllm.sampling import validate_seed
from toyllm.train.errors import InvalidArgumentError

# --precision values: "32" trains in float32; "bf16" and "16" run matmuls under autocast in that type while the
# weights, gradients and optimizer stay float32 ("mixed precision"). Lightning-style spellings are accepted.
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
PRECISION_ALIASES = {
    "fp32": "32",
    "32-true": "32",
    "float32": "32",
    "bf16-mixed": "bf16",
    "bfloat16": "bf16",
    "fp16": "16",
    "16-mixed": "16",
    "float16": "16",
}
DEFAULT_MAX_STEPS = 1000


@dataclass
class TrainConfig:
    """What to train, on what, and how. `toyllm train --help` lists the same fields as options."""

    data: str = ""  # a directory written by `toyllm prepare`
    out_dir: str = "runs/train"  # checkpoints, logs and the loss curve go here

    # Model: `random:<preset>` starts from scratch (n_layer/n_head/n_embd/block_size override the preset, and
    # block_size becomes its context length); a directory or Hub id fine-tunes that checkpoint.
    model: str = "random:gpt2"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None  # tokens per training window; default: the model's context length
    dropout: float | None = None  # None keeps the model's own (0.1 for GPT-2 presets)

    # Batch and length. Tokens per optimizer step = batch_size * block_size * grad_accum * world_size.
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches summed into one optimizer step: a big batch in little memory
    max_steps: int | None = None  # give one of max_steps, max_tokens, num_epochs (default: 1000 steps)
    max_tokens: int | None = None
    num_epochs: float | None = None

    # Optimisation (AdamW, linear warm-up then cosine decay to min_lr_ratio * learning_rate).
    learning_rate: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only
    beta1: float = 0.9
    beta2: float = 0.95  # lower than Adam's 0.999: faster to forget, steadier for transformers (GPT-3 paper)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    # Speed and memory.
    precision: str = "32"
    gradient_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"

    # Evaluation, logs and checkpoints.
    eval_interval: int = 250  # optimizer steps between validation runs (and checkpoints)
    eval_iters: int = 20  # validation batches per estimate
    log_interval: int = 10  # steps between console lines (the files get every step)
    sample_tokens: int = 64  # tokens of generated text at each evaluation; 0 disables
    sample_prompt: str = "\n"
    save_interval: int | None = None  # default: eval_interval
    keep_last: int = 2  # newest checkpoints kept (the best one is kept too)
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True
    peak_flops: float | None = None  # for the MFU estimate; None: look it up / measure
    resume: bool = False  # continue from the newest checkpoint in out_dir
    seed: int = 1337

    def __post_init__(self) -> None:
        self.precision = PRECISION_ALIASES.get(str(self.precision).lower(), str(self.precision).lower())

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def validate(self) -> None:
        """Reject values that would crash later or silently train nonsense, naming the option to change."""
        positive = {
            "batch_size": self.batch_size,
            "eval_interval": self.eval_interval,
            "eval_iters": self.eval_iters,
            "log_interval": self.log_interval,
            "keep_last": self.keep_last,
        }
        for f in dataclasses.fields(self):  # counts reach torch as int64: past that they overflow deep inside it
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and f.name != "seed" and value >= 2**63:
                raise InvalidArgumentError(f"{f.name} must be below 2**63, got {value}")
        if self.grad_accum < 1:
            raise InvalidArgumentError(f"grad_accum must be >= 1, got {self.grad_accum}")
        for name, value in positive.items():
            if value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "max_steps", "max_tokens", "save_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
        budgets = [n for n in ("max_steps", "max_tokens", "num_epochs") if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise InvalidArgumentError(f"give only one of max_steps, max_tokens, num_epochs (got {', '.join(budgets)})")
        if self.num_epochs is not None and not 0 < self.num_epochs < math.inf:
            raise InvalidArgumentError(f"num_epochs must be a finite number > 0, got {self.num_epochs}")
        for name in ("learning_rate", "weight_decay", "grad_clip", "min_lr_ratio"):  # NaN and inf pass the range checks
            if not math.isfinite(getattr(self, name)):
                raise InvalidArgumentError(f"{name} must be a finite number, got {getattr(self, name)}")
        validate_seed(self.seed)
        if self.peak_flops is not None and not 0 < self.peak_flops < math.inf:  # NaN made every MFU NaN
            raise InvalidArgumentError(f"peak_flops must be a finite number > 0, got {self.peak_flops}")
        if self.sample_tokens > MAX_NEW_TOKENS:  # found out only at the first evaluation otherwise
            raise InvalidArgumentError(f"sample_tokens must be at most {MAX_NEW_TOKENS:,}, got {self.sample_tokens}")
        if not self.sample_prompt and self.sample_tokens > 0:  # found out only at the first evaluation otherwise
            raise InvalidArgumentError("the sample prompt is empty: give --sample-prompt TEXT or --sample-tokens 0")
        out = Path(self.out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise InvalidArgumentError(f"--out {self.out_dir} exists and is not a directory")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision must be 32, bf16 or 16, got '{self.precision}'")
        if not self.learning_rate > 0:
            raise InvalidArgumentError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.sample_tokens < 0:
            raise InvalidArgumentError("warmup_steps, weight_decay, grad_clip and sample_tokens must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InvalidArgumentError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.data:
            raise InvalidArgumentError("no data: pass the directory written by `toyllm prepare` with --data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that fix the model or the meaning of a step: a checkpoint can resume only a run that agrees on them.
ARCHITECTURE_FIELDS = ("model", "n_layer", "n_head", "n_embd", "block_size")
# Fields whose change still resumes, but not bitwise like the interrupted run would have continued.
EXACTNESS_FIELDS = ("batch_size", "grad_accum", "seed", "max_steps", "max_tokens", "num_epochs", "learning_rate")
