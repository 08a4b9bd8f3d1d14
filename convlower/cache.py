"""The tuning cache: JSON (never pickle), like a TensorRT timing cache — tune once, reuse everywhere.

An entry is one (spec, input shapes, variant) measured on one provider, device, onnxruntime
version and thread count; any of those changing makes a different key. Three stores share one
interface (`TuningCache`: get / put / save / describe, plus entries / remove for `convlower cache`):

- `FileCache`: one JSON file. Many processes may use it at once: `save` takes a lock (`filelock`)
  around read-merge-write and replaces the file atomically, so no writer loses another's entries
  and no reader sees half a file. A file that is not a convlower cache (corrupt, foreign, another
  format version) is ignored with a warning on stderr and never written over. `path=None` keeps
  the entries in memory only (`--no-cache`).
- `RedisCache`: the same entries in Redis (`redis://HOST:PORT/DB`, `rediss://` for TLS), through
  redis-py, so every runner pointed at one server reuses what any runner measured. Failure is never
  fatal: the first error (unreachable, timeout, refused password, redis-py missing) is one warning,
  then the store is off for the rest of the run and `errors` says why.
- `LayeredCache`: stores in front of one another (a local file before Redis): a get asks each in
  turn and copies a hit into the stores in front; a put goes to all.

Every value read is checked (`valid_entry`): one that is not JSON of the expected form is a miss,
never trusted. A Redis value carries the cache format `VERSION` and the convlower version that
wrote it; "incompatible" means another `VERSION`, which is bumped whenever the meaning of an entry
or of its key changes. Entries of another `VERSION` are ignored; the convlower version is kept for
`convlower cache show`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import filelock

from .console import ConvlowerWarning, warn
from .modelio import write_text_atomic

FORMAT = "convlower-tuning-cache"
VERSION = 1
LOCK_TIMEOUT_S = 60.0
"""How long `FileCache.save` waits for another process's save before giving up (with a warning)."""
REDIS_TIMEOUT_S = 3.0
"""Connect and socket timeout for Redis, with no retry: a server that does not answer costs this once."""
REDIS_PREFIX = "convlower:tuning:"
PASSWORD_VARIABLES = ("CONVLOWER_REDIS_PASSWORD", "REDIS_PASSWORD")
"""Where a Redis password comes from when the URL has none, first found wins."""
KEY_FIELDS = ("problem", "variant", "provider", "device", "onnxruntime", "threads")
"""The parts of an entry's key, in order (`TuningCache.key(tuning_key, variant, *environment)`)."""
_OUTCOME_FIELDS = {"status": str, "ms": float, "max_abs_err": float, "reason": str}
_PAIR_FIELDS = ("ratio", "interval", "confidence", "rounds", "a_median_ms", "b_median_ms")
_STATUSES = ("ok", "rejected")
"""The statuses `tune_node` measures (not_applicable and skipped are decided afresh, never stored)."""


