"""The `toyllm generate` / `toyllm download` commands and the seed-compatible scripts.

Every user mistake must end as one line on stderr and exit code 2, never a traceback. Each subprocess pays for
importing torch (seconds on a small machine), so most cases run the app in-process through `run_app`, the same
error boundary that the console script uses; a handful of subprocess runs check the real process boundary: the
`python -m` entry point, the scripts run as files, and the Hugging Face offline mode (read at import time).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from toyllm.cli.main import run_app
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "random:gpt2-tiny", "--max-new-tokens", "5", "--seed", "0"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def assert_one_line_error(self, *fragments: str) -> None:
        """Exit code 2, exactly one non-empty line on stderr holding every fragment, and no traceback."""
        assert self.code == 2, (self.code, self.out, self.err)
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err + self.out
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `toyllm ARGS...` in this process and capture what it prints."""

    def run(*args: str) -> Result:
        code = run_app(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def offline_env(tmp_path: Path) -> dict[str, str]:
    """A child environment that finds `toyllm` in this checkout and sees an empty, offline Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if k != "TOYLLM_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf")
    env["HF_HUB_CACHE"] = str(tmp_path / "hf" / "hub")
    return env


def run_process(args: list[str], tmp_path: Path) -> Result:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=offline_env(tmp_path), cwd=tmp_path, timeout=120
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def toyllm(*args: str, tmp_path: Path) -> Result:
    return run_process(["-m", "toyllm.cli.main", *args], tmp_path)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny local checkpoint directory, as `save_pretrained` writes it."""
    torch.manual_seed(0)
    directory = tmp_path / "tiny"
    GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).save_pretrained(directory)
    return directory


# -- through a real process ---------------------------------------------------------------------------------------


def test_help(tmp_path: Path) -> None:
    top = toyllm("--help", tmp_path=tmp_path)
    assert top.code == 0 and "generate" in top.out
    sub = toyllm("generate", "--help", tmp_path=tmp_path)
    assert sub.code == 0
    for option in ("--max-new-tokens", "--top-p", "--no-kv-cache", "--draft-layers", "random:gpt2"):
        assert option in sub.out


def test_generate_in_a_process(tmp_path: Path) -> None:
    result = toyllm("generate", "Hello world", *TINY, tmp_path=tmp_path)
    assert result.code == 0, result.err
    assert result.out.startswith("Hello world") and len(result.out.strip()) > len("Hello world")
    assert "tokens/s" in result.err and "5 new tokens" in result.err


def test_hub_offline_without_cache_says_how_to_proceed(tmp_path: Path) -> None:
    result = toyllm("generate", "Hello", "--model", "gpt2", tmp_path=tmp_path)
    result.assert_one_line_error("random:gpt2", "HF_HUB_OFFLINE")


