"""Turning PyTorch modules into ONNX graphs: the encoders (for fast CPU features) and ``fuselabel export``.

Running the graphs is ``runtime.session``'s job, which needs no torch. A CPU
runs EfficientNet-Lite several times faster in onnxruntime than eagerly, and MiniLM about
twice as fast.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

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