def default_cache_path() -> Path:
    """`$XDG_CACHE_HOME/convlower/tuning.json`, else `~/.cache/convlower/tuning.json`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "convlower" / "tuning.json"


class CacheWarning(ConvlowerWarning):
    """The cache file, or the Redis server, could not be used."""


def valid_entry(value: Any) -> bool:
    """Whether `value` is an entry convlower writes: the original's `{"ms": T}`, a variant's
    outcome (`VariantOutcome.to_dict()`: a status and optionally ms, max_abs_err and reason), or a
    whole-model measurement (`convlower.measure`: `{"pairs": [PairedRatio.to_dict(), ...]}`)."""
    if not isinstance(value, dict):
        return False
    if "pairs" in value:
        return set(value) == {"pairs"} and isinstance(value["pairs"], list) and bool(value["pairs"]) and all(
            map(_valid_pair, value["pairs"]))
    if "status" not in value:
        return set(value) == {"ms"} and _number(value["ms"])
    return value["status"] in _STATUSES and set(value) <= set(_OUTCOME_FIELDS) and all(
        _number(v) if _OUTCOME_FIELDS[k] is float else isinstance(v, str) for k, v in value.items())


def _valid_pair(value: Any) -> bool:
    """A `PairedRatio.to_dict()`: a positive ratio inside its interval, a confidence, rounds, both medians."""
    if not isinstance(value, dict) or not set(_PAIR_FIELDS) <= set(value) <= set(_PAIR_FIELDS) | {"cached"}:
        return False
    interval = value["interval"]
    if not (isinstance(interval, list) and len(interval) == 2 and all(map(_number, interval))):
        return False
    numbers = [value[name] for name in _PAIR_FIELDS if name != "interval"]
    return all(map(_number, numbers)) and 0 < value["confidence"] < 1 and value["ratio"] > 0 and interval[0] <= interval[1]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def key_fields(key: str) -> dict[str, Any] | None:
    """A key's parts by name (`KEY_FIELDS`), or None for a key convlower did not make."""
    try:
        parts = json.loads(key)
    except json.JSONDecodeError:
        return None
    if not isinstance(parts, list) or len(parts) != len(KEY_FIELDS):
        return None
    return dict(zip(KEY_FIELDS, parts))


