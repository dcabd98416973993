"""Reading the JSON files that sit next to a model (``config.json``, ``tokenizer_config.json``,
``preprocessor_config.json``, ...) with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} when there is no such file); :class:`ModelLoadError` when it is not one."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
