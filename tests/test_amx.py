"""AMX products (toyllm/kernels/amx.py): the numbers of a float64 product of the same bfloat16-rounded operands, each
row independent of how many rows share a call (what lets a verification of K + 1 rows give a one-row step's logits),
and the same greedy text from speculative and plain decoding. The layout tests run on any machine; the products
only where the CPU has AMX."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import needs_kernel

from toyllm import kernels
from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, generate
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.kernels import amx
from toyllm.kv_cache import KVCache


def _cpu_has_amx() -> bool:
    """From the CPU's flags, without building anything: on an AMX machine a failed build must fail these tests."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("amx_bf16", "amx_tile", "avx512_bf16"))


needs_amx = pytest.mark.skipif(
    needs_kernel.args[0] or not _cpu_has_amx() or os.environ.get("TOYLLM_KERNEL_AMX") == "0",
    reason="no AMX-BF16 on this CPU (or no CPU kernel, or TOYLLM_KERNEL_AMX=0)",
)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """Build (or load) the kernel before the first test: on an AMX machine it must be there."""
    if not needs_amx.args[0]:
        assert kernels.load() is not None, kernels.unavailable_reason()


@pytest.mark.parametrize(("n", "k"), [(16, 32), (37, 40), (5, 8), (48, 96)])
def test_packing_is_the_tile_layout_and_round_trips(n: int, k: int) -> None:
    """Block (strip s, k block b) row r, column c holds W[16s + c, 32b + 2r : 32b + 2r + 2], padded with zeros."""
    w = torch.randn(n, k)
    packed = amx.pack_weight(w)
    assert packed.shape == (-(-n // 16), -(-k // 32), 16, 16, 2) and packed.dtype == torch.bfloat16
    assert torch.equal(amx.unpack_weight(packed, n, k), w.bfloat16())
    wb = w.bfloat16()
    for s, b, r, c in [(0, 0, 0, 0), (0, 0, 3, 5), (packed.shape[0] - 1, packed.shape[1] - 1, 15, 15)]:
        row, col = 16 * s + c, 32 * b + 2 * r
        expected = [wb[row, col + i].item() if row < n and col + i < k else 0.0 for i in range(2)]
        assert packed[s, b, r, c].tolist() == expected


def test_use_amx_refuses_in_one_line_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amx, "amx_unavailable_reason", lambda: "this CPU has no AMX-BF16")
    model = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny"))
    expected = "^AMX products need an Intel CPU with AMX: this CPU has no AMX-BF16$"
    with pytest.raises(InvalidArgumentError, match=expected):
        amx.use_amx(model)


@needs_amx
@pytest.mark.parametrize(("n", "k"), [(37, 40), (64, 768), (5, 8), (1000, 384), (33, 1536), (60, 64), (124, 40)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 16, 17, 40])
def test_amx_linear_is_the_product_of_the_rounded_operands(n: int, k: int, rows: int) -> None:
    torch.manual_seed(rows * 100 + k)
    w, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(rows, k)
    packed = amx.pack_weight(w)
    got = torch.ops.toyllm.amx_linear(x, packed, bias, n)
    exact = F.linear(x.bfloat16().double(), w.bfloat16().double(), bias.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * k**0.5)
    no_bias = torch.ops.toyllm.amx_linear(x, packed, torch.empty(0), n)
    torch.testing.assert_close(no_bias.double(), exact - bias.double(), rtol=1e-5, atol=1e-5 * k**0.5)
    one_at_a_time = torch.cat([torch.ops.toyllm.amx_linear(x[i : i + 1], packed, bias, n) for i in range(rows)])
    assert torch.equal(got, one_at_a_time)  # bit for bit: a row's result does not depend on its neighbours


@needs_amx
@pytest.mark.parametrize("rows", [1, 9])
def test_the_fused_gelu_is_gpt2s_tanh_gelu_of_the_product(rows: int) -> None:
    """c_fc's output goes through GPT-2's GELU inside the kernel: float64's GELU of the float64 product, to float32
    rounding (torch's own float32 GELU is further off near 0, where 1 + tanh(u) loses digits)."""
    torch.manual_seed(rows)
    n, k = 70, 64  # 70: a last column block of 6 real columns, the masked tail of the GELU loop
    w, bias, x = torch.randn(n, k) * 0.3, torch.randn(n), torch.randn(rows, k)
    x[0, :] = 0.0
    x[0, 0] = 1.0  # row 0: the product is W's first column plus the bias, values near 0 included
    got = torch.ops.toyllm.amx_linear(x, amx.pack_weight(w), bias, n, True).double()
    z = F.linear(x.bfloat16().double(), w.bfloat16().double(), bias.double())
    exact = 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))
    torch.testing.assert_close(got, exact, rtol=2e-6, atol=1e-6)
    assert torch.equal(
        got,
        torch.cat(
            [torch.ops.toyllm.amx_linear(x[i : i + 1], amx.pack_weight(w), bias, n, True).double() for i in range(rows)]
        ),
    )


