"""onnxruntime sessions on the CPU, built from a copy of each graph optimised once and kept in the cache folder.

Building a session optimises its graph first (the int8 quantise/dequantise pairs fused into integer kernels, the
attention and layer-norm fusions, the convolutions' memory layout): 0.05 to 0.1 s for each encoder, most of a
command's start beside its imports. onnxruntime can save the graph it optimised (its offline mode). The copy saved
here stops before the layout step, the one that depends on the processor's vector width; a session built from it
applies only that step, in about 0.02 s, and computes the same numbers (``tests/test_sessions.py``).

The copy is named by the graph file's identity (device, inode, size and times), the onnxruntime version and the
processor's name and features, so a rewritten graph, an upgrade or a cache folder shared with another machine
never meets a copy made for something else; knowing the file by its identity, a start reads none of it. Where the
cache folder cannot be written, the session is built from the graph itself.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

from .cache import default_cache_dir
from .writers import atomic_path, remove_abandoned

log = logging.getLogger(__name__)

OPTIMISED = "optimised"  # the cache folder's subfolder of optimised graphs


def session(path, threads: int | None = None, cache_dir=None):
    """An onnxruntime CPU session of the graph at ``path``, single-threaded by default: the cores are kept busy
    by workers over different windows of rows (two 1-thread streams scale better than one 2-thread one, and a
    window's numbers then never depend on how many cores there are)."""
    import onnxruntime as ort

    with open(path, "rb") as f:
        copy = optimised_copy(os.fstat(f.fileno()), cache_dir)
        if copy.is_file():
            try:
                return _build(ort, str(copy), threads)
            except Exception as err:  # a copy damaged on disk: made again below
                log.warning("%s: optimised graph unreadable (%s); optimising %s again", copy, err, path)
        data = f.read()
        unchanged = optimised_copy(os.fstat(f.fileno()), cache_dir) == copy  # not rewritten while it was read
    if unchanged:
        try:
            remove_abandoned(copy.parent)  # what a writer killed while saving a copy left
            with atomic_path(copy) as tmp:
                _build(ort, data, threads, save=tmp)
            return _build(ort, str(copy), threads)
        except Exception as err:  # a read-only cache folder, a full disk (a graph that cannot be built fails below)
            log.info("%s: no optimised copy saved (%s); built from the graph", path, err)
    return _build(ort, str(path), threads)  # by path: a graph with its weights in files beside it finds them


def _build(ort, graph, threads: int | None, save: Path | None = None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if os.environ.get("FUSELABEL_ORT_SPIN", "0") != "1":
        # Spinning threads burn the cores that the photo decoders need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if save is not None:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def optimised_copy(stat: os.stat_result, cache_dir=None) -> Path:
    """Where the optimised copy of the graph file that ``stat`` describes is kept for this onnxruntime on this
    processor. The file is known by its device, inode, size and times: any rewrite or replacement changes one."""
    import onnxruntime as ort

    file = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    key = hashlib.sha256(f"{file}\0{ort.__version__}\0{processor()}".encode()).hexdigest()[:24]
    return default_cache_dir(cache_dir) / OPTIMISED / f"{key}.onnx"


@functools.cache
def processor() -> str:
    """The processor's architecture, name and (on Linux) feature flags: what an optimisation may depend on."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"
