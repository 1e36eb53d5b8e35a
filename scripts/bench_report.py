"""What every benchmark script does with its results: the table printed, and both written where asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kallm.recipes.experiment import portable_paths


def write_report(report: dict, table: str, json_path: str | None, markdown_path: str | None) -> None:
    """Write ``report`` as JSON to ``json_path`` and the markdown ``table`` to ``markdown_path`` (either skipped
    when empty or None). Data under ``${KALLM_DATA_DIR}`` is named so, not by this machine's folders."""
    if json_path:
        Path(json_path).write_text(portable_paths(json.dumps(report, indent=2)) + "\n", encoding="utf-8")
    if markdown_path:
        Path(markdown_path).write_text(portable_paths(table), encoding="utf-8")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as the tables quote them (runs on shared cores say how shared)."""
    return " ".join(f"{value:.1f}" for value in os.getloadavg())
