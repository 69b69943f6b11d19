"""The one prediction path: preprocessing equal to torchvision's, fusion rules, missing inputs at the CSV entry
point, chunking that never changes a byte, and an exported ONNX folder that predicts with torch blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from fuselabel.cli import main
from fuselabel.images import eval_pixels
from fuselabel.predict import predict_csv
from fuselabel.runtime import decide, fuse


@pytest.fixture(scope="module")
def trained(tiny_model):
    return tiny_model


@pytest.mark.parametrize("crop", [1.0, 0.875])
@pytest.mark.parametrize("size", [(100, 60), (61, 99), (64, 64)])
def test_eval_pixels_equal_torchvision(size, crop):
    from torchvision import transforms as T

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    cfg = dict(
        input_size=(3, 48, 48), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=crop, interpolation="bicubic"
    )
    resize = (
        [T.Resize((48, 48), interpolation=T.InterpolationMode.BICUBIC)]
        if crop >= 1
        else [T.Resize(round(48 / crop), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(48)]
    )
    ref = T.Compose([*resize, T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])(img).numpy()
    np.testing.assert_array_equal(eval_pixels(img, cfg), ref)


def test_fuse_rules_and_missing_inputs():
    p_img = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.3, 0.3]], np.float32)
    p_txt = np.array([[0.1, 0.3], [0.6, 0.2], [0.4, 0.7], [0.3, 0.3]], np.float32)
    image = np.array([1, 1, 0, 0], bool)
    caption = np.array([1, 0, 1, 0], bool)
    union = fuse({"image": p_img, "text": p_txt}, "union", 0.5, image, caption)
    np.testing.assert_allclose(union[0], [0.9, 0.3])
    np.testing.assert_allclose(union[1], p_img[1])  # no caption: the photo's head alone
    np.testing.assert_allclose(union[2], p_txt[2])  # no photo: the caption's head alone
    assert np.isnan(union[3]).all()
    weighted = fuse({"image": p_img, "text": p_txt}, "weighted", 0.25, image, caption)
    np.testing.assert_allclose(weighted[0], 0.25 * p_img[0] + 0.75 * p_txt[0], rtol=1e-6)
    sets = decide(weighted, np.array([0.5, 0.5]), ensure_nonempty=True)
    assert sets[3].sum() == 0 and sets[:3].any(axis=1).all()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_csv_with_missing_and_broken_photos_writes_every_row(trained, tmp_path, capsys):
    root, image_dir, _ = trained
    good = (image_dir / "5.jpg").read_bytes()
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "fine.jpg").write_bytes(good)
    (tmp_path / "fine2.jpg").write_bytes(good)
    _write(
        tmp_path / "test.csv",
        [
            "ImageID,Caption",
            'fine.jpg,"a dog and a car"',
            'gone.jpg,"a kite"',
            'zero.jpg,"a person"',
            'cut.jpg,"a car"',
            'fine2.jpg,""',
            'gone2.jpg,""',
        ],
    )
    code = main(
        [
            "predict",
            str(root / "model"),
            "--data",
            str(tmp_path),
            "--csv",
            str(tmp_path / "test.csv"),
            "--out",
            str(tmp_path / "sub.csv"),
            "--proba",
            str(tmp_path / "p.csv"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    sub = (tmp_path / "sub.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in sub[1:]] == [
        "fine.jpg",
        "gone.jpg",
        "zero.jpg",
        "cut.jpg",
        "fine2.jpg",
        "gone2.jpg",
    ]
    assert sub[6] == "gone2.jpg," and all(line.split(",")[1] for line in sub[1:6])
    status = [line.rsplit(",", 1)[1] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert status == ["ok", "caption_only", "caption_only", "caption_only", "image_only", "no_input"]
    assert "3 rows predicted from the caption alone" in out and "1 from the photo alone" in out
    assert "gone2.jpg" in out
    code = main(
        [
            "predict",
            str(root / "model"),
            "--data",
            str(tmp_path),
            "--csv",
            str(tmp_path / "test.csv"),
            "--out",
            str(tmp_path / "strict.csv"),
            "--strict",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "gone.jpg" in err and "CSV line 3" in err and not (tmp_path / "strict.csv").exists()


def _many_rows(image_dir, csv, folder, copies: int = 5):
    """240 unlabelled rows: the tiny photos under new names, so chunks of 64 split them several ways."""
    import shutil

    from fuselabel.records import read_records

    folder.mkdir()
    lines = ["ImageID,Caption"]
    for k in range(copies):
        for r in read_records(csv).records:
            name = f"{k}-{r.image_id}"
            shutil.copyfile(image_dir / r.image_id, folder / name)
            lines.append(f'{name},"{r.caption}"')
    _write(folder / "test.csv", lines)
    return folder, folder / "test.csv"


def test_chunk_size_never_changes_a_byte(trained, tmp_path):
    root, image_dir, csv = trained
    images, rows = _many_rows(image_dir, csv, tmp_path / "many")
    for size in (64, 512):
        predict_csv(
            root / "model",
            images,
            rows,
            tmp_path / f"s{size}.csv",
            proba_out=tmp_path / f"p{size}.csv",
            chunk_size=size,
            progress=False,
        )
    assert (tmp_path / "s64.csv").read_bytes() == (tmp_path / "s512.csv").read_bytes()
    assert (tmp_path / "p64.csv").read_bytes() == (tmp_path / "p512.csv").read_bytes()
    with pytest.raises(ValueError, match="multiple of 64"):
        predict_csv(root / "model", images, rows, tmp_path / "bad.csv", chunk_size=100, progress=False)


BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    from fuselabel.cli import main
    code = main(sys.argv[1:])
    assert "torch" not in sys.modules and "torchvision" not in sys.modules
    sys.exit(code)
""")


