"""The logits processors against transformers' own, on random logits with ties and edge values."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from toyllm.errors import InvalidArgumentError
from toyllm.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    greedy,
    logits_to_probs,
    process_logits,
    sample,
    validate_sampling,
)

V = 50


def logit_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    random = torch.randn(4, V, generator=g) * 3
    ties = torch.randint(-3, 4, (4, V), generator=g).float()  # many exact ties
    peaked = torch.full((2, V), -10.0)
    peaked[:, 7] = 20.0  # one token holds almost all mass
    flat = torch.zeros(2, V)
    with_inf = torch.randn(2, V, generator=g)
    with_inf[:, :10] = float("-inf")
    big = torch.randn(2, V, generator=g) * 1e4
    return [random, ties, peaked, flat, with_inf, big]


def previous_ids(batch: int) -> torch.Tensor:
    return torch.randint(0, V, (batch, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(case: int, penalty: float) -> None:
    logits = logit_cases()[case]
    ids = previous_ids(logits.shape[0])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, ids, penalty), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.5])
def test_temperature_matches_hf(case: int, temperature: float) -> None:
    logits = logit_cases()[case]
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    torch.testing.assert_close(apply_temperature(logits, temperature), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("k", [1, 2, 5, 20, V - 1, V, V + 10])
def test_top_k_matches_hf(case: int, k: int) -> None:
    logits = logit_cases()[case]
    expected = TopKLogitsWarper(k)(None, logits.clone())
    torch.testing.assert_close(apply_top_k(logits, k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_hf(case: int, p: float) -> None:
    logits = logit_cases()[case]
    # HF's generate() only adds the warper when top_p < 1, so top_p == 1 must leave the logits untouched.
    expected = TopPLogitsWarper(p)(None, logits.clone()) if p < 1.0 else logits
    torch.testing.assert_close(apply_top_p(logits, p), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", range(6))
def test_full_pipeline_matches_hf_order(case: int) -> None:
    logits = logit_cases()[case]
    ids = previous_ids(logits.shape[0])
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(10),
            TopPLogitsWarper(0.9),
        ]
    )
    ours = process_logits(logits, ids, temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.2)
    torch.testing.assert_close(ours, hf(ids, logits.clone()), rtol=0, atol=0)


def test_padding_is_not_penalised() -> None:
    logits = torch.randn(1, V)
    ids = torch.tensor([[3, 3, 9, 4]])
    valid = torch.tensor([[0, 0, 1, 1]])  # two left-padding slots holding token 3
    out = apply_repetition_penalty(logits, ids, 2.0, valid)
    torch.testing.assert_close(out, apply_repetition_penalty(logits, ids[:, 2:], 2.0))
    assert out[0, 3] == logits[0, 3]


def test_greedy_is_argmax_and_probs_are_one_hot() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    probs = logits_to_probs(logits, 0.0)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())


def test_greedy_equals_torch_argmax_with_ties_and_infinities() -> None:
    logits = torch.randn(6, 50257)
    logits[1, [5, 900]] = 100.0  # an exact tie: the first index wins, as in torch
    logits[2] = float("-inf")
    logits[2, 77] = -3.0  # a restricted draft's row: -inf but for a few tokens
    logits[3, 17] = float("inf")
    for rows in (logits, logits[4], logits[:, ::2], logits.double()):  # 2-D, 1-D, strided, float64
        assert torch.equal(greedy(rows), rows.argmax(-1))
    assert greedy(logits).dtype == torch.long and greedy(logits[1]).item() == 5
    assert torch.equal(greedy(logits.bfloat16()), logits.bfloat16().argmax(-1))  # not numpy's: torch's own


def test_sampling_follows_the_distribution_and_the_seed() -> None:
    """A chi-square test (false-alarm rate 1e-3) on 20,000 draws; a sampler tilted by 4% fails the same test."""
    from test_speculative import ALPHA, chi_square_p_value

    probs = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    logits = torch.log(probs.float())[None].expand(20000, 3)
    draws = sample(logits, 1.0, torch.Generator().manual_seed(0))
    assert chi_square_p_value(torch.bincount(draws, minlength=3).double(), probs) > ALPHA
    tilted = torch.log(torch.tensor([0.14, 0.2, 0.66]))[None].expand(20000, 3)  # 4 points moved from the last token
    biased = sample(tilted, 1.0, torch.Generator().manual_seed(1))
    assert chi_square_p_value(torch.bincount(biased, minlength=3).double(), probs) < ALPHA  # the test has power
    again = sample(logits, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
        dict(temperature=float("inf")),  # divided every logit to 0, and masked (-inf) ones to NaN
        dict(repetition_penalty=float("inf")),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float]) -> None:
    args = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0) | kwargs
    with pytest.raises(InvalidArgumentError):
        validate_sampling(**args)  # type: ignore[arg-type]
