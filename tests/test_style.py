"""The code stays formatted, linted and type-checked, and packages whole: CI runs these with the rest of the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint_and_format() -> None:
    pytest.importorskip("ruff")  # the dev extra
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy() -> None:
    pytest.importorskip("mypy")
    result = run("mypy", "toyllm")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_built_wheel_carries_the_kernel_source(tmp_path: Path) -> None:
    """`pip install .` (not editable) installs from a wheel; without gemv.cpp in it, --cpu-kernel failed there with
    'No such file or directory'. Build the wheel as pip does, offline, from a copy of the sources (so that the
    build's egg-info and build/ folders stay out of the checkout)."""
    src = tmp_path / "src"
    skip = ("*.egg-info", "build", "runs", "bench_out", "__pycache__", ".git", ".gpu", ".venv", "docs", "tests")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    wheel_dir = tmp_path / "wheel"
    build = run("pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(src))
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheel_dir.glob("toyllm-*.whl")
    assert "toyllm/kernels/gemv.cpp" in zipfile.ZipFile(wheel).namelist()
