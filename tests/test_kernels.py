"""toyllm's CPU kernel (toyllm/kernels): the numbers of F.linear for every weight format, row count and shape it
accepts, the same model behaviour with and without it, and torch's path wherever it does not apply."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import KernelCalls, needs_kernel

from toyllm import kernels
from toyllm.bench.modes import build_modes
from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, generate
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.kv_cache import KVCache
from toyllm.quantize import Int8Linear, quantize_int8, quantize_weight

pytestmark = needs_kernel


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert kernels.load() is not None, kernels.unavailable_reason()


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()


def _weights(kind: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored weight, scale, the float32 matrix it stands for)."""
    w = torch.randn(n, k)
    if kind == "int8":
        q, scale = quantize_weight(w)
        return q, scale, q.float() * scale[:, None]
    if kind == "bfloat16":
        return w.bfloat16(), None, w.bfloat16().float()
    return w, None, w


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("k", [4, 8, 12, 40, 768])  # 4: tail only; 12: 8-wide loop + tail; 40: not a multiple of 32
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 31, 32])  # 1 row, pairs, balanced groups
def test_gemv_equals_f_linear(kind: str, k: int, rows: int) -> None:
    torch.manual_seed(rows * 1000 + k)
    n = 37  # odd (the last output row goes alone) and not a multiple of the 16-row grain of the thread split
    weight, scale, reference_weight = _weights(kind, n, k)
    x, bias = torch.randn(rows, k), torch.randn(n)
    assert kernels.usable(x, weight)
    got = kernels.gemv(x, weight, bias, scale)
    torch.testing.assert_close(got, F.linear(x, reference_weight, bias), rtol=1e-5, atol=1e-5 * k**0.5)
    no_bias = kernels.gemv(x, weight, None, scale)
    torch.testing.assert_close(no_bias, F.linear(x, reference_weight), rtol=1e-5, atol=1e-5 * k**0.5)


def test_the_avx2_path_on_a_cpu_that_has_avx512(tmp_path: Path) -> None:
    """float32 weights with 3+ rows take an AVX-512 path where the CPU has it; TOYLLM_KERNEL_AVX512=0 keeps the AVX2
    one. The test above runs whichever this CPU picks, so the other path runs here in a child process."""
    env = {**os.environ, "TOYLLM_KERNEL_AVX512": "0"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "gemv_equals_f_linear"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_the_operator_refuses_more_rows_than_it_has_room_for() -> None:
    x, w, empty = torch.randn(33, 8), torch.randn(5, 8), torch.empty(0)
    with pytest.raises(RuntimeError, match="at most 32 rows"):
        torch.ops.toyllm.gemv(x, w, empty, empty)


def test_gemv_linear_takes_a_bias_of_another_dtype() -> None:
    """The direct float32 path needs a float32 bias; any other goes through the converting wrapper, same numbers."""
    layer = kernels.GemvLinear.from_linear(torch.nn.Linear(16, 9))
    layer.bias = torch.nn.Parameter(layer.bias.detach().double(), requires_grad=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias.float()))


def test_gemv_keeps_leading_dims_and_the_input_dtype() -> None:
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)  # (B, T, K)
    weight = torch.randn(24, 64, dtype=torch.bfloat16)
    y = kernels.gemv(x, weight)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x.float(), weight.float()), rtol=1e-2, atol=1e-2)


def test_usable_only_for_few_rows_on_cpu_without_gradients() -> None:
    w = torch.randn(8, 16)
    assert kernels.usable(torch.randn(kernels.MAX_ROWS, 16), w)
    assert not kernels.usable(torch.randn(kernels.MAX_ROWS + 1, 16), w)  # prefill: torch's GEMM
    assert not kernels.usable(torch.randn(1, 16, dtype=torch.float64), w.double())
    with torch.enable_grad():
        assert not kernels.usable(torch.randn(1, 16, requires_grad=True), w)  # no backward in the kernel
    with torch.no_grad():
        assert kernels.usable(torch.randn(1, 16), w.requires_grad_())


