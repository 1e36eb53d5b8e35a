"""What the recipes share: YAML configs with ``${KALLM_*}`` variables, arm names and seeds, peak memory, and
``OUT/runs.json``, the record of finished runs that lets an interrupted grid resume where it stopped."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import torch
import yaml

#: arm names become folder names under the output folder
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ARM_NAME_RULE = "a letter or digit, then letters, digits, '.', '_' or '-' (no '..')"
#: the environment variables ``${VAR}`` may name
ENV_PREFIX = "KALLM_"


def check_unique_seeds(seeds: list[int], name: str) -> None:
    """Refuse a seed given twice: its run would count twice in the mean and the spread over seeds."""
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ValueError(f"{name} {repeated} given more than once; each seed is one run, and a repeated one would "
                         f"count twice in the mean and spread over seeds")


def read_config(path: Path, what: str) -> dict:
    """The settings of a YAML ``what`` config (``${KALLM_*}`` expanded); a missing file, a YAML syntax error or a
    document that is no mapping raise one clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path} is no valid YAML{at}: {problem}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is no UTF-8 text: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping of settings, got {type(raw).__name__}")
    return _expand_env(raw)


def _expand_env(value):
    if isinstance(value, dict):
        return {key: _expand_env(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_env(item) for item in value]
    if isinstance(value, str):
        def substitute(match):
            name = match.group(1)
            if not name.startswith(ENV_PREFIX):
                raise ValueError(f"the experiment config uses ${{{name}}}, but only environment variables whose names "
                                 f"start with {ENV_PREFIX} are expanded (e.g. ${{KALLM_DATA_DIR}}); set one, e.g. "
                                 f"{ENV_PREFIX}{name}, and use that")
            if name not in os.environ:
                raise ValueError(f"the experiment config uses ${{{name}}}, but the environment variable {name} is not set")
            return os.environ[name]

        return re.sub(r"\$\{(\w+)\}", substitute, value)
    return value


class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak on GPU, else the process RSS
    sampled every 50 ms (CPU has no allocator statistics)."""

    def __enter__(self):
        self.peak_bytes = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def portable_paths(text: str) -> str:
    """``text`` with the folders that ``${KALLM_*}`` variables name (``KALLM_DATA_DIR``) written as those
    variables again: a report names data as the config does, not where this machine keeps it."""
    folders = {name: value.rstrip(os.sep) for name, value in os.environ.items()
               if name.startswith(ENV_PREFIX) and os.path.isabs(value) and os.path.isdir(value)}
    for name, folder in sorted(folders.items(), key=lambda item: -len(item[1])):  # the deepest folder first
        if folder:
            text = text.replace(folder, f"${{{name}}}")
    return text


def load_recorded_runs(path: Path) -> dict:
    """The runs an earlier ``kallm experiment`` recorded in ``path``, by (arm name, seed)."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(records, list) and all(isinstance(r, dict) for r in records) else "not a list of runs"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"not valid JSON: {error}"
    if problem:
        raise ValueError(f"{path} is {problem}, so the runs it holds cannot be resumed; move it away, or pass "
                         f"--restart to run every arm again and replace it")
    return {(record.get("arm"), record.get("seed")): record for record in records}


def run_recorded(out: Path, jobs: list[tuple[str, int, dict]], run_one, restart: bool = False) -> list[dict]:
    """Run ``jobs`` (arm name, seed, settings) with ``run_one(name, seed) -> record``, recording each finished run
    with its settings in ``OUT/runs.json`` as it ends; a run recorded there with the same settings is kept instead
    (unless ``restart``), so that an interrupted grid resumes where it stopped. Runs of other arms and seeds that
    ``runs.json`` holds stay in it (a run narrowed by ``--arms`` or ``--seeds`` adds to the record, and
    ``--restart`` replaces only the runs it makes again). Returns the records of ``jobs``, in job order."""
    path = out / "runs.json"
    try:
        kept = load_recorded_runs(path)
    except ValueError:
        if not restart:
            raise
        kept = {}  # --restart replaces a file that holds no runs
    recorded = {} if restart else dict(kept)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for number, (name, seed, settings) in enumerate(jobs, 1):
        progress = f"=== [{number}/{len(jobs)}] arm {name}, seed {seed}"
        previous = recorded.get((name, seed))
        if previous is not None and previous.get("settings") == settings:
            print(f"{progress}: already in runs.json with the same settings, skipped (--restart runs it again)",
                  flush=True)
            records.append(previous)
            continue
        changed = ": in runs.json with other settings, running it again" if previous is not None else ""
        print(f"{progress}{changed}", flush=True)
        records.append({**run_one(name, seed), "settings": settings})
        kept[(name, seed)] = records[-1]
        path.write_text(json.dumps(list(kept.values()), indent=2, default=str) + "\n", encoding="utf-8")
    return records
