"""Where a model named in a config lives: a local directory or a hub id in the local cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def hub_offline() -> bool:
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "TRUE", "yes")


def locate_model(name: str) -> tuple[Path | None, str]:
    """(local directory or None, problem or ""). A hub id that is not cached is a problem only offline."""
    path = Path(name).expanduser()
    if path.exists():
        return (path, "") if path.is_dir() else (None, f"{name} is a file; give the model's directory")
    if not looks_like_hub_id(name):
        return None, f"no such directory: {name}"
    try:
        return Path(snapshot_download(name, local_files_only=True)), ""
    except LocalEntryNotFoundError:
        if hub_offline():
            return None, (
                f"{name} is not a local directory and not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}), and the hub is offline (HF_HUB_OFFLINE); "
                "download it first or give a local path"
            )
        return None, ""