def test_seed_scripts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run_gpt2.py as a file (no install needed), run_gpt2_kv.py in-process (the same code): the same text."""
    from toyllm.cli import run_gpt2_kv

    flags = ["--model", "random:gpt2-tiny", "--prompt", "Hi", "--max_length", "5", "--seed", "0",
             "--temperature", "0.7", "--top_p", "0.9", "--top_k", "20", "--repetition_penalty", "1.1"]  # fmt: skip
    plain = run_process([str(ROOT / "toyllm/cli/run_gpt2.py"), *flags], tmp_path)
    assert plain.code == 0, plain.err
    assert plain.out.startswith("Hi") and "tokens/s" in plain.err
    assert run_gpt2_kv.main([*flags, "--use_kv_cache", "--chunk_size", "1"]) == 0
    cached = capsys.readouterr()
    assert cached.out == plain.out  # same seed, same model: the cache changes the speed, not the text
    assert "tokens/s" in cached.err


SPECULATIVE_SCRIPT = str(ROOT / "toyllm/cli/run_speculative_sampling.py")


def test_seed_speculative_script_runs_as_a_file(tmp_path: Path) -> None:
    """The issue's command works from a checkout, run as a file (the script repairs sys.path itself), offline with
    random presets; its statistics go to stderr."""
    result = run_process(
        [SPECULATIVE_SCRIPT, "--target_model", "random:gpt2-tiny", "--draft_model", "random:gpt2-tiny",
         "--lookahead", "5", "--max_new_tokens", "4", "--seed", "0"], tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "acceptance_rate" in result.err and "Traceback" not in result.err


def test_seed_speculative_command_verbatim_offline_fails_cleanly(tmp_path: Path) -> None:
    """`--target_model gpt2-medium --draft_model gpt2-small --lookahead 5`, exactly: here (no Hub, empty cache) one
    line naming the model, exit 2."""
    result = run_process(
        [SPECULATIVE_SCRIPT, "--target_model", "gpt2-medium", "--draft_model", "gpt2-small", "--lookahead", "5"],
        tmp_path,
    )
    result.assert_one_line_error("gpt2-medium")


@pytest.mark.parametrize(
    "script, flags, fragment",
    [
        ("run_speculative_sampling.py", ["--lookahead_schedule", "bogus"], "--lookahead_schedule"),
        ("run_speculative_sampling.py", ["--lookahead", "abc"], "--lookahead"),
        ("run_gpt2.py", ["--max_length", "abc"], "--max_length"),
        ("run_gpt2.py", ["--no_such_flag"], "--no_such_flag"),
        ("benchmark/bench_gpt2kv.py", ["--seq_len", "abc"], "--seq_len"),
    ],
)
def test_seed_script_usage_errors_are_one_line(tmp_path: Path, script: str, flags: list[str], fragment: str) -> None:
    """argparse prints its whole usage block before the error; the seed scripts print the error alone."""
    run_process([str(ROOT / "toyllm/cli" / script), *flags], tmp_path).assert_one_line_error(fragment)


def test_seed_invocation_offline_fails_cleanly(tmp_path: Path) -> None:
    """The seed project's exact command line parses; here (no Hub, empty cache) it stops with the way forward."""
    result = run_process(
        [str(ROOT / "toyllm/cli/run_gpt2.py"), "--temperature", "0.7", "--max_length", "100"], tmp_path
    )
    result.assert_one_line_error("random:gpt2")


# -- in-process: option checks happen before any model is loaded --------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", refuse)


BAD_OPTIONS = [
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--seed", str(2**64)], "seed must be in"),
    (["--seed", str(-(2**63) - 1)], "seed must be in"),
    (["--chunk-size", "0"], "chunk_size"),
    (["--draft-layers", "1", "--lookahead-schedule", "sometimes"], "lookahead_schedule"),
    (["--lookahead", "7"], "need a draft"),  # it would be ignored
    (["--lookahead-schedule", "heuristic"], "need a draft"),
    (["--draft-layers", "1", "--no-kv-cache"], "drop --no-kv-cache"),
    (["--dtype", "float8"], "dtype"),
    (["--draft", "random:gpt2-tiny", "--draft-layers", "1"], "not both"),
]


@pytest.mark.parametrize(("options", "fragment"), BAD_OPTIONS, ids=[fragment for _, fragment in BAD_OPTIONS])
def test_bad_options_fail_fast(cli, no_model_loading: None, options: list[str], fragment: str) -> None:
    cli("generate", "Hello", *options).assert_one_line_error(fragment)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["generate", "Hello", "--bogus"], ["No such option: --bogus", "toyllm generate --help"]),
        (["generate", "Hello", "--max-new-tokens", "abc"], ["'--max-new-tokens'", "valid integer"]),
        (["nosuchcommand"], ["No such command", "toyllm --help"]),
    ],
)
def test_a_mistyped_command_line_is_one_line(cli, args: list[str], fragments: list[str]) -> None:
    """click printed these as a boxed usage text over a dozen lines."""
    cli(*args).assert_one_line_error(*fragments)


def test_a_command_without_arguments_shows_its_help(cli) -> None:
    result = cli("generate")
    assert result.code == 2 and "Usage: toyllm generate" in result.out + result.err and "error" not in result.err


