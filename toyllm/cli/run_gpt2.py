"""Plain GPT-2 generation, without the KV cache: the seed project's script, kept working verbatim.

    python toyllm/cli/run_gpt2.py --temperature 0.7 --max_length 100
    python toyllm/cli/run_gpt2.py --model random:gpt2-tiny --prompt "Hello" --seed 0     (offline)

Every step recomputes the whole context from scratch, the readable reference that the cached path is tested
against. It is a thin wrapper over the library; `toyllm generate --no-kv-cache` does the same with more options.
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
    parser = script_parser("Generate text with GPT-2, recomputing the whole context at every step (no KV cache).")
    return run_script(parser.parse_args(argv), use_kv_cache=False)


if __name__ == "__main__":
    sys.exit(main())
