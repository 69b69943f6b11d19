"""onnxruntime glue shared by feature extraction, prediction and ``fuselabel export``.

Turning an encoder into an ONNX graph and running it is one job wherever it happens. A CPU
runs EfficientNet-Lite several times faster in onnxruntime than eagerly, and MiniLM about
twice as fast.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17

# Captions for export tracing and the built-in checks: different lengths, so padding is exercised.
SYNTHETIC_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "two dogs",
    "A red double decker bus driving down a city street next to tall buildings and a crowd of people.",
    "A plate of food with broccoli, rice and a fork.",
    "a cat",
    "Several people standing in a kitchen preparing a meal together on a sunny afternoon.",
    "An airplane flying over the ocean.",
    "A giraffe standing next to a tree in a zoo enclosure with rocks",
]


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic_axes: dict, opset: int = OPSET) -> Path:
    """torch.onnx.export into ``path``, written beside it first so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha else None
    try:
        if mha:  # nn.MultiheadAttention's fused inference kernel has no ONNX form (the query decoder uses it)
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript tracer warns about Python-side shape checks in the HF code; the graphs are
            # checked against PyTorch on other batch sizes and lengths after export.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
        os.replace(tmp, path)
    finally:
        if mha:
            mha.set_fastpath_enabled(fastpath)
        if tmp.exists():
            tmp.unlink()
    return path


def export_image_encoder(encoder: nn.Module, path: Path, input_size, opset: int = OPSET) -> Path:
    """``pixels`` (N, 3, H, W) -> ``features`` (N, D)."""
    encoder = encoder.float().eval()
    dummy = torch.zeros(2, *input_size)
    return export_graph(encoder, (dummy,), Path(path), ["pixels"], ["features"],
                        {"pixels": {0: "batch"}, "features": {0: "batch"}}, opset)


def export_text_encoder(encoder: nn.Module, tokenizer, path: Path, max_length: int = 64,
                        opset: int = OPSET) -> Path:
    """``input_ids``, ``attention_mask`` (N, L) int64 -> ``features`` (N, D), attention-masked mean."""
    encoder = encoder.float().eval()
    # A padded example: an all-ones mask could let the attention code skip the masking it must keep.
    tok = tokenizer(SYNTHETIC_CAPTIONS[:3], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    dynamic = {"batch": 0, "length": 1}
    axes = {"input_ids": {v: k for k, v in dynamic.items()}, "attention_mask": {v: k for k, v in dynamic.items()},
            "features": {0: "batch"}}
    return export_graph(encoder, (tok["input_ids"], tok["attention_mask"]), Path(path),
                        ["input_ids", "attention_mask"], ["features"], axes, opset)


def session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.log_severity_level = 3
    if os.environ.get("FUSELABEL_ORT_SPIN", "0") != "1":
        # Spinning threads burn the cores that the image-decoding workers need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def encode_in_length_order(encode, tokenizer, captions, *, max_length: int = 64, batch_size: int = 256,
                           progress: bool = False, label: str = "text features") -> np.ndarray:
    """``encode(input_ids, attention_mask) -> (n, d) array`` over all captions, in batches of similar length.

    Sorting by length keeps padding (wasted work) small; rows come back in the input order.
    """
    order = np.argsort([len(c) for c in captions], kind="stable")
    out: np.ndarray | None = None
    start = time.time()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        tok = tokenizer([captions[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        feats = encode(tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64))
        if out is None:
            out = np.zeros((len(captions), feats.shape[1]), dtype=np.float32)
        out[idx] = feats
        if progress:
            done = min(i + batch_size, len(order))
            print(f"\r  {label} {done}/{len(order)} ({done / max(time.time() - start, 1e-9):.0f}/s)",
                  end="", flush=True)
    if progress:
        print()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def run_text_encoder(sess, tokenizer, captions, *, max_length: int = 64, batch_size: int = 256,
                     progress: bool = False) -> np.ndarray:
    """Text features from an onnxruntime session."""
    return encode_in_length_order(
        lambda ids, mask: sess.run(None, {"input_ids": ids, "attention_mask": mask})[0], tokenizer, captions,
        max_length=max_length, batch_size=batch_size, progress=progress, label="text features (onnx)")
