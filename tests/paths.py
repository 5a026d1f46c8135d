"""Where the checkout is, for tests that read its files (config, models, docs) or run its commands
there: `from tests.paths import REPO`."""

from __future__ import annotations

from pathlib import Path

#: The repository root: the folder that holds `ktulhu/`, `tests/`, `config/` and `models/`.
REPO = Path(__file__).resolve().parents[1]
