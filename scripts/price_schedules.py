"""Price lookahead schedules' decisions in a fixed cost model, with no clock involved.

Each schedule decodes the same prompts; its rounds are then priced at one target step per verification and c per
draft forward (the prompt's forwards left out), and compared with plain decoding at one step per token. Because
nothing is timed, the result separates a schedule's choices from the machine's noise. The eighth session used it to
ask whether the `threshold` rule chooses well when drafts cost c = 0.44 of a target step and verification costs one
step (the H100's costs, as far as that run measured them). Run it from the repository root, with the trained
Shakespeare pair in runs/ (docs/training_results.md):

    python scripts/price_schedules.py --cost-ratio 0.44

Scratch-level tooling, outside the package and CI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from toyllm.generation import GenerationConfig
from toyllm.gpt2 import GPT2LMHeadModel
from toyllm.speculative.decode import speculative_stream
from toyllm.speculative.schedules import ConstantSchedule, LookaheadSchedule, ThresholdSchedule
from toyllm.speculative.stats import SpeculativeStats
from toyllm.speculative.vocab import draft_vocabulary
from toyllm.tokenizer import load_tokenizer


def price(stats: SpeculativeStats, prompts: int, c: float, v: float) -> float:
    """Tokens per modelled target step: plain decoding makes 1."""
    decode_draft_forwards = stats.draft_forwards - prompts  # each prompt's first draft forward is its prefill
    return stats.new_tokens / (v * stats.rounds + c * decode_draft_forwards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="runs/shakespeare-6x384/best")
    parser.add_argument("--draft", default="runs/shakespeare-draft-distilled/best")
    parser.add_argument("--vocab-data", default="runs/data/distill-6x384")
    parser.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--cost-ratio", type=float, default=0.44)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()

    target = GPT2LMHeadModel.from_pretrained(args.target).eval()
    draft = GPT2LMHeadModel.from_pretrained(args.draft).eval()
    eos = target.config.eos_token_id
    draft.restrict_vocab(draft_vocabulary(1024, target.config.vocab_size, args.vocab_data, (eos,)))
    text = Path(args.text).read_text(encoding="utf-8")
    ids = load_tokenizer(args.target).encode(text[-len(text) // 20 :])  # prompts from its last 5%
    starts = [i * (len(ids) - 40) // args.prompts for i in range(args.prompts)]
    prompts = [torch.tensor([ids[s : s + 32]]) for s in starts]
    c, v = args.cost_ratio, 1.0  # v = 1: the paper's model, and what the threshold rule is told (verify_slope=0)

    def config(k: int, schedule: str) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=args.new_tokens,
            temperature=0.0,
            eos_token_id=None,
            lookahead=k,
            max_lookahead=k,
            lookahead_schedule=schedule,
        )

    def schedules(k: int) -> dict[str, LookaheadSchedule]:
        return {
            "constant": ConstantSchedule(config(k, "constant")),
            "threshold": ThresholdSchedule(config(k, "threshold"), cost_ratio=c, verify_slope=0.0),
        }

    print(f"cost model: c = {c}, v = {v}; {args.prompts} prompts x {args.new_tokens} tokens, greedy")
    print("| schedule | K (at most) | rounds | draft forwards | tokens | priced speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for k in (2, 4, 8):
            for name in ("constant", "threshold"):
                parts = []
                for prompt in prompts:
                    stats = SpeculativeStats()
                    schedule = schedules(k)[name]
                    for _ in speculative_stream(
                        target, draft, prompt, config(k, name), spec_stats=stats, schedule=schedule
                    ):
                        pass
                    parts.append(stats)
                total = SpeculativeStats.total(parts)
                speedup = price(total, len(prompts), c, v)
                print(
                    f"| {name} | {k} | {total.rounds} | {total.draft_forwards} | {total.new_tokens} | {speedup:.3f}x |"
                )


if __name__ == "__main__":
    main()