def test_exported_folder_predicts_without_torch(trained, tmp_path):
    root, image_dir, csv = trained
    assert main(["export", str(root / "model"), "--out", str(tmp_path / "onnx")]) == 0
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_TORCH,
            "predict",
            str(tmp_path / "onnx"),
            "--data",
            str(image_dir),
            "--csv",
            str(csv),
            "--out",
            str(tmp_path / "onnx.csv"),
            "--proba",
            str(tmp_path / "onnx-p.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "onnxruntime (exported folder)" in done.stdout
    predict_csv(
        root / "model", image_dir, csv, tmp_path / "torch.csv", proba_out=tmp_path / "torch-p.csv", progress=False
    )
    assert (tmp_path / "onnx.csv").read_text() == (tmp_path / "torch.csv").read_text()
    a = np.genfromtxt(tmp_path / "onnx-p.csv", delimiter=",", skip_header=1)[:, 1:-1]
    b = np.genfromtxt(tmp_path / "torch-p.csv", delimiter=",", skip_header=1)[:, 1:-1]
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_two_processes_write_what_one_writes(trained, tmp_path):
    """Lightning ranks (ddp over gloo, two CPU processes) share the chunks; rank 0 merges in row order."""
    root, image_dir, csv = trained
    image_dir, csv = _many_rows(image_dir, csv, tmp_path / "many")
    predict_csv(
        root / "model",
        image_dir,
        csv,
        tmp_path / "one.csv",
        proba_out=tmp_path / "one-p.csv",
        chunk_size=64,
        progress=False,
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuselabel.cli",
            "predict",
            str(root / "model"),
            "--data",
            str(image_dir),
            "--csv",
            str(csv),
            "--out",
            str(tmp_path / "two.csv"),
            "--proba",
            str(tmp_path / "two-p.csv"),
            "--chunk-size",
            "64",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--accelerator",
            "cpu",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert (tmp_path / "two-p.csv").read_bytes() == (tmp_path / "one-p.csv").read_bytes()
    assert not list(tmp_path.glob(".*parts*"))