def test_a_file_system_refusal_is_one_line(cli, tmp_path: Path) -> None:
    """An output folder below a file: the OS says no, which is the user's path, not an internal error."""
    (tmp_path / "a.txt").write_text("some text to prepare", encoding="utf-8")
    result = cli("prepare", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "a.txt" / "sub"))
    result.assert_one_line_error("Not a directory")


def test_only_an_os_error_about_a_path_is_the_users(capsys: pytest.CaptureFixture[str]) -> None:
    from toyllm.cli.app import run_guarded

    def no_path() -> None:
        raise OSError(12, "Cannot allocate memory")  # no file named: the machine or a library, not the user's input

    assert run_guarded(no_path) == 1 and "internal error: OSError" in capsys.readouterr().err

    def broken_pipe() -> None:
        raise BrokenPipeError(32, "Broken pipe")  # `toyllm generate ... | head`: the reader left

    assert run_guarded(broken_pipe) == 1 and capsys.readouterr().err == ""


def test_an_abort_is_an_interrupt(capsys: pytest.CaptureFixture[str]) -> None:
    """Older typers turn Ctrl-C into click's Abort, which the CLI (not click, in non-standalone mode) must handle."""
    from toyllm.cli.app import _click, run_guarded

    def aborts() -> None:
        raise _click.exceptions.Abort() if hasattr(_click.exceptions, "Abort") else __import__("click").Abort()

    assert run_guarded(aborts) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_an_unexpected_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Some library errors carry a C++ stack trace over a dozen lines: the CLI keeps the first, exit code 1."""
    from toyllm.cli.app import run_guarded

    def fails() -> None:
        raise RuntimeError("Overflow when unpacking\nframe #0: c10::Error\nframe #1: at::native::full")

    assert run_guarded(fails) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: Overflow when unpacking (set TOYLLM_DEBUG" in err


def test_empty_prompt(cli, no_model_loading: None) -> None:
    cli("generate", "").assert_one_line_error("prompt is empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(cli, no_model_loading: None) -> None:
    cli("generate", "Hello", "--device", "cuda").assert_one_line_error("CUDA is not available")


# -- in-process: models ---------------------------------------------------------------------------------------------


def test_unknown_preset(cli) -> None:
    cli("generate", "Hello", "--model", "random:gpt2-huge").assert_one_line_error("unknown preset", "gpt2-tiny")


def test_missing_checkpoint_directory(cli, tmp_path: Path) -> None:
    cli("generate", "Hello", "--model", str(tmp_path / "nowhere")).assert_one_line_error("nowhere")
    cli("generate", "Hello", *TINY, "--tokenizer", str(tmp_path / "nothere")).assert_one_line_error("nothere")
    # A path that exists but holds no vocabulary was silently read as standard GPT-2.
    (tmp_path / "weights.bin").write_bytes(b"")
    cli("generate", "Hello", *TINY, "--tokenizer", str(tmp_path / "weights.bin")).assert_one_line_error("no vocab.json")
    (tmp_path / "empty").mkdir()
    cli("generate", "Hello", *TINY, "--tokenizer", str(tmp_path / "empty")).assert_one_line_error("no vocab.json")
    (tmp_path / "empty" / "vocab.json").write_text("{}")  # half a pair
    cli("generate", "Hello", *TINY, "--tokenizer", str(tmp_path / "empty")).assert_one_line_error("no vocab.json")
    # A bare name that is neither a folder nor a cached Hub tokenizer: a typo, which used to mean standard GPT-2.
    cli("generate", "Hello", *TINY, "--tokenizer", "nope").assert_one_line_error("--tokenizer nope", "no such folder")
    for name in ("gpt2", "gpt2-small"):  # GPT-2 names all mean standard GPT-2's vocabulary, cached or not
        assert cli("generate", "Hello", *TINY, "--tokenizer", name).code == 0


def test_local_checkpoint(cli, checkpoint: Path) -> None:
    result = cli("generate", "Hello", "--model", str(checkpoint), "--max-new-tokens", "4", "--seed", "0")
    assert result.code == 0, result.err
    assert result.out.startswith("Hello") and "4 new tokens" in result.err
    # --tokenizer naming a file of the checkpoint means its folder's vocabulary.
    by_file = cli(
        "generate",
        "Hello",
        "--model",
        str(checkpoint),
        "-n",
        "4",
        "--seed",
        "0",
        "--tokenizer",
        str(checkpoint / "vocab.json"),
    )
    assert by_file.code == 0 and by_file.out == result.out, by_file.err
    # The reference path (no cache) and a chunked prefill give the same text for the same seed.
    slow = cli("generate", "Hello", "--model", str(checkpoint), "--max-new-tokens", "4", "--seed", "0",
               "--no-kv-cache", "--chunk-size", "1")  # fmt: skip
    assert slow.code == 0 and slow.out == result.out


def test_checkpoint_without_weights(cli, checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    cli("generate", "Hello", "--model", str(checkpoint)).assert_one_line_error("model.safetensors")


def test_truncated_checkpoint(cli, checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cli("generate", "Hello", "--model", str(checkpoint)).assert_one_line_error("model.safetensors")


def test_corrupt_config(cli, checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text("{not json")
    cli("generate", "Hello", "--model", str(checkpoint)).assert_one_line_error("config.json")


def test_prompt_longer_than_the_window(cli) -> None:
    prompt = "hello " * 300  # gpt2-tiny has a 256-token context
    cli("generate", prompt, *TINY, "--no-window").assert_one_line_error("context window", "--no-window")
    assert cli("generate", prompt, *TINY).code == 0  # sliding (the default) keeps the most recent tokens


def test_stream_prints_what_generate_prints(cli) -> None:
    options = [
        *TINY,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-p",
        "0.95",
        "--repetition-penalty",
        "1.2",
    ]
    whole = cli("generate", "Once upon a time", *options)
    streamed = cli("generate", "Once upon a time", *options, "--stream")
    assert whole.code == streamed.code == 0
    assert streamed.out == whole.out and whole.out.startswith("Once upon a time")


def test_stop_string(cli) -> None:
    full = cli("generate", "Once upon a time", *TINY, "--max-new-tokens", "12")
    completion = full.out.removeprefix("Once upon a time").rstrip("\n")
    stop = completion[3:5]
    assert stop.strip(), completion  # random text: pick two characters from the middle
    cut = cli("generate", "Once upon a time", *TINY, "--max-new-tokens", "12", "--stop", stop)
    assert cut.code == 0
    assert cut.out == "Once upon a time" + completion[: completion.index(stop)] + "\n"


def test_self_speculative_prints_its_statistics(cli) -> None:
    pytest.importorskip("toyllm.speculative")
    result = cli("generate", "Hello", *TINY, "--draft-layers", "1", "--lookahead", "3")
    assert result.code == 0, result.err
    assert result.out.startswith("Hello") and "tokens/s" in result.err


def test_generate_with_a_draft_model_prints_the_speculative_statistics(cli) -> None:
    """The issue's `toyllm generate "..." --model M --draft D --lookahead 5 --lookahead-schedule heuristic`, offline."""
    options = ["--draft", "random:gpt2-tiny", "--lookahead", "5", "--lookahead-schedule", "heuristic"]
    result = cli("generate", "Hello", *TINY, *options)
    assert result.code == 0, result.err
    assert result.out.startswith("Hello")
    stats = [line for line in result.err.splitlines() if line.startswith("speculative:")]
    assert len(stats) == 1 and "acceptance_rate" in stats[0] and "draft_forwards" in stats[0], result.err


