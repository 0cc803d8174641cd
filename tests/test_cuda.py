"""Correctness on an accelerator: the paths that CPU CI never runs on CUDA (SDPA kernels, bf16, torch.compile with
Triton, CUDA generators, fused AdamW, CUDA RNG state in checkpoints), each against a reference.

The device comes from TOYLLM_TEST_DEVICE, else CUDA when present; without either the whole module is skipped.
`TOYLLM_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py` runs the same checks on the CPU, to debug them here.
Every model is tiny and random: no network, no pretrained weights, and never the CPU kernel (toyllm/kernels).
TF32 is off for the whole module, so float32 on the GPU is compared at float32 tolerances (restored afterwards).

The distribution tests use the CPU tests' statistic and threshold (chi-square, false-alarm rate ALPHA = 1e-3 each)
with N_DIST samples: 20,000 (the CPU tests' N_SAMPLES) on CUDA, 1,000 on the CPU to keep this file short there
(TOYLLM_TEST_SAMPLES overrides it). On an H100 a sample takes about 5 to 8 ms (a few small launches and host syncs
per token), so the two exactness tests took about 4 minutes of the 47-test revision's 6; the no-residual power
check added since needs about 40 s more.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_generation import VOCAB, tiny_model
from test_speculative import (
    ALPHA,
    FILTERED,
    N_BROKEN,
    N_SAMPLES,
    PLAIN,
    NoResidualDecoder,
    NoTemperatureDecoder,
    RawQDecoder,
    chi_square_p_value,
    dist_config,
    exact_continuations,
    fixed_threshold,
    prompts,
    sample_next3,
    tiny,
)
from test_speculative_batch import left_padded
from train_helpers import full_and_resumed, tiny_config

from toyllm.generation import GenerationConfig, GenerationStats, generate, prefill
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.kv_cache import KVCache
from toyllm.sampling import process_logits, sample
from toyllm.speculative import SpeculativeDecoder
from toyllm.train import Trainer
from toyllm.train.data import META_FILE, TOKEN_DTYPE, TRAIN_FILE, VAL_FILE, token_files_meta

DEVICE = os.environ.get("TOYLLM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(
    not DEVICE, reason="needs CUDA (or TOYLLM_TEST_DEVICE=cpu to run these checks on the CPU)"
)
ON_CUDA = DEVICE.startswith("cuda")
N_DIST = int(os.environ.get("TOYLLM_TEST_SAMPLES") or (N_SAMPLES if ON_CUDA else 1_000))  # see the docstring
N_DIST_BROKEN = N_BROKEN if ON_CUDA else 1_500  # on the CPU the broken decoder fails from about 1,500 on


@pytest.fixture(autouse=True, scope="module")
def no_tf32():
    """float32 means float32: TF32 matmuls (10-bit mantissa) would need tolerances that hide real bugs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_device(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """A copy of a CPU model on DEVICE (the CPU original stays usable as a reference)."""
    return copy.deepcopy(model).to(DEVICE)


def greedy_config(**kw) -> GenerationConfig:
    return GenerationConfig(temperature=0.0, eos_token_id=None, **kw)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# -- 1. logits parity with transformers, float32 ------------------------------------------------------------------

WIDE = dict(n_layer=2, n_head=2, n_embd=128, n_positions=128, vocab_size=512)  # head size 64, as in real GPT-2


@pytest.mark.parametrize("name", ["2L4H-eps1e-6", "3L2H-n_inner", "untied", "wide-hs64"])
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    """A random transformers GPT-2, saved with save_pretrained and loaded by toyllm onto DEVICE: the same logits
    (whole window, a left-padded batch, the loss) and the same greedy tokens through toyllm's KV cache."""
    from test_model_parity import CONFIG_IDS, TINY_CONFIGS, hf_greedy, hf_model

    kwargs = WIDE if name == "wide-hs64" else TINY_CONFIGS[CONFIG_IDS.index(name)]
    torch.manual_seed(0)
    theirs = hf_model(**kwargs)
    theirs.save_pretrained(tmp_path)
    theirs = theirs.to(DEVICE)
    ours = GPT2LMHeadModel.from_pretrained(tmp_path, device=DEVICE)
    assert next(ours.parameters()).device.type == torch.device(DEVICE).type
    vocab, T = kwargs["vocab_size"], kwargs["n_positions"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, T), generator=g).to(DEVICE)  # the whole context window
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert max_abs(ours(ids), theirs(ids).logits) < 1e-4
        out = ours(ids, attention_mask=mask, position_ids=positions)
        ref = theirs(ids, attention_mask=mask, position_ids=positions).logits
        assert max_abs(out[mask.bool()], ref[mask.bool()]) < 1e-4  # padded positions' outputs mean nothing
        ours_loss, theirs_loss = ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss
        assert abs(float(ours_loss) - float(theirs_loss)) < 1e-4
        prompt = ids[:1, :5]
        expected = hf_greedy(theirs, prompt, 8)
    assert torch.equal(generate(ours, prompt, greedy_config(max_new_tokens=8)), expected)


