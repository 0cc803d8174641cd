"""toyllm/hugepages.py: weights moved into huge-page memory keep their values, ties, outputs and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toyllm import hugepages
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")


def _vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping that holds `address` (/proc/self/smaps `VmFlags`)."""
    for begin, end, fields in hugepages.mappings():
        if begin <= address < end:
            return fields["VmFlags"].split()
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_moved_weights_keep_values_ties_outputs_and_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        logits = model(ids)
    big = max(model.parameters(), key=lambda p: p.numel())
    kept = big  # the same Parameter object afterwards

    assert big.numel() * big.element_size() >= hugepages.HUGE_PAGE  # the tied embedding: whole huge pages
    moved = hugepages.use_huge_pages(model)
    assert moved >= big.numel() * big.element_size()
    assert kept is max(model.parameters(), key=lambda p: p.numel())
    assert big.data_ptr() % hugepages.HUGE_PAGE == 0
    assert "hg" in _vm_flags(big.data_ptr())  # madvise(MADV_HUGEPAGE) reached the kernel
    assert hugepages.huge_page_bytes([big]) > 0  # and Linux backed it with huge pages
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still one tensor
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    with torch.no_grad():
        assert torch.equal(model(ids), logits)
    assert hugepages.use_huge_pages(model) == 0  # already moved: not copied again

    model.save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    for name, p in again.named_parameters():
        assert torch.equal(p, before[name]), name


@needs_thp
def test_a_large_weight_is_advised_for_huge_pages() -> None:
    layer = torch.nn.Linear(1024, 1536)  # 6 MB of float32 weights: whole huge pages; a 6 KB bias
    weight, bias_pointer = layer.weight.detach().clone(), layer.bias.data_ptr()
    assert hugepages.use_huge_pages(layer) == 1024 * 1536 * 4
    assert layer.weight.data_ptr() % hugepages.HUGE_PAGE == 0 and "hg" in _vm_flags(layer.weight.data_ptr())
    assert torch.equal(layer.weight, weight)
    assert layer.bias.data_ptr() == bias_pointer  # under min_bytes: left where it was


@needs_thp
def test_int8_weights_which_are_buffers_move_too() -> None:
    from toyllm.quantize import Int8Linear

    layer = Int8Linear.from_linear(torch.nn.Linear(2048, 2048))  # a 4 MB int8 weight buffer
    x = torch.randn(3, 2048)
    expected = layer(x)
    assert hugepages.use_huge_pages(layer) == 2048 * 2048
    assert layer.weight.data_ptr() % hugepages.HUGE_PAGE == 0 and torch.equal(layer(x), expected)


@needs_thp
def test_moved_under_inference_mode_the_weights_can_still_train() -> None:
    layer = torch.nn.Linear(1024, 1024)
    with torch.inference_mode():
        assert hugepages.use_huge_pages(layer) == 1024 * 1024 * 4
    layer(torch.randn(2, 1024)).sum().backward()  # an inference tensor would refuse to join autograd
    assert layer.weight.grad is not None


@needs_thp
def test_the_cpu_kernel_puts_weights_in_huge_pages() -> None:
    from toyllm import kernels

    if kernels._why_not_supported() is not None:
        pytest.skip(f"no CPU kernel here: {kernels._why_not_supported()}")
    model = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()
    kernels.use_cpu_kernels(model)
    assert model.lm_head.weight.data_ptr() % hugepages.HUGE_PAGE == 0
    assert "hg" in _vm_flags(model.lm_head.weight.data_ptr())


@pytest.mark.parametrize("how", ["setting", "environment"])
def test_without_huge_pages_nothing_moves(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "setting":
        monkeypatch.setattr(hugepages, "setting", lambda: "never")
    else:
        monkeypatch.setenv("TOYLLM_HUGEPAGES", "0")
    layer = torch.nn.Linear(1024, 1536)
    pointer = layer.weight.data_ptr()
    assert not hugepages.available()
    assert hugepages.use_huge_pages(layer) == 0 and layer.weight.data_ptr() == pointer


def test_bench_kernel_huge_pages_ab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from toyllm import kernels
    from toyllm.cli.main import run_app

    if kernels._why_not_supported() is not None or not hugepages.available():
        pytest.skip("needs the CPU kernel and transparent huge pages")
    args = ["bench", "kernel", "--model", "random:gpt2-tiny", "--rows", "1,3", "-r", "1", "--out", str(tmp_path)]
    assert run_app([*args, "--huge-pages"]) == 0
    ab = json.loads((tmp_path / "kernel.json").read_text())["result"]["huge_pages"]
    assert ab["setting"] == hugepages.setting()
    assert ab["huge_page_bytes"]["small"] == 0 < ab["huge_page_bytes"]["huge"] <= ab["weight_bytes"] + (2 << 20)
    assert [r["rows"] for r in ab["rows"]] == [1, 3] and ab["rows"][0]["small_vs_small_1_row"] == 1.0
    assert all(r["huge_ms"] > 0 and r["small_ms"] > 0 for r in ab["rows"])

    monkeypatch.setattr(hugepages, "setting", lambda: "never")
    capsys.readouterr()
    assert run_app([*args, "--huge-pages"]) == 2
    err = capsys.readouterr().err
    assert "--huge-pages needs Linux transparent huge pages" in err and "Traceback" not in err
