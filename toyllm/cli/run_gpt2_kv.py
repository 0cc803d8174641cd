"""GPT-2 generation with the KV cache: the seed project's script, kept working verbatim.

    python toyllm/cli/run_gpt2_kv.py --use_kv_cache --chunk_size 512
    python toyllm/cli/run_gpt2_kv.py --model random:gpt2-tiny --prompt "Hello" --seed 0     (offline)

The prompt is prefilled (in chunks of `--chunk_size` tokens if given), then each step feeds only the newest token
and reads every earlier key/value from the cache. A thin wrapper over the library; `toyllm generate` does the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file, Python put toyllm/cli/ first on sys.path, where our `generate.py`, `train.py`, ... would shadow
    # other modules. Put the repository root there instead: that also makes `import toyllm` work from a checkout
    # that was never pip-installed.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from toyllm.cli.common import run_script, script_parser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = script_parser("Generate text with GPT-2 and its KV cache.")
    parser.add_argument(
        "--use_kv_cache",
        action="store_true",
        default=True,
        help="reuse past keys and values (the default; the flag is kept for the original command line)",
    )
    parser.add_argument(
        "--no_kv_cache", dest="use_kv_cache", action="store_false", help="recompute the context at every step"
    )
    parser.add_argument("--chunk_size", type=int, default=None, help="prefill the prompt in chunks of this many tokens")
    args = parser.parse_args(argv)
    return run_script(args, use_kv_cache=args.use_kv_cache, chunk_size=args.chunk_size)


if __name__ == "__main__":
    sys.exit(main())