@needs_amx
def test_the_operator_refuses_a_packing_that_does_not_fit() -> None:
    packed = amx.pack_weight(torch.randn(20, 64))
    with pytest.raises(RuntimeError, match="packed shape does not fit"):
        torch.ops.toyllm.amx_linear(torch.randn(2, 64), packed, torch.empty(0), 40)
    with pytest.raises(RuntimeError, match="packed shape does not fit"):
        torch.ops.toyllm.amx_linear(torch.randn(2, 96), packed, torch.empty(0), 20)


@needs_amx
def test_a_model_through_amx_keeps_weights_ties_training_and_its_cache() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()
    fast = amx.use_amx(copy.deepcopy(model))
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, amx.AmxLinear) for m in linears)
    for block in fast.transformer.h:  # each MLP's GELU moved into its c_fc
        assert block.mlp.c_fc.gelu and isinstance(block.mlp.act, torch.nn.Identity)
    assert not any(m.gelu for m in linears if m not in [b.mlp.c_fc for b in fast.transformer.h])
    assert fast.lm_head.weight is fast.transformer.wte.weight
    assert fast.state_dict().keys() == model.state_dict().keys()  # the packed copies are not saved
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        full = fast(ids)
        # bfloat16 operands: close to float32, not equal (8 bits of mantissa)
        torch.testing.assert_close(full, model(ids), rtol=0.05, atol=0.05)
        cache = KVCache.for_model(fast, 1, 40)
        fast(ids[:, :7], cache=cache)
        rest = fast(ids[:, 7:], cache=cache)  # 5 rows against a cache: the rows a one-pass prefill gave them
        torch.testing.assert_close(rest[0], full[0, 7:], rtol=1e-5, atol=1e-5)
    # With gradients on, F.linear (and the GELU) on the float32 weights: the unconverted model's loss (no dropout)
    loss = fast(ids, labels=ids).loss
    torch.testing.assert_close(loss, model(ids, labels=ids).loss)
    loss.backward()
    assert fast.lm_head.weight.grad is not None and fast.lm_head.weight.grad.abs().sum() > 0


@needs_amx
@pytest.mark.parametrize("lookahead", [1, 2, 4, 8])
def test_speculative_decoding_through_amx_is_its_plain_greedy_text(lookahead: int) -> None:
    torch.manual_seed(1)
    target = amx.use_amx(GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval())
    draft = target.first_layers(1)
    amx.use_amx(draft)
    config = GenerationConfig(max_new_tokens=40, temperature=0.0, eos_token_id=None, lookahead=lookahead)
    for prompt in range(4):
        ids = torch.randint(0, target.config.vocab_size, (1, 3 + prompt))
        assert torch.equal(generate(target, ids, config, draft_model=draft), generate(target, ids, config))


@needs_amx
def test_the_speculative_bench_times_both_models_through_amx(tmp_path) -> None:
    """`toyllm bench speculative --amx`: every product of the target and the draft on AMX, the same greedy text."""
    from kernel_helpers import KernelCalls

    from toyllm.bench.speculative import run_speculative_bench

    kw = dict(target="random:gpt2-tiny", cases=["self"], self_layers=1, lookaheads=[2], max_new_tokens=8)
    with KernelCalls() as calls:
        results = run_speculative_bench(**kw, amx=True, device="cpu", out_dir=tmp_path)
    assert results["settings"]["amx"] is True and calls.rows
    assert all(r["outputs_match"] is True for r in results["rows"])
    with pytest.raises(InvalidArgumentError, match="^choose one of --kernels and --amx$"):
        run_speculative_bench(**kw, amx=True, kernels=True, device="cpu")


@needs_amx
def test_the_amx_bench_mode_counts_the_bytes_it_reads() -> None:
    """`toyllm bench --modes kv,amx`: bfloat16 weights are half the bytes a step reads; the float32 weights are held
    (more bytes in all), not read."""
    from toyllm.bench.suite import BenchSettings, benchmark

    settings = BenchSettings(
        model="random:gpt2-tiny",
        modes=("kv", "amx"),
        max_new_tokens=6,
        warmup=0,
        repeats=1,
        device="cpu",
        bandwidth_probe_bytes=2**23,
    )
    rows = {r["mode"]: r for r in benchmark(settings)["results"]}
    kv, fast = rows["kv"], rows["amx"]
    assert fast["streamed_bytes"] < 0.55 * kv["streamed_bytes"] and fast["model_bytes"] > kv["model_bytes"]
    assert 0.0 <= fast["tokens_match"] <= 1.0