# -- 2. KV cache and chunked prefill against the recompute-everything path -----------------------------------------


@pytest.fixture(scope="module")
def gen_model() -> GPT2LMHeadModel:
    return on_device(tiny_model())  # test_generation's model: 3 layers, 48 wide, 300 tokens, init 0.3


def test_kv_cache_step_logits_match_full_forward(gen_model) -> None:
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        full = gen_model(ids)  # (B, T, V) in one pass, no cache
        cache = KVCache.for_model(gen_model, batch_size=2)
        assert cache.k[0].device == ids.device
        steps = [gen_model(ids[:, :10], cache=cache)]
        steps += [gen_model(ids[:, t : t + 1], cache=cache) for t in range(10, 60)]
    assert max_abs(torch.cat(steps, dim=1), full) < 1e-4


@pytest.mark.parametrize("n_positions, new", [(256, 60), (32, 60)], ids=["in-window", "window-slides"])
def test_kv_cache_greedy_equals_no_cache(n_positions: int, new: int) -> None:
    model = on_device(tiny_model(n_positions=n_positions))
    for length in (1, 5, 20):
        prompt = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length)).to(DEVICE)
        cached = generate(model, prompt, greedy_config(max_new_tokens=new))
        plain = generate(model, prompt, greedy_config(max_new_tokens=new, use_kv_cache=False))
        assert torch.equal(cached, plain)
        assert len(set(cached[0, length:].tolist())) > 5  # a model that repeats one token would make this weak


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(gen_model, chunk: int) -> None:
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        one_cache, chunk_cache = KVCache.for_model(gen_model, 2), KVCache.for_model(gen_model, 2)
        one = prefill(gen_model, one_cache, ids)
        chunked = prefill(gen_model, chunk_cache, ids, chunk_size=chunk)
    assert max_abs(chunked, one) < 1e-4
    assert chunk_cache.length == one_cache.length == 100
    for layer in range(gen_model.config.n_layer):
        assert max_abs(chunk_cache.k[layer][:, :, :100], one_cache.k[layer][:, :, :100]) < 1e-4
        assert max_abs(chunk_cache.v[layer][:, :, :100], one_cache.v[layer][:, :, :100]) < 1e-4
    out_one = generate(gen_model, ids[:1], greedy_config(max_new_tokens=20))
    assert torch.equal(generate(gen_model, ids[:1], greedy_config(max_new_tokens=20, chunk_size=chunk)), out_one)


def test_batched_left_padding_equals_one_by_one(gen_model) -> None:
    ids, mask = left_padded((3, 11, 7), vocab=VOCAB)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    config = greedy_config(max_new_tokens=30, repetition_penalty=1.3)
    batched = generate(gen_model, ids, config, attention_mask=mask)
    T = ids.shape[1]
    for row in range(ids.shape[0]):
        alone = generate(gen_model, ids[row : row + 1, mask[row].bool()], config)
        assert torch.equal(batched[row, T:], alone[0, -30:]), f"row {row} differs"


# -- 3. bfloat16 against float32 -----------------------------------------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().argmax(-1) == b.float().argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A GPT-2-initialised model with every parameter perturbed (the recipe of test_model_parity.hf_model), saved."""
    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=300))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    directory = tmp_path_factory.mktemp("saved")
    model.save_pretrained(directory)
    return directory


