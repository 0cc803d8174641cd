"""Test-session settings, and the one fixture that several test modules share (`small_pair`).

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

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))


@pytest.fixture(scope="module")
def small_pair():
    """The 8-token target and draft of every distribution test (test_speculative, test_speculative_batch, test_cuda):
    small enough to enumerate each continuation exactly. On the CPU: the enumeration reference is computed there."""
    from test_speculative import V, tiny

    kw = dict(vocab=V, n_layer=1, n_positions=16, std=0.5)
    return tiny(0, **kw), tiny(1, **kw)