@needs_amx
def test_generate_cli_with_amx_prints_text_and_speculative_stats(capsys: pytest.CaptureFixture[str]) -> None:
    from kernel_helpers import KernelCalls

    from toyllm.cli.main import run_app

    args = ["generate", "Hello there", "--model", "random:gpt2-tiny", "-n", "12", "--temperature", "0", "--seed", "1"]
    texts = []
    for extra in (["--amx"], ["--amx", "--draft-layers", "1"]):
        with KernelCalls() as calls:
            assert run_app([*args, *extra]) == 0
        captured = capsys.readouterr()
        texts.append(captured.out)
        assert calls.rows  # the products went through AMX
    assert texts[0] == texts[1] and texts[0].startswith("Hello there")  # speculative = plain greedy, both on AMX
    assert "speculative:" in captured.err
    assert run_app([*args, "--amx", "--cpu-kernel"]) == 2
    assert capsys.readouterr().err.strip().endswith("choose one of --cpu-kernel and --amx")


@needs_amx
def test_a_layer_stays_right_after_conversion_casts_and_weight_changes() -> None:
    """The packed copy survives `.to(float32)` / `.half()` (it is int16 bits), follows in-place changes to the
    weight (an optimizer step, load_state_dict), and a narrower x is refused as F.linear refuses it."""
    torch.manual_seed(0)
    layer = amx.AmxLinear.from_linear(torch.nn.Linear(64, 20))
    x = torch.randn(3, 64)

    def exact() -> torch.Tensor:
        return F.linear(x.bfloat16().double(), layer.weight.bfloat16().double(), layer.bias.double()).float()

    with torch.no_grad():
        layer.to(torch.float32)
        assert layer.packed.dtype == torch.int16
        torch.testing.assert_close(layer(x), exact(), rtol=1e-5, atol=1e-4)
        layer.weight.mul_(-2.0)  # in place, as an optimizer step or load_state_dict writes
        torch.testing.assert_close(layer(x), exact(), rtol=1e-5, atol=1e-4)
        layer.load_state_dict({"weight": torch.randn(20, 64), "bias": torch.randn(20)})
        torch.testing.assert_close(layer(x), exact(), rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError, match="x has 48 features, the layer takes 64"):
            layer(torch.randn(3, 48))
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.toyllm.amx_linear(torch.randn(2, 0), torch.zeros(1, 0, 16, 16, 2, dtype=torch.int16), _EMPTY, 5)


_EMPTY = torch.empty(0)


@needs_amx
def test_a_self_draft_made_before_the_conversion_shares_every_packed_layer() -> None:
    """The CLI makes the self draft first, then converts target and draft: the head is packed once, not twice."""
    torch.manual_seed(2)
    target = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()
    draft = target.first_layers(1)
    amx.use_amx(target)
    amx.use_amx(draft)
    assert draft.lm_head is target.lm_head and draft.transformer.h[0] is target.transformer.h[0]
    packed = {id(m.packed) for model in (target, draft) for m in model.modules() if isinstance(m, amx.AmxLinear)}
    assert len(packed) == 4 * target.config.n_layer + 1


@needs_amx
def test_restricting_the_vocabulary_after_the_conversion() -> None:
    """restrict_vocab on a converted model: its smaller head is an AmxLinear too, with the kept rows' logits."""
    torch.manual_seed(3)
    model = amx.use_amx(GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval())
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        full = model(ids)
        keep = torch.tensor([0, 3, 7, 11, 50])
        model.restrict_vocab(keep)
        assert isinstance(model.head_subset, amx.AmxLinear)
        restricted = model(ids)
    torch.testing.assert_close(restricted[..., keep], full[..., keep])
    assert torch.isinf(restricted[..., 1]).all()


@needs_amx
def test_a_large_packed_copy_starts_on_a_huge_page() -> None:
    """Like gemv.cpp's weights, a packed copy of 2 MB or more goes to memory advised for 2 MB pages (where Linux
    allows), and again after a repack."""
    from toyllm import hugepages

    layer = amx.AmxLinear.from_linear(torch.nn.Linear(512, 4096, bias=False))  # 4 MB of bfloat16
    for _ in range(2):
        if hugepages.available():
            assert layer.packed.data_ptr() % hugepages.HUGE_PAGE == 0
        with torch.no_grad():
            layer.weight.add_(1.0)
            layer(torch.randn(1, 512))  # repacks


@needs_amx
def test_other_conversions_refuse_a_model_on_amx() -> None:
    """quantize_int8 and pack_for_cpu replace every Linear: on a converted model that would drop the GELU that c_fc
    carries, so they refuse in one line."""
    from toyllm.quantize import pack_for_cpu, quantize_int8

    model = amx.use_amx(GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")))
    with pytest.raises(InvalidArgumentError, match="^quantize_int8: the model is already on AMX tiles"):
        quantize_int8(model)
    with pytest.raises(InvalidArgumentError, match="^pack_for_cpu: the model is already on AMX tiles"):
        pack_for_cpu(model, "onednn")


def test_amx_can_be_turned_off_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOYLLM_KERNEL_AMX", "0")
    if kernels.load() is not None:
        assert amx.amx_unavailable_reason() == "disabled by TOYLLM_KERNEL_AMX=0"