def test_bfloat16_logits_close_to_float32(saved_model: Path) -> None:
    fp32 = GPT2LMHeadModel.from_pretrained(saved_model, device=DEVICE)
    bf16 = GPT2LMHeadModel.from_pretrained(saved_model, device=DEVICE, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref, out = fp32(ids), bf16(ids)
        assert out.dtype == torch.bfloat16
        assert relative_error(out, ref) < 2e-2 and top1_agreement(out, ref) > 0.9
        real = mask.bool()
        ref_pad = fp32(ids, attention_mask=mask, position_ids=positions)[real]
        out_pad = bf16(ids, attention_mask=mask, position_ids=positions)[real]
        assert relative_error(out_pad, ref_pad) < 2e-2 and top1_agreement(out_pad, ref_pad) > 0.9
        cache = KVCache.for_model(bf16, batch_size=4)
        assert cache.k[0].dtype == torch.bfloat16
        steps = [bf16(ids[:, :16], cache=cache)] + [bf16(ids[:, t : t + 1], cache=cache) for t in range(16, 64)]
        cached = torch.cat(steps, dim=1)
        assert relative_error(cached, ref) < 2e-2 and top1_agreement(cached, ref) > 0.9


def test_bfloat16_generation_follows_its_own_logits(saved_model: Path) -> None:
    """Greedy generation in bf16 with the KV cache picks, at almost every step, the argmax of the bf16 model's
    no-cache forward over the same tokens (bf16 rounding may flip a near tie, hence not every step)."""
    bf16 = GPT2LMHeadModel.from_pretrained(saved_model, device=DEVICE, dtype="bfloat16")
    prompt = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out = generate(bf16, prompt, greedy_config(max_new_tokens=30))
    with torch.no_grad():
        logits = bf16(out[:, :-1])[:, 5:]  # position t predicts token t + 1
    assert float((logits.argmax(-1) == out[:, 6:]).float().mean()) > 0.9


# -- 4. torch.compile ------------------------------------------------------------------------------------------


def _cpu_compiler() -> str | None:
    for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@pytest.mark.slow
def test_compiled_greedy_generation_equals_eager() -> None:
    if not ON_CUDA and _cpu_compiler() is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler, and none was found")
    model = on_device(tiny_model(n_positions=64))
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    config = greedy_config(max_new_tokens=12)
    expected = generate(model, prompt, config)
    torch._dynamo.reset()
    try:
        # fullgraph: a graph break or a recompile-limit fallback to eager would raise instead of passing unseen.
        compiled = torch.compile(model, dynamic=True, fullgraph=True)
        assert torch.equal(generate(compiled, prompt, config), expected)
        # The logits too, through the graphs generation compiled: a 40-token prefill, then decode steps. (Tensors
        # made as `generate` makes them, a cache outside inference mode and decode inputs inside, so no recompile.)
        ids = torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(9)).to(DEVICE)
        caches = KVCache.for_model(model, 1), KVCache.for_model(model, 1)
        with torch.inference_mode():
            ours, ref = [prefill(compiled, caches[0], ids[:, :40])], [prefill(model, caches[1], ids[:, :40])]
            for t in range(40, 45):
                step = ids[:, t : t + 1].clone()
                ours.append(compiled(step, cache=caches[0], logits_to_keep=1)[:, -1])
                ref.append(model(step, cache=caches[1], logits_to_keep=1)[:, -1])
        assert max_abs(torch.stack(ours), torch.stack(ref)) < 1e-4
    finally:
        torch._dynamo.reset()


# -- 5. speculative decoding: greedy output is the target's ------------------------------------------------------


@pytest.fixture(scope="module")
def spec_models() -> dict[str, GPT2LMHeadModel]:
    """test_speculative's target (3 layers, 96 tokens) on DEVICE and its drafts."""
    target = on_device(tiny(0))
    return {
        "target": target,
        "same": target,
        "unrelated": on_device(tiny(7, n_layer=1, tie_word_embeddings=False)),
        "self": target.first_layers(1),
    }


@pytest.fixture(scope="module")
def spec_prompts(spec_models) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt, the target's plain greedy output) for prompts of 1 to 20 tokens, on DEVICE."""
    config = greedy_config(max_new_tokens=24)
    out = []
    for ids in prompts(96):
        ids = ids.to(DEVICE)
        out.append((ids, generate(spec_models["target"], ids, config)))
    return out


@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["same", "unrelated", "self"])
def test_speculative_greedy_equals_target_greedy(spec_models, spec_prompts, kind: str, K: int) -> None:
    config = greedy_config(max_new_tokens=24, lookahead=K, max_lookahead=8)
    proposed = accepted = 0
    for ids, expected in spec_prompts:
        stats = GenerationStats()
        out = generate(spec_models["target"], ids, config, draft_model=spec_models[kind], stats=stats)
        assert torch.equal(out, expected)
        proposed, accepted = proposed + stats.extra["proposed"], accepted + stats.extra["accepted"]
    assert proposed > 0  # the draft did propose: the speculative path ran
    if kind == "same":
        assert accepted == proposed
    if kind == "unrelated":
        assert accepted < 0.1 * proposed