def test_a_draft_with_another_vocabulary_is_a_one_line_error(cli, tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = tmp_path / "draft"
    GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny", vocab_size=1000)).save_pretrained(other)
    cli("generate", "Hello", *TINY, "--draft", str(other)).assert_one_line_error("vocabulary", "1000", "50257")


def swapped_merges_checkpoint(folder: Path) -> Path:
    """A tiny checkpoint whose tokenizer files swap GPT-2's last two merges and their ids: a consistent BPE of the
    same size in which ids 50254 and 50255 mean each other's text."""
    import json

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).save_pretrained(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges[-2], merges[-1] = merges[-1], merges[-2]
    a, b = ("".join(line.split(" ")) for line in merges[-2:])  # the merged tokens, now at ranks -2 and -1
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return folder


def test_a_draft_whose_tokenizer_gives_other_ids_is_a_one_line_error(cli, tmp_path: Path) -> None:
    """Same vocabulary size, different ids: the draft's files swap GPT-2's last two merges (and their ids), a
    consistent BPE that gives ids 50254 and 50255 each other's text. The size check alone let it through."""
    draft = swapped_merges_checkpoint(tmp_path / "draft")
    copy = tmp_path / "same"  # the same files, untouched: accepted
    GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).save_pretrained(copy)

    assert cli("generate", "Hello", *TINY, "--draft", str(copy)).code == 0
    cli("generate", "Hello", *TINY, "--draft", str(draft)).assert_one_line_error("tokenizer", str(draft))