def environments(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries counted by the environment they were measured in (provider, device,
    onnxruntime, threads): `entries` and distinct tuning `problems` per environment, sorted."""
    groups: dict[tuple, dict[str, Any]] = {}
    for key in entries:
        fields = key_fields(key) or dict.fromkeys(KEY_FIELDS, "?")
        where = tuple(str(fields[name]) for name in KEY_FIELDS[2:])
        group = groups.setdefault(where, {**dict(zip(KEY_FIELDS[2:], where)), "entries": 0, "problems": set()})
        group["entries"] += 1
        group["problems"].add(json.dumps(fields["problem"]))
    return [{**g, "problems": len(g["problems"])} for _, g in sorted(groups.items())]


def matches(key: str, device: str | None = None, onnxruntime: str | None = None) -> bool:
    """Whether a convlower key was measured on `device` and `onnxruntime` (None matches any)."""
    fields = key_fields(key)
    return fields is not None and (device is None or fields["device"] == device) and (
        onnxruntime is None or fields["onnxruntime"] == onnxruntime)


class TuningCache:
    """Measured outcomes by key. `hits`/`misses` count gets; `errors` holds why a store was turned off."""

    errors: list[str]

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return json.dumps(parts, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def open(spec: "str | os.PathLike | TuningCache | Sequence[str | os.PathLike] | None") -> "TuningCache":
        """The store a `--cache` value names: a path, `redis://...`/`rediss://...`, several of those
        (front first: a `LayeredCache`), None for memory only, or a store, returned as is."""
        if isinstance(spec, TuningCache):
            return spec
        if spec is None:
            return FileCache(None)
        if isinstance(spec, (list, tuple)):
            stores = [TuningCache.open(s) for s in spec]
            return stores[0] if len(stores) == 1 else LayeredCache(stores)
        text = os.fspath(spec)  # type: ignore[arg-type]
        if text.startswith(("redis://", "rediss://")):
            return RedisCache(text)
        return FileCache(text)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def _get(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def put(self, key: str, entry: dict[str, Any]) -> None:
        raise NotImplementedError

    def save(self) -> None:
        """Make the puts durable; never raises for a store that cannot be written (it warns)."""

    def describe(self) -> str | None:
        """Where the entries go, for the report (a Redis password is never shown); None in memory."""
        raise NotImplementedError

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every valid entry stored, by key (for `convlower cache`)."""
        raise NotImplementedError

    def remove(self, keep: Callable[[str], bool]) -> int:
        """Delete the entries whose key `keep` rejects; the number deleted."""
        raise NotImplementedError


class FileCache(TuningCache):
    """One JSON file shared safely by concurrent processes; `path=None` keeps entries in memory."""

    def __init__(self, path: str | os.PathLike | None):
        super().__init__()
        self.errors = []
        self.path = Path(path) if path is not None else None
        self.known: dict[str, dict[str, Any]] = {}
        self.added: dict[str, dict[str, Any]] = {}
        self.writable = self.path is not None
        if self.path is not None:
            self.known = self._read_disk() or {}

    def _lock(self) -> filelock.FileLock:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(self.path.with_name(self.path.name + ".lock"), timeout=LOCK_TIMEOUT_S)

    def _read_disk(self) -> dict[str, dict[str, Any]] | None:
        """The file's entries ({} when there is no file); None, with a warning, when it is not ours."""
        assert self.path is not None
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._refuse(f"cannot be read ({type(exc).__name__})")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return self._refuse("is not a convlower tuning cache")
        if data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
            return self._refuse(f"has cache format version {data.get('version')!r}, this convlower writes {VERSION}")
        return data["entries"]

    def _refuse(self, why: str) -> None:
        if self.writable:
            warn(f"tuning cache {self.path} {why}; tuning without it (delete it, or pass --cache PATH or --no-cache)",
                 CacheWarning, stacklevel=4)
            self.errors.append(f"{self.path} {why}")
        self.writable = False
        return None

    def _get(self, key: str) -> dict[str, Any] | None:
        entry = self.added.get(key) or self.known.get(key)
        return entry if valid_entry(entry) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.added[key] = entry

    def save(self) -> None:
        """Merge this run's entries into the file as it is now, under the lock, and replace it atomically."""
        if not self.writable or self.path is None or not self.added:
            return
        self._rewrite(lambda entries: entries.update(self.added))
        self.added = {}

    def _rewrite(self, change: Callable[[dict[str, dict[str, Any]]], None]) -> bool:
        """Read the file, `change` its entries in place and write it back, all under the lock."""
        assert self.path is not None
        try:
            with self._lock():
                on_disk = self._read_disk()
                if on_disk is None:
                    return False
                change(on_disk)
                write_text_atomic(self.path, json.dumps({"format": FORMAT, "version": VERSION, "convlower": _version(),
                                                         "entries": on_disk}, indent=1, sort_keys=True))
                self.known = on_disk
                return True
        except filelock.Timeout:
            self._refuse(f"stayed locked by another process for {LOCK_TIMEOUT_S:.0f} s (lock file {self.path.name}.lock)")
        except OSError as exc:
            self._refuse(f"cannot be written ({type(exc).__name__}: {exc.strerror or exc})")
        return False

    def describe(self) -> str | None:
        return str(self.path) if self.path is not None else None

    def entries(self) -> dict[str, dict[str, Any]]:
        merged = {**self.known, **self.added}
        return {k: v for k, v in merged.items() if valid_entry(v)}

    def remove(self, keep: Callable[[str], bool]) -> int:
        removed: list[str] = []

        def drop(entries: dict[str, dict[str, Any]]) -> None:
            removed.extend(k for k in entries if not keep(k))
            for k in removed:
                del entries[k]

        if self.path is None:
            drop(self.known)
            drop(self.added)
            return len(removed)
        return len(removed) if self._rewrite(drop) else 0


class RedisCache(TuningCache):
    """Entries in Redis under `convlower:tuning:KEY`, each value `{"version", "convlower", "entry"}`.

    The first failure warns once and turns the store off for the rest of the run (`errors` says why).
    """

    def __init__(self, url: str):
        super().__init__()
        self.errors = []
        self.url = url
        self.client: Any = None
        self._redis_errors: tuple[type[BaseException], ...] = (OSError,)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            self._fail("the redis package is not installed (pip install 'convlower[redis]')")
            return
        self._redis_errors = (redis.RedisError, OSError)
        password = None if urlsplit(url).password else next(
            (os.environ[v] for v in PASSWORD_VARIABLES if os.environ.get(v)), None)
        try:
            self.client = redis.Redis.from_url(url, password=password, socket_timeout=REDIS_TIMEOUT_S,
                                               socket_connect_timeout=REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
            self.client.ping()
        except (ValueError, *self._redis_errors) as exc:
            self._fail(exc)

    def _fail(self, problem: object) -> None:
        why = problem if isinstance(problem, str) else f"{type(problem).__name__}: {redact(str(problem))}"
        self.errors.append(f"{self.describe()}: {why}")
        self.client = None
        warn(f"shared tuning cache {self.describe()} is unavailable ({why}); tuning goes on without it", CacheWarning, stacklevel=4)

    def _call(self, method: str, *args: Any) -> Any:
        """`client.method(*args)`, or None once the store is off (the first failure turns it off)."""
        if self.client is None:
            return None
        try:
            return getattr(self.client, method)(*args)
        except self._redis_errors as exc:
            self._fail(exc)
            return None

    def _get(self, key: str) -> dict[str, Any] | None:
        return _unwrap(self._call("get", REDIS_PREFIX + key))

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self._call("set", REDIS_PREFIX + key, json.dumps({"version": VERSION, "convlower": _version(), "entry": entry}))

    def describe(self) -> str:
        return redact(self.url)

    def _keys(self) -> list[bytes]:
        found = self._call("scan_iter", REDIS_PREFIX + "*")
        try:
            return list(found or [])
        except self._redis_errors as exc:
            self._fail(exc)
            return []

    def entries(self) -> dict[str, dict[str, Any]]:
        keys = self._keys()
        values = (self._call("mget", keys) or []) if keys else []
        found = {}
        for raw_key, raw in zip(keys, values):
            entry = _unwrap(raw)
            if entry is not None:
                found[raw_key.decode("utf-8", "replace")[len(REDIS_PREFIX):]] = entry
        return found

    def remove(self, keep: Callable[[str], bool]) -> int:
        doomed = [k for k in self._keys() if not keep(k.decode("utf-8", "replace")[len(REDIS_PREFIX):])]
        return int(self._call("delete", *doomed) or 0) if doomed else 0


def _unwrap(raw: Any) -> dict[str, Any] | None:
    """The entry in a Redis value, or None when the value is not one this cache format wrote."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("version") != VERSION or not valid_entry(record.get("entry")):
        return None
    return record["entry"]


class LayeredCache(TuningCache):
    """Stores in front of one another: get asks each in turn and copies a hit forward; put goes to all."""

    def __init__(self, stores: Iterable[TuningCache]):
        super().__init__()
        self.stores = list(stores)

    @property  # type: ignore[override]
    def errors(self) -> list[str]:
        return [e for store in self.stores for e in store.errors]

    def _get(self, key: str) -> dict[str, Any] | None:
        for index, store in enumerate(self.stores):
            entry = store.get(key)
            if entry is not None:
                for front in self.stores[:index]:
                    front.put(key, entry)
                return entry
        return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        for store in self.stores:
            store.put(key, entry)

    def save(self) -> None:
        for store in self.stores:
            store.save()

    def describe(self) -> str:
        return " -> ".join(str(store.describe()) for store in self.stores)

    def entries(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for store in reversed(self.stores):
            merged.update(store.entries())
        return merged

    def remove(self, keep: Callable[[str], bool]) -> int:
        return max((store.remove(keep) for store in self.stores), default=0)


def redact(text: str) -> str:
    """`text` with the password of any redis URL in it replaced by `***`."""
    words = []
    for word in text.split(" "):
        parts = urlsplit(word) if "://" in word else None
        if parts is not None and parts.password:
            host = parts.netloc.rpartition("@")[2]
            user = parts.username or ""
            word = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
        words.append(word)
    return " ".join(words)


def _version() -> str:
    from . import __version__

    return __version__
