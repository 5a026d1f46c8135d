"""Where the checkout is, for the benchmarks (run as `python -m bench.<name>` from it): its model,
its docs, `bench/results/`. `from bench.paths import REPO`."""

from __future__ import annotations

from pathlib import Path

#: The repository root: the folder that holds `ktulhu/`, `bench/`, `config/` and `models/`.
REPO = Path(__file__).resolve().parents[1]
