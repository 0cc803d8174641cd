"""Speculative sampling: the seed project's script, kept working verbatim.

    python toyllm/cli/run_speculative_sampling.py --target_model gpt2-medium --draft_model gpt2-small --lookahead 5
    python toyllm/cli/run_speculative_sampling.py --target_model random:gpt2-medium --draft_model random:gpt2 \\
        --max_new_tokens 20 --seed 0                                                                    (offline)

The draft proposes `--lookahead` tokens, the target checks them in one forward pass, and the output follows the
target's own distribution exactly (at temperature 0: the target's greedy output). The completion goes to stdout;
the statistics (acceptance rate, tokens per target forward, forwards, time split) go to stderr.
`toyllm generate "..." --model gpt2-medium --draft gpt2` does the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file, Python put toyllm/cli/ first on sys.path, where our `generate.py`, `train.py`, ... would shadow
    # other modules. Put the repository root there instead: that also makes `import toyllm` work from a checkout
    # that was never pip-installed.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from toyllm.cli.common import (  # noqa: E402
    ScriptParser,
    add_generation_arguments,
    lookahead_bounds,
    run_generate,
    run_guarded,
    script_config,
)
from toyllm.generation import LOOKAHEAD_SCHEDULES  # noqa: E402
from toyllm.gpt2.weights import HUB_ALIASES  # noqa: E402  (the seed project's names that are no Hub ids)


def hub_name(name: str) -> str:
    """`gpt2-small` -> `gpt2` (the Hub has no `gpt2-small`); `random:gpt2-small` works as it is."""
    return HUB_ALIASES.get(name, name)


def parser() -> argparse.ArgumentParser:
    p = ScriptParser("Speculative sampling with a GPT-2 target and a smaller draft.")
    p.add_argument("--target_model", default="gpt2-medium", help="Hub id, local checkpoint, or random:<preset>")
    p.add_argument(
        "--draft_model", default="gpt2-small", help="a model sharing the target's tokenizer (Hub id, path, random:)"
    )
    p.add_argument(
        "--draft_layers", type=int, default=None, help="self-speculative: use the target's first N layers as the draft"
    )
    p.add_argument(
        "--lookahead",
        type=int,
        default=None,
        help="draft tokens per round (K): always (constant), to start with (heuristic), at most (threshold); "
        "None means 4, or 16 for threshold",
    )
    p.add_argument("--lookahead_schedule", default="constant", choices=LOOKAHEAD_SCHEDULES, help="how K adapts")
    p.add_argument(
        "--max_lookahead",
        type=int,
        default=None,
        help="upper bound on K for heuristic/threshold; %(default)s means max(16, K), or K for threshold",
    )
    add_generation_arguments(p, max_new_tokens=50)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    lookahead, cap = lookahead_bounds(args.lookahead, args.lookahead_schedule)  # as `toyllm generate` takes them
    config = script_config(
        args,
        lookahead=lookahead,
        lookahead_schedule=args.lookahead_schedule,
        # An explicit bound below K is an error (GenerationConfig.validate says so), not quietly raised to K.
        max_lookahead=args.max_lookahead if args.max_lookahead is not None else cap,
    )
    return run_guarded(
        lambda: run_generate(
            args.prompt,
            config,
            model=hub_name(args.target_model),
            draft=None if args.draft_layers is not None else hub_name(args.draft_model),
            draft_layers=args.draft_layers,
            device=args.device,
            dtype=args.dtype,
            stream=args.stream,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