def test_a_random_draft_with_another_tokenizer_in_use_is_refused(cli, tmp_path: Path) -> None:
    """A draft without vocabulary files is standard GPT-2 (as for any model); against a --tokenizer that gives some
    ids other text, it is refused, naming the first such id."""
    folder = swapped_merges_checkpoint(tmp_path / "tok")
    result = cli("generate", "Hello", *TINY, "--tokenizer", str(folder), "--draft", "random:gpt2-tiny")
    result.assert_one_line_error("another tokenizer", "id 50254")


def test_seed_script_help_exits_0(tmp_path: Path) -> None:
    result = run_process([SPECULATIVE_SCRIPT, "--help"], tmp_path)
    assert result.code == 0 and "--lookahead_schedule" in result.out and not result.err


def test_lookahead_bounds_per_schedule() -> None:
    """threshold takes --lookahead as its cap (16 without one); heuristic starts there and grows to 16 (or to it)."""
    from toyllm.cli.common import lookahead_bounds

    assert lookahead_bounds(2, "threshold") == (2, 2)
    assert lookahead_bounds(None, "threshold") == (4, 16)
    assert lookahead_bounds(2, "heuristic") == (2, 16)
    assert lookahead_bounds(20, "heuristic") == (20, 20)
    assert lookahead_bounds(None, "constant") == (4, 16)


def test_download_rejects_a_random_model(cli) -> None:
    cli("download", "random:gpt2").assert_one_line_error("random:gpt2")


def test_download_of_a_local_directory_prints_it(cli, checkpoint: Path) -> None:
    result = cli("download", str(checkpoint))
    assert result.code == 0 and result.out.strip() == str(checkpoint)


@pytest.mark.parametrize("command", [["bench"], ["bench", "speculative"], ["bench", "kernel"], ["bench", "sweep"]])
def test_bench_output_folder_blocked_by_a_file_is_refused_before_the_run(cli, tmp_path: Path, command) -> None:
    """A file where --out should be a folder was found only after the whole run, when the report was written."""
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        cli(*command, "--out", str(out)).assert_one_line_error("is a file, not a directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cli(*command, "--out", str(tmp_path / "dangling" / "x")).assert_one_line_error("broken symbolic link")


def test_bench_subcommands_ignore_the_groups_default_folder(cli, tmp_path: Path, monkeypatch) -> None:
    """`bench`'s own --out (default bench_out) is checked only when `bench` itself runs: a file named bench_out in
    the working folder must not stop `bench kernel --out elsewhere`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench_out").write_text("")
    assert cli("bench", "kernel", "--out", str(tmp_path / "elsewhere"), "--help").code == 0
    cli("bench", "--model", "random:gpt2-tiny").assert_one_line_error("bench_out is a file")
