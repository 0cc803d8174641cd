"""DDP: `toyllm train` under torchrun with 2 CPU processes (gloo) equals 1 process with twice the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_helpers import prepared_shakespeare, tiny_config

from toyllm.train import train
from toyllm.train.checkpoint import list_checkpoints


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    data = prepared_shakespeare(tmp_path)
    common = dict(max_steps=3, eval_interval=3, dropout=0.0, device="cpu")
    single = train(tiny_config(data, tmp_path / "single", batch_size=4, **common))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "toyllm.cli.main", "train", "--data", str(data), "--out", str(tmp_path / "ddp")]
    cmd += ["--model", "random:gpt2-tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
    cmd += ["--batch-size", "2", "--max-steps", "3", "--eval-interval", "3", "--eval-iters", "2", "--dropout", "0"]
    cmd += ["--warmup-steps", "2", "--learning-rate", "3e-3", "--sample-tokens", "0", "--peak-flops", "1e12"]
    cmd += ["--device", "cpu", "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("done: step 3") == 1  # rank 0 alone reports the run, as it alone logs

    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    val = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert len(losses) == 3 and len(val) == 1  # rank 0 alone logged
    assert losses == pytest.approx(single.losses, rel=1e-5, abs=1e-5)
    assert val[0] == pytest.approx(single.val_loss, rel=1e-5)
    assert records[0]["tokens"] == 2 * 2 * 32  # the global batch: 2 ranks x 2 sequences x 32 tokens
    assert [p.name for p in list_checkpoints(tmp_path / "ddp")] == ["step-00000003"]
