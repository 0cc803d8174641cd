"""Naive vs KV-cache generation over generated lengths: the seed project's benchmark script, kept working verbatim.

    python toyllm/cli/benchmark/bench_gpt2kv.py --batch_size 4 --seq_len 1024
    python toyllm/cli/benchmark/bench_gpt2kv.py --model random:gpt2-tiny --seq_len 64      (seconds, for a check)

It generates from a `--prompt_len`-token prompt up to `--seq_len` tokens in total, at lengths doubling from 16, with
and without the cache, and writes a table, sweep.json, sweep.csv and plots to `--out`. A thin wrapper over
`toyllm bench sweep`, which has more options. The default model is `random:gpt2`: GPT-2 124M's shape with random
weights, which runs offline and is exactly as fast as the real weights.

Expect minutes to hours on a CPU: without a cache, generating N tokens costs ~N^2/2 token-forwards (times the batch).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: put the repository root first on sys.path, so `import toyllm` works in a checkout that was
    # never pip-installed.
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from toyllm.cli.common import ScriptParser  # noqa: E402
from toyllm.cli.main import run_app  # noqa: E402


def default_lengths(total: int) -> list[int]:
    """16, 32, 64, ... below `total`, then `total` itself: the points of the sweep."""
    lengths = []
    n = 16
    while n < total:
        lengths.append(n)
        n *= 2
    return lengths + [total]


def main(argv: list[str] | None = None) -> int:
    parser = ScriptParser("Benchmark GPT-2 generation with and without the KV cache.")
    parser.add_argument("--batch_size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--seq_len", type=int, default=1024, help="total tokens per row at the longest point")
    parser.add_argument("--prompt_len", type=int, default=16, help="prompt tokens (random ids)")
    parser.add_argument("--lengths", default=None, help="comma-separated generated lengths (default: doubling)")
    parser.add_argument("--model", default="random:gpt2", help="Hub id, local checkpoint directory, random:<preset>")
    parser.add_argument("--modes", default="naive,kv", help="modes to compare (see `toyllm bench --help`)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per mode and length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per mode first")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="bench_out", help="directory for JSON, CSV and PNG files")
    args = parser.parse_args(argv)
    lengths = args.lengths or ",".join(str(n) for n in default_lengths(max(1, args.seq_len - args.prompt_len)))
    command = ["bench", "sweep", "--modes", args.modes, "--lengths", lengths, "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--prompt-len", str(args.prompt_len)]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device", args.device]
    command += ["--dtype", args.dtype, "--out", args.out]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.seq_len <= args.prompt_len:
        parser.error(f"--seq_len ({args.seq_len}) must exceed --prompt_len ({args.prompt_len})")
    return run_app(command)


if __name__ == "__main__":
    sys.exit(main())
