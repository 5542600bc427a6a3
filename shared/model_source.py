"""Is a model reference a local folder or a hub id, and can it be loaded? Answered before anything slow.

`from_pretrained("models/nope")` treats a missing folder as a hub id and ends, minutes of retries
later, in a traceback about huggingface.co and offline mode. Both the trainer (student.path,
teacher.model) and the teacher server (--model) ask here first and stop with one line that names
the key, the value and how it was read.

A reference is taken as a local folder when it exists, when it cannot be a hub id (absolute,
`./`, `~`, more than one `/`), or when its first part is a folder here (`models/nope` next to a
`models/` folder) and the hub cache does not hold it. Otherwise it is a hub id: in the cache, or
looked up on the hub.
"""

from __future__ import annotations

import re
from pathlib import Path

# huggingface_hub's repo id grammar: `name` or `owner/name`, each of these characters.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelSourceError(ValueError):
    """A model reference that cannot be loaded; the message names the key and says why."""


def _check_folder(key: str, value: str, path: Path, why: str) -> str:
    if not path.exists():
        where = "" if path.is_absolute() else f" ({path.absolute()})"
        raise ModelSourceError(f"{key}: no folder {value!r}{where}; taken as a local folder because {why}")
    if not path.is_dir():
        raise ModelSourceError(f"{key}: {value!r} is a file, not a model folder (a folder with config.json)")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{key}: the folder {value!r} has no config.json, so it is not a saved model "
                               "(save one with save_pretrained)")
    return "local"


def _cached(value: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(value, "config.json"), str)


def _check_hub_id(key: str, value: str) -> str:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HFValidationError

    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError(f"{key}: {value!r} is not a local folder, so it was taken as a hub id, and it is "
                               "not in the hub cache while HF_HUB_OFFLINE=1 (give a local folder, or download it)")
    try:
        hf_hub_download(value, "config.json")
    except (OSError, HFValidationError) as exc:  # the hub's not-found and connection errors are OSErrors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"{key}: {value!r} is not a local folder, so it was taken as a hub id, and the "
                               f"hub did not give its config.json ({type(exc).__name__}: {reason})") from exc
    return "hub"


def check_model_source(key: str, value: str) -> str:
    """'local', 'cache' or 'hub' when `value` can be loaded; else a ModelSourceError naming `key`."""
    path = Path(value).expanduser()
    if path.exists():
        return _check_folder(key, value, path, "it exists")
    if path.is_absolute() or value.startswith((".", "~")) or not _HUB_ID.match(value):
        return _check_folder(key, value, path, "it cannot be a hub id (`name` or `owner/name`)")
    if _cached(value):
        return "cache"
    first = Path(value.split("/", 1)[0])
    if "/" in value and first.is_dir():
        return _check_folder(key, value, path, f"{first}/ is a folder here")
    return _check_hub_id(key, value)
