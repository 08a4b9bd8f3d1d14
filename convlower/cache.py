"""The tuning cache: JSON (never pickle), like a TensorRT timing cache — tune once, reuse everywhere.

An entry is one (spec, input shapes, variant) measured on one provider, device, onnxruntime
version and thread count; any of those changing makes a different key. A file that is not a
convlower cache (corrupt, foreign, another format version) is ignored with a warning on stderr and never
written over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .console import ConvlowerWarning, warn
from .modelio import write_text_atomic

FORMAT = "convlower-tuning-cache"
VERSION = 1


def default_cache_path() -> Path:
    """`$XDG_CACHE_HOME/convlower/tuning.json`, else `~/.cache/convlower/tuning.json`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "convlower" / "tuning.json"


class CacheWarning(ConvlowerWarning):
    """The cache file could not be used."""


class TuningCache:
    """Measured variant outcomes by key; `path=None` keeps them in memory only (`--no-cache`)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.writable = self.path is not None
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.exists():
            self._read()

    def _read(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._refuse(f"cannot be read ({type(exc).__name__})")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return self._refuse("is not a convlower tuning cache")
        if data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
            return self._refuse(f"has cache format version {data.get('version')!r}, this convlower writes {VERSION}")
        self.entries = data["entries"]

    def _refuse(self, why: str) -> None:
        self.writable = False
        warn(
            f"tuning cache {self.path} {why}; tuning without it (delete it, or pass --cache PATH or --no-cache)",
            CacheWarning,
            stacklevel=3,
        )

    @staticmethod
    def key(*parts: Any) -> str:
        return json.dumps(parts, sort_keys=True, separators=(",", ":"))

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry

    def save(self) -> None:
        """Write the cache atomically (no-op in memory, or when the file on disk was not ours)."""
        if not self.writable or self.path is None:
            return
        payload = json.dumps({"format": FORMAT, "version": VERSION, "entries": self.entries}, indent=1, sort_keys=True)
        write_text_atomic(self.path, payload)
