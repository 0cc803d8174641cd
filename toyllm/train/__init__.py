"""Training GPT-2: data preparation, the training loop, checkpoints, DDP and perplexity evaluation.

    from toyllm.train import TrainConfig, prepare, train

    prepare(["input.txt"], "data/shakespeare")
    result = train(TrainConfig(data="data/shakespeare", out_dir="runs/shakespeare", model="random:gpt2",
                               n_layer=6, n_head=6, n_embd=384, block_size=256, max_steps=500))

The `toyllm prepare`, `toyllm train` and `toyllm eval` commands call exactly these functions.
"""

from toyllm.train.config import TrainConfig
from toyllm.train.data import PreparedData, PrepareResult, WindowSampler, prepare
from toyllm.train.errors import DataError, TrainingDivergedError
from toyllm.train.evaluate import PerplexityResult, load_eval_tokens, perplexity, sliding_window_nll
from toyllm.train.trainer import Trainer, TrainResult, build_model, train

__all__ = [
    "DataError",
    "PerplexityResult",
    "PrepareResult",
    "PreparedData",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "WindowSampler",
    "build_model",
    "load_eval_tokens",
    "perplexity",
    "prepare",
    "sliding_window_nll",
    "train",
]