@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["same", "unrelated", "self"])
def test_batched_speculative_greedy_equals_plain_batched_greedy(spec_models, kind: str, K: int) -> None:
    ids, mask = left_padded((1, 5, 9, 3, 20))
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    config = greedy_config(max_new_tokens=24, lookahead=K, max_lookahead=8)
    expected = generate(spec_models["target"], ids, config, attention_mask=mask)
    stats = GenerationStats()
    out = generate(spec_models["target"], ids, config, attention_mask=mask, draft_model=spec_models[kind], stats=stats)
    assert torch.equal(out, expected)
    assert stats.extra["proposed"] > 0
    if kind == "same":
        assert stats.extra["acceptance_rate"] == 1.0


# -- 6. speculative sampling: the output distribution is the target's, exactly ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "knobs, schedule",
    [(PLAIN, fixed_threshold), (FILTERED, None)],
    ids=["temperature1-threshold-schedule", "temperature0.7-topk-topp-penalty"],
)
def test_speculative_distribution_is_exactly_the_targets(small_pair, knobs, schedule) -> None:
    """Sampled on DEVICE (CUDA generators, kernels); the exact joint distribution of the next 3 tokens enumerated
    with the CPU float32 model."""
    target, draft = small_pair
    config, prompt = dist_config(knobs), torch.tensor([[3]])
    counts, alpha = sample_next3(
        SpeculativeDecoder, on_device(target), on_device(draft), prompt.to(DEVICE), config, N_DIST, schedule
    )
    p_value = chi_square_p_value(counts, exact_continuations(target, prompt, 3, config))
    print(f"{N_DIST} samples: acceptance {alpha:.3f}, chi-square p-value {p_value:.3g}")
    assert 0.1 < alpha < 0.9  # rejections and acceptances both happen, so the residual path is exercised
    assert p_value > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken",
    [RawQDecoder, NoResidualDecoder, NoTemperatureDecoder],
    ids=["q-from-raw-logits", "no-residual", "temperature-dropped"],
)
def test_the_same_test_catches_a_broken_decoder(small_pair, broken: type[SpeculativeDecoder]) -> None:
    """Power: test_speculative's broken decoders (q from the unprocessed logits; p instead of the residual after a
    rejection; the temperature dropped) fail the same test on DEVICE."""
    target, draft = small_pair
    config, prompt = dist_config(FILTERED), torch.tensor([[3]])
    counts, _ = sample_next3(broken, on_device(target), on_device(draft), prompt.to(DEVICE), config, N_DIST_BROKEN)
    p_value = chi_square_p_value(counts, exact_continuations(target, prompt, 3, config))
    print(f"{N_DIST_BROKEN} samples: chi-square p-value of the broken decoder {p_value:.3g}")
    assert p_value < ALPHA


# -- 7. training ---------------------------------------------------------------------------------------------------


