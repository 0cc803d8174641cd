"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) on toyllm's GPT-2 and KV cache.

Use it through `toyllm.generation.generate(target, ids, config, draft_model=draft)`; this package holds the engine.
"""

from toyllm.speculative.batch import BatchSpeculativeDecoder, batch_speculative_stream
from toyllm.speculative.decode import SpeculativeDecoder, check_draft, speculative_stream
from toyllm.speculative.schedules import (
    ConstantSchedule,
    HeuristicSchedule,
    LookaheadSchedule,
    ThresholdSchedule,
    VerifyCost,
    make_schedule,
)
from toyllm.speculative.stats import SpeculativeStats
from toyllm.speculative.verify import residual_distribution, verify_drafts, verify_greedy
from toyllm.speculative.vocab import draft_vocabulary, frequent_tokens

__all__ = [
    "BatchSpeculativeDecoder",
    "ConstantSchedule",
    "HeuristicSchedule",
    "LookaheadSchedule",
    "SpeculativeDecoder",
    "SpeculativeStats",
    "ThresholdSchedule",
    "VerifyCost",
    "batch_speculative_stream",
    "check_draft",
    "draft_vocabulary",
    "frequent_tokens",
    "make_schedule",
    "residual_distribution",
    "speculative_stream",
    "verify_drafts",
    "verify_greedy",
]
