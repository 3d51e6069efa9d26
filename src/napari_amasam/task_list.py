"""``tasks.json`` of a CA-SAM model folder: the tasks it learned, in order.

::

    {"tasks": [{"task": 0, "name": ..., "primary": ..., "training_images": N,
                "router": {"threshold": ..., "quantile": ..., ...},
                "thresholds": {PostprocessConfig of that task}}, ...],
     "base_path": "..."}

Written by ``training.continual`` (below the model folder, above nothing), read by the
predictor (each routed image is post-processed with its task's thresholds) and the widgets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, PostprocessConfig
from .errors import CheckpointError
from .model_folder import atomic_write_text

TASKS_FILE = "tasks.json"
BASE_PATH_NOTE = "frozen SAM features straight into the heads, for images no task's VAE explains"


def read_tasks(model_dir: str | Path) -> list[dict[str, Any]]:
    """The task list of a model folder ([] when it has none, i.e. not CA-SAM)."""
    path = Path(model_dir) / TASKS_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["tasks"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read the task list ({exc})") from None


def write_tasks(model_dir: str | Path, tasks: list[dict[str, Any]]) -> None:
    """Write ``tasks.json`` atomically."""
    doc = {"tasks": tasks, "base_path": BASE_PATH_NOTE}
    atomic_write_text(Path(model_dir) / TASKS_FILE, json.dumps(doc, indent=2))


def task_thresholds(model_dir: str | Path) -> dict[int, PostprocessConfig]:
    """Post-processing settings per task index (tasks that recorded them)."""
    out = {}
    for entry in read_tasks(model_dir):
        if entry.get("thresholds"):
            try:
                out[int(entry["task"])] = PostprocessConfig.from_dict(entry["thresholds"])
            except (ConfigError, TypeError, KeyError, ValueError) as exc:
                raise CheckpointError(f"{Path(model_dir) / TASKS_FILE}: invalid thresholds of "
                                      f"task {entry.get('task')} ({exc})") from None
    return out


def describe_tasks(model_dir: str | Path) -> str:
    """One line per task: index, name, routing threshold (for the CLI and widgets)."""
    lines = []
    for entry in read_tasks(model_dir):
        router = entry.get("router", {})
        lines.append(f"task {entry['task']}: {entry.get('name', '?')} "
                     f"({entry.get('training_images', '?')} training images, routing threshold "
                     f"{router.get('threshold', float('nan')):.4g})")
    return "\n".join(lines)
