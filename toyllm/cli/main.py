"""Entry point of the `toyllm` console script: imports every subcommand module, then runs the app."""

from __future__ import annotations

from toyllm.cli import bench, generate, train  # noqa: F401  (each module registers its commands on `app`)
from toyllm.cli.app import app, main, run_app

__all__ = ["app", "main", "run_app"]

if __name__ == "__main__":
    main()
