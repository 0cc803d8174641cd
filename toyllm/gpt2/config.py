"""GPT-2 hyper-parameters with Hugging Face field names, so `config.json` files round-trip unchanged."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from toyllm.errors import InvalidArgumentError, ModelNotFoundError

# About 13 times GPT-2 XL, and 80 GB of float32 weights: anything larger is a mistyped size, not a GPT-2.
MAX_PARAMETERS = 20_000_000_000


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # tanh-approximated GELU
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    tie_word_embeddings: bool = True
    # Fields we keep only so that a config.json from the Hub survives a load/save round trip.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check every field here, so a bad config.json or CLI override is one clear error, not a crash deep in torch.

        Raises InvalidArgumentError (a ValueError); the checkpoint loader turns it into a CheckpointError.
        """
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if not (name == "n_inner" and value is None) and (not _is_int(value) or not 0 < value < 2**63):
                raise InvalidArgumentError(f"{name} must be a positive integer below 2**63, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise InvalidArgumentError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < 1:
                raise InvalidArgumentError(f"{name} must be a number in [0, 1), got {value!r}")
        if not _is_real(self.layer_norm_epsilon) or self.layer_norm_epsilon <= 0:
            raise InvalidArgumentError(f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")
        if not _is_real(self.initializer_range) or self.initializer_range < 0:
            raise InvalidArgumentError(f"initializer_range must be a number >= 0, got {self.initializer_range!r}")
        # Only the type and sign: small test models keep GPT-2's default ids (50256) beyond their vocabulary, and
        # generation takes its EOS from GenerationConfig, so an out-of-vocabulary id here is harmless.
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise InvalidArgumentError(f"{name} must be a non-negative integer or null, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise InvalidArgumentError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.parameter_count > MAX_PARAMETERS:  # (a typo such as --n-layer 120000 would fill memory, then crash)
            raise InvalidArgumentError(
                f"this configuration has about {self.parameter_count:.3g} parameters (n_layer {self.n_layer}, n_embd "
                f"{self.n_embd}, vocab_size {self.vocab_size}, n_positions {self.n_positions}); the largest GPT-2 has "
                f"1.56e9 and toyllm refuses more than {MAX_PARAMETERS:.0e}"
            )

    @property
    def parameter_count(self) -> int:
        """The parameter count this configuration gives, computed without building anything."""
        C, inner = self.n_embd, self.inner_dim
        block = (3 * C * C + 3 * C) + (C * C + C) + (2 * C * inner + inner + C) + 4 * C  # attn, MLP, 2 layer norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * C
        return (self.vocab_size + self.n_positions) * C + self.n_layer * block + 2 * C + head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT2Config:
        """A preset by name (`gpt2`, `gpt2-medium`, `openai-community/gpt2-xl`, `gpt2-tiny`, ...)."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise ModelNotFoundError(f"unknown preset '{name}'; known presets: {known}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        """Read a Hugging Face `config.json`; unknown keys are kept in `extra` and written back on save."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` that `transformers.GPT2LMHeadModel.from_pretrained` expects."""
        out: dict[str, Any] = dict(self.extra)
        out.update({k: v for k, v in dataclasses.asdict(self).items() if k != "extra"})
        out["model_type"] = "gpt2"
        out["architectures"] = ["GPT2LMHeadModel"]
        # The pre-v4 names that some tools still read.
        out["n_ctx"] = self.n_positions
        return out


def _is_int(value: object) -> bool:
    """An int but not a bool: JSON's `true` would otherwise pass as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float (JSON may write 0 for 0.0), but not a bool, a string or NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),  # 82M
    # Tiny shapes for tests, examples and quick training on a laptop CPU. Real vocabulary, so the tokenizer fits.
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128, n_positions=512),
}

PRESET_ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "openai-community/gpt2": "gpt2",
    "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large",
    "openai-community/gpt2-xl": "gpt2-xl",
    "distilbert/distilgpt2": "distilgpt2",
}


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(PRESET_ALIASES)