def test_use_cpu_kernels_keeps_weights_ties_and_outputs(model: GPT2LMHeadModel) -> None:
    fast = kernels.use_cpu_kernels(copy.deepcopy(model))
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, kernels.GemvLinear) for m in linears)
    assert fast.lm_head.weight is fast.transformer.wte.weight  # still one tied matrix
    assert fast.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    products = 4 * model.config.n_layer + 1  # four Linears per block, and the head
    with torch.no_grad():
        with KernelCalls() as calls:
            got = fast(ids)
        assert calls.rows == [12] * products  # 12 rows: the kernel's path for every linear
        torch.testing.assert_close(got, model(ids))
        cache = KVCache.for_model(fast, 1, 40)
        fast(ids, cache=cache)
        with KernelCalls() as calls:
            step = fast(ids[:, :1], cache=cache)  # one row
        assert calls.rows == [1] * products
        torch.testing.assert_close(step[0, -1], model(torch.cat([ids, ids[:, :1]], 1))[0, -1], rtol=1e-5, atol=1e-5)
    config = GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=None)
    assert torch.equal(generate(fast, ids, config), generate(model, ids, config))


def test_training_through_gemv_linear_uses_torch_and_has_gradients(model: GPT2LMHeadModel) -> None:
    fast = kernels.use_cpu_kernels(copy.deepcopy(model)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    loss = fast(ids, labels=ids).loss
    loss.backward()
    grad = fast.lm_head.weight.grad  # the tied matrix: gradients from both ends, through F.linear
    assert grad is not None and grad.abs().sum() > 0


def test_int8_layers_decode_through_the_kernel_with_torchs_numbers(
    model: GPT2LMHeadModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    int8 = quantize_int8(copy.deepcopy(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with torch.no_grad():
        torchs = int8(ids)  # not opted in: torch's kernel even though the extension is loaded
    kernels.use_cpu_kernels(int8)
    calls: list[torch.dtype] = []
    real_gemv = kernels.gemv

    def spy(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        calls.append(w.dtype)
        return real_gemv(x, w, *rest)

    monkeypatch.setattr(kernels, "gemv", spy)
    with torch.no_grad():
        with_kernel = int8(ids)
    assert calls and set(calls) == {torch.int8}
    torch.testing.assert_close(with_kernel, torchs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiles_as_one_graph_with_the_operator(model: GPT2LMHeadModel) -> None:
    fast = kernels.use_cpu_kernels(quantize_int8(copy.deepcopy(model)))
    assert all(m.cpu_kernel for m in fast.modules() if isinstance(m, Int8Linear))
    compiled = torch.compile(fast, fullgraph=True)  # fullgraph: a graph break would be an error
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), fast(ids), rtol=1e-4, atol=1e-4)


def test_disabled_by_environment_falls_back_and_says_why() -> None:
    code = (
        "from toyllm import kernels; import torch; "
        "assert kernels.load() is None; print(kernels.unavailable_reason()); "
        "m = torch.nn.Linear(4, 3); assert kernels.use_cpu_kernels(m) is m and type(m) is torch.nn.Linear"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**_env(), "TOYLLM_KERNELS": "0"}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "TOYLLM_KERNELS=0" in out.stdout


def test_bench_gemv_modes_refuse_clearly_without_the_kernel(
    model: GPT2LMHeadModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "load", lambda verbose=False: None)
    monkeypatch.setitem(kernels._state, "reason", "no C++ compiler")
    with pytest.raises(InvalidArgumentError, match=r"unavailable: no C\+\+ compiler"):
        build_modes(["gemv"], model)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_generate_cli_with_the_kernel_writes_the_same_greedy_text(capsys: pytest.CaptureFixture[str]) -> None:
    from toyllm.cli.main import run_app

    args = ["generate", "Hello there", "--model", "random:gpt2-tiny", "-n", "12", "--temperature", "0", "--seed", "1"]
    outputs, used = [], []
    for extra in ([], ["--cpu-kernel"], ["--cpu-kernel", "--draft-layers", "1"]):
        with KernelCalls() as calls:
            assert run_app([*args, *extra]) == 0
        outputs.append(capsys.readouterr().out)
        used.append(len(calls.rows))
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].startswith("Hello there")
    assert used[0] == 0 and used[1] > 0 and used[2] > 0  # --cpu-kernel did route the products through the kernel


def test_bench_kernel_needs_a_timed_run(model: GPT2LMHeadModel) -> None:
    from toyllm.bench.kernel import kernel_bench

    for repeats in (0, -1):
        with pytest.raises(InvalidArgumentError, match="--repeats must be >= 1"):
            kernel_bench(model, rows=(1,), repeats=repeats)


def test_bench_kernel_writes_json_and_plot(tmp_path: Path) -> None:
    from toyllm.cli.main import run_app

    args = ["bench", "kernel", "--model", "random:gpt2-tiny", "--rows", "3,1", "-r", "1", "--out", str(tmp_path)]
    assert run_app(args) == 0
    result = json.loads((tmp_path / "kernel.json").read_text())["result"]
    assert [r["kernel"] for r in result["formats"]] == [
        "torch float32",
        "toyllm float32",
        "toyllm bfloat16",
        "toyllm int8",
    ]
    assert all(r["gb_per_s"] > 0 and r["ms_per_pass"] > 0 for r in result["formats"])
    assert [r["rows"] for r in result["rows"]] == [3] and result["rows"][0]["toyllm_float32_vs_1_row"] > 0
    assert (tmp_path / "kernel.png").read_bytes().startswith(b"\x89PNG")
    assert run_app([*args[:-2], "--rows", "1,33"]) == 2  # outside the kernel's range: a clear error


def test_bench_kernel_ab_against_a_baseline_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--baseline FILE` builds another gemv.cpp beside the current one and times both, interleaved."""
    from toyllm.cli.main import run_app

    source = Path(kernels.__file__).with_name("gemv.cpp")  # the same code under another name: same numbers
    args = ["bench", "kernel", "--model", "random:gpt2-tiny", "--rows", "1,5", "-r", "1", "--out", str(tmp_path)]
    assert run_app([*args, "--baseline", str(source)]) == 0
    ab = json.loads((tmp_path / "kernel.json").read_text())["result"]["baseline"]
    assert ab["source"] == str(source)
    assert [r["rows"] for r in ab["rows"]] == [1, 5]
    assert ab["rows"][0]["baseline_vs_baseline_1_row"] == 1.0
    assert all(r["current_ms"] > 0 and r["baseline_ms"] > 0 for r in ab["rows"])
    x, w = torch.randn(5, 64), torch.randn(33, 64)
    torch.testing.assert_close(torch.ops.toyllm_baseline.gemv(x, w, torch.empty(0), torch.empty(0)), x @ w.T)

    capsys.readouterr()
    assert run_app([*args, "--baseline", str(tmp_path / "missing.cpp")]) == 2
    not_a_kernel = tmp_path / "other.cpp"
    not_a_kernel.write_text("int main() { return 0; }\n")
    assert run_app([*args, "--baseline", str(not_a_kernel)]) == 2
    err = capsys.readouterr().err
    assert "no kernel source at" in err and "does not register the toyllm::gemv operator" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("width", [1, 7, 16, 17, 50257])  # 50257: split in pieces over threads; 17: a scalar tail
def test_argmax_rows_is_torchs_argmax_ties_nan_and_infinities_included(rows: int, width: int) -> None:
    torch.manual_seed(rows * 7 + width)
    cases = [
        torch.randn(rows, width),
        torch.randint(0, 3, (rows, width)).float(),  # many exact ties: the first one wins
        torch.full((rows, width), -float("inf")),
    ]
    with_nan = torch.randn(rows, width)
    with_nan[:, width // 2] = float("nan")
    with_nan[:, -1] = float("inf")
    cases.append(with_nan)  # a NaN beats +inf (torch counts NaN as the largest)
    late_nan = torch.randn(rows, width)
    late_nan[:, -1] = float("nan")  # in the last piece of a row that is split over threads
    cases.append(late_nan)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # 3 pieces of a 50257-wide row
    try:
        for x in cases:
            assert torch.equal(torch.ops.toyllm.argmax_rows(x), torch.argmax(x, dim=-1))
    finally:
        torch.set_num_threads(threads)


def test_greedy_takes_the_kernels_argmax_once_it_is_loaded() -> None:
    from toyllm.sampling import greedy

    x = torch.randn(2, 3, 1000)
    x[0, 1, 10] = x[0, 1, 20] = 99.0  # a tie: the lower index
    with KernelCalls() as calls:
        assert torch.equal(greedy(x), torch.argmax(x, dim=-1))
    assert calls.rows == []  # not a product
    with torch.profiler.profile() as prof:
        greedy(x)
    assert any(e.key == "toyllm::argmax_rows" for e in prof.key_averages())
