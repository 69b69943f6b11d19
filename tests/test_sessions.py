"""onnxruntime sessions built from a graph optimised once and kept in the cache folder (``fuselabel.sessions``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from fuselabel import sessions
from fuselabel.sessions import optimised_copy, session


def _graph(path, seed: int) -> None:
    """A small convolutional graph with what onnxruntime fuses and lays out: conv + batch norm + relu, a residual
    add, pooling and a dense layer."""
    rng = np.random.default_rng(seed)
    init = {
        "w1": rng.normal(size=(8, 3, 3, 3)),
        "b1": rng.normal(size=8),
        "scale": rng.uniform(0.5, 1.5, 8),
        "bias": rng.normal(size=8),
        "mean": rng.normal(size=8),
        "var": rng.uniform(0.5, 1.5, 8),
        "w2": rng.normal(size=(8, 8, 3, 3)),
        "fc": rng.normal(size=(8, 5)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


X = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)


def _plain(path) -> np.ndarray:
    """The graph's output from a session built as onnxruntime builds one by default (every optimisation, online)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def _built_from(monkeypatch) -> list:
    """The graphs ``session`` builds sessions from, in order (a path string, or bytes)."""
    seen: list = []
    real = sessions._build

    def spy(ort_, graph, threads, save=None):
        seen.append((graph, save))
        return real(ort_, graph, threads, save)

    monkeypatch.setattr(sessions, "_build", spy)
    return seen


def test_a_session_from_the_optimised_copy_computes_what_the_graph_does(tmp_path, monkeypatch):
    graph, cache = tmp_path / "g.onnx", tmp_path / "cache"
    _graph(graph, seed=1)
    seen = _built_from(monkeypatch)
    first = session(graph, cache_dir=cache).run(None, {"x": X})[0]
    copy = optimised_copy(graph.stat(), cache)
    assert copy.is_file() and copy.parent == cache / sessions.OPTIMISED
    # The first start optimises the graph and saves it, then builds from the saved copy.
    assert [save is not None for _, save in seen] == [True, False] and seen[1][0] == str(copy)
    seen.clear()
    again = session(graph, cache_dir=cache).run(None, {"x": X})[0]
    assert seen == [(str(copy), None)]  # later starts read only the copy
    np.testing.assert_array_equal(first, _plain(graph))
    np.testing.assert_array_equal(again, _plain(graph))
    assert not [p for p in copy.parent.iterdir() if p != copy]  # no temporary left beside it


def test_a_killed_writers_temporary_goes_when_a_copy_is_saved(tmp_path):
    graph, cache = tmp_path / "g.onnx", tmp_path / "cache"
    _graph(graph, seed=6)
    left = cache / sessions.OPTIMISED / ".0123.onnx.abcdef123456.tmp"  # the writer died: its lock is free
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a graph")
    session(graph, cache_dir=cache)
    assert not left.exists()
    assert [p.name for p in left.parent.iterdir()] == [optimised_copy(graph.stat(), cache).name]


def test_a_rewritten_graph_is_optimised_again(tmp_path):
    graph, cache = tmp_path / "g.onnx", tmp_path / "cache"
    _graph(graph, seed=1)
    old = session(graph, cache_dir=cache).run(None, {"x": X})[0]
    _graph(graph, seed=2)  # new weights, same path
    new = session(graph, cache_dir=cache).run(None, {"x": X})[0]
    assert not np.allclose(old, new)
    np.testing.assert_array_equal(new, _plain(graph))
    assert len(list((cache / sessions.OPTIMISED).iterdir())) == 2


def test_a_damaged_copy_is_made_again(tmp_path, caplog):
    graph, cache = tmp_path / "g.onnx", tmp_path / "cache"
    _graph(graph, seed=3)
    session(graph, cache_dir=cache)
    copy = optimised_copy(graph.stat(), cache)
    copy.write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="fuselabel.sessions"):
        out = session(graph, cache_dir=cache).run(None, {"x": X})[0]
    assert "optimised graph unreadable" in caplog.text
    np.testing.assert_array_equal(out, _plain(graph))
    assert copy.read_bytes() != b"not a graph"


def test_a_cache_that_cannot_be_written_builds_from_the_graph(tmp_path):
    graph = tmp_path / "g.onnx"
    _graph(graph, seed=4)
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache folder's place is taken by a file")
    out = session(graph, cache_dir=blocked).run(None, {"x": X})[0]
    np.testing.assert_array_equal(out, _plain(graph))
    assert blocked.read_text() == "the cache folder's place is taken by a file"


def test_a_graph_that_cannot_be_built_says_so_and_saves_nothing(tmp_path):
    graph, cache = tmp_path / "g.onnx", tmp_path / "cache"
    graph.write_bytes(b"this is not ONNX")
    with pytest.raises(Exception, match="(?i)protobuf|parse|load"):
        session(graph, cache_dir=cache)
    assert not list(cache.rglob("*.onnx"))


def test_another_processor_or_runtime_gets_its_own_copy(tmp_path, monkeypatch):
    graph = tmp_path / "g.onnx"
    _graph(graph, seed=5)
    here = optimised_copy(graph.stat(), tmp_path)
    monkeypatch.setattr(sessions, "processor", lambda: "x86_64 other-cpu flags: sse2")
    assert optimised_copy(graph.stat(), tmp_path) != here
    monkeypatch.setattr(ort, "__version__", "0.0.1")
    assert optimised_copy(graph.stat(), tmp_path) != here


def test_processes_starting_together_share_one_copy(tmp_path):
    """Several processes (a service's workers, ranks) build a session of the same graph at once from an empty cache:
    each gets the graph's numbers, one copy is left and no temporary."""
    import subprocess
    import sys

    graph, cache = tmp_path / "g.onnx", tmp_path / "cache"
    _graph(graph, seed=7)
    np.save(tmp_path / "x.npy", X)
    code = (
        "import sys, numpy as np; from fuselabel.sessions import session; "
        "s = session(sys.argv[1], cache_dir=sys.argv[2]); "
        "np.save(sys.argv[3], s.run(None, {'x': np.load(sys.argv[4])})[0])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(graph), str(cache), str(tmp_path / f"y{i}.npy"), str(tmp_path / "x.npy")]
        )
        for i in range(4)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    for i in range(4):
        np.testing.assert_array_equal(np.load(tmp_path / f"y{i}.npy"), _plain(graph))
    assert [p.name for p in (cache / sessions.OPTIMISED).iterdir()] == [optimised_copy(graph.stat(), cache).name]
