"""Where pgprune keeps its cache and where it looks for local data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`PGPRUNE_CACHE`, else `$XDG_CACHE_HOME/pgprune`, else `~/.cache/pgprune`."""
    env = os.environ.get("PGPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pgprune"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data directory: the explicit option, else `PGPRUNE_DATA_DIR`, else None (hub)."""
    value = explicit if explicit is not None else os.environ.get("PGPRUNE_DATA_DIR")
    return Path(value).expanduser() if value else None