def count_saved_tensors(fn) -> int:
    """How many tensors autograd saves for backward while `fn` runs (outside checkpointed regions)."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved[0]


@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(precision: str) -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=3, n_head=2, n_embd=32, n_positions=16, vocab_size=300, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = GPT2LMHeadModel(cfg).to(DEVICE).train()
    ids = torch.randint(0, 300, (2, 16)).to(DEVICE)
    autocast = precision != "float32"
    results = {}
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        losses = []

        def step() -> None:
            with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
                losses.append(model(ids, labels=ids).loss)  # noqa: B023 (runs inside this iteration)

        saved = count_saved_tensors(step)
        losses[0].backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results[checkpointing] = (float(losses[0].detach()), grads, saved)
    (loss, grads, saved), (loss_ckpt, grads_ckpt, saved_ckpt) = results[False], results[True]
    assert saved_ckpt < saved / 2  # the blocks' activations really were not stored
    assert loss_ckpt == pytest.approx(loss, rel=1e-6 if not autocast else 1e-3)
    rtol, atol = (1e-5, 1e-6) if not autocast else (2e-2, 1e-4)
    for a, b in zip(grads, grads_ckpt, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


def write_prepared(directory: Path, train_tokens: np.ndarray, val_tokens: np.ndarray) -> Path:
    """A prepared-data directory (what `toyllm prepare` writes) holding these token ids, without a tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    train_tokens.astype(TOKEN_DTYPE).tofile(directory / TRAIN_FILE)
    val_tokens.astype(TOKEN_DTYPE).tofile(directory / VAL_FILE)
    meta = token_files_meta("gpt2", 50257, 50256, len(train_tokens), len(val_tokens), 1, 0.1, sha256="synthetic")
    (directory / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def one_window(tmp_path_factory) -> Path:
    """Exactly one 32-token training window (33 tokens), so every batch repeats it; no validation split."""
    tokens = np.random.default_rng(0).integers(0, 1000, 33)
    return write_prepared(tmp_path_factory.mktemp("one_window"), tokens, np.zeros(0, dtype=np.int64))


@pytest.fixture(scope="module")
def many_windows(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    return write_prepared(tmp_path_factory.mktemp("many"), rng.integers(0, 1000, 3000), rng.integers(0, 1000, 200))


def test_bf16_autocast_training_reduces_the_loss_with_and_without_checkpointing(one_window, tmp_path) -> None:
    """The Trainer (fused AdamW, bf16 autocast) on DEVICE fits one repeated batch; gradient checkpointing changes
    nothing but memory: the same first loss, and losses that stay together."""
    results = {}
    for checkpointing in (False, True):
        config = tiny_config(
            one_window,
            tmp_path / f"run-{checkpointing}",
            device=DEVICE,
            precision="bf16",
            gradient_checkpointing=checkpointing,
            max_steps=8,
            eval_interval=8,
            batch_size=2,
            learning_rate=1e-2,
        )
        trainer = Trainer(config)
        assert trainer.autocast_dtype == torch.bfloat16 and trainer.model.gradient_checkpointing is checkpointing
        assert next(trainer.model.parameters()).device.type == torch.device(DEVICE).type
        results[checkpointing] = trainer.fit().losses
    plain, ckpt = results[False], results[True]
    assert plain[0] > 10.0  # about ln(50257) at the start
    assert plain[-1] < plain[0] - 1.5 and ckpt[-1] < ckpt[0] - 1.5
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-3)
    assert ckpt == pytest.approx(plain, rel=5e-2)


def test_checkpoint_resume_continues_the_run(many_windows, tmp_path) -> None:
    """Interrupted after the step-2 checkpoint and resumed on DEVICE == uninterrupted: the model, optimizer, data
    position and (CUDA) RNG state all came back. Dropout makes the RNG matter."""
    options = dict(device=DEVICE, max_steps=5, eval_interval=2, dropout=0.1, grad_accum=2)
    full, resumed = full_and_resumed(many_windows, tmp_path, **options)
    assert len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5)
    assert resumed.val_loss == pytest.approx(full.val_loss, rel=1e-5)
    # The saved model reloads onto DEVICE with the weights the uninterrupted run ended with.
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "cut" / "latest", device=DEVICE)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "full" / "latest", device=DEVICE)
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- 8. sampling -----------------------------------------------------------------------------------------------


SAMPLING = dict(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.2)


def test_seeded_sampling_repeats_and_stays_inside_top_k_and_top_p(gen_model) -> None:
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(10)).to(DEVICE)
    config = GenerationConfig(max_new_tokens=30, seed=123, eos_token_id=None, **SAMPLING)
    a, b = generate(gen_model, prompt, config), generate(gen_model, prompt, config)
    assert torch.equal(a, b)
    config.use_kv_cache = False
    assert torch.equal(generate(gen_model, prompt, config), a)  # the same draws from the no-cache path's logits
    config.seed, config.use_kv_cache = 124, True
    assert not torch.equal(generate(gen_model, prompt, config), a)  # the seed matters
    with torch.no_grad():
        logits = gen_model(a[:, :-1])  # position t predicts token t + 1, from the no-cache reference path
    for t in range(6, a.shape[1]):
        step_logits = logits[:, t - 1]
        processed = process_logits(step_logits, a[:, :t], **SAMPLING)
        token = int(a[0, t])
        penalised = process_logits(step_logits, a[:, :t], temperature=0.0, repetition_penalty=1.2)
        assert token in torch.topk(penalised[0], 5).indices.tolist()  # top-k over the penalised logits (HF order)
        assert bool(torch.isfinite(processed[0, token]))  # and inside the top-p nucleus
        assert int(torch.isfinite(processed[0]).sum()) <= 5


def test_sampler_follows_the_processed_distribution(gen_model) -> None:
    """20,000 draws of `sample` on DEVICE with a seeded device generator against softmax of the processed logits
    (chi-square, ALPHA): right frequencies, and never a token that top-k or top-p removed."""
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    with torch.no_grad():
        logits = gen_model(prompt)[:, -1]
    processed = process_logits(logits, prompt, temperature=1.5, top_k=40, top_p=0.95)
    probs = torch.softmax(processed[0].double(), dim=-1).cpu()
    assert 5 < int((probs > 0).sum()) <= 40
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    draws = sample(processed.expand(20_000, -1), 1.5, generator)
    assert draws.device.type == torch.device(DEVICE).type
    counts = torch.bincount(draws.cpu(), minlength=VOCAB).double()
    assert chi_square_p_value(counts, probs) > ALPHA
    again = sample(processed.expand(20_000, -1), 1.5, torch.Generator(device=DEVICE).manual_seed(0))
    assert torch.equal(again, draws)
