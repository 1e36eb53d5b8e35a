"""The healing curve as a picture."""

from __future__ import annotations

import os
from pathlib import Path


def plot_curve(curve: list[dict], path: str | os.PathLike) -> Path | None:
    """A PNG of the end-to-end KL against minutes (and the local stage's held-out error); None without points."""
    points = [p for p in curve if p["stage"] == "end_to_end"]
    local = [p for p in curve if p["stage"] == "local"]
    if not points and not local:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if points:
        axis.plot([p["seconds"] / 60 for p in points], [p["kl"] for p in points], label="KL to the original")
    if local:
        axis.plot([p["seconds"] / 60 for p in local], [p["error"] for p in local], "o-",
                  label="local stage: held-out block error")
    axis.set_xlabel("minutes")
    if all(value > 0 for line in axis.get_lines() for value in line.get_ydata()):
        axis.set_yscale("log")
    axis.set_title("kallm heal")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
