"""Test-session settings.

One intra-op thread per process: the models here are tiny, so a second thread buys little, and on a busy machine
(or when a test spawns worker processes) OpenMP threads competing for the same cores make small ops hundreds of
times slower. Set TOYLLM_TEST_THREADS to change it. The variable is set before torch is imported so that test
subprocesses (CLI runs, DDP workers) inherit it.
"""

from __future__ import annotations

import os

THREADS = os.environ.setdefault("TOYLLM_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("MKL_NUM_THREADS", THREADS)

import torch  # noqa: E402

torch.set_num_threads(int(THREADS))
