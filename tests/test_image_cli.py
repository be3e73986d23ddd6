"""`rmbg-stream image` end to end: real files in, real files out."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rmbg_stream.cli import main
from rmbg_stream.models import BiRefNet

GREEN = (0, 177, 64)


def green_screen(path, h=60, w=80):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GREEN
    img[15:45, 20:60] = (220, 40, 30)
    Image.fromarray(img).save(path)
    return img


def test_cutout_mask_and_background(tmp_path):
    src = green_screen(tmp_path / "in.png")
    assert main(["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "cut.png"), "--model", "chroma"]) == 0
    cut = np.asarray(Image.open(tmp_path / "cut.png"))
    assert cut.shape == (60, 80, 4)
    assert np.all(cut[20:40, 25:55, 3] == 255) and np.all(cut[:10, :, 3] == 0)
    np.testing.assert_array_equal(cut[20:40, 25:55, :3], src[20:40, 25:55])

    assert main(["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "m.png"), "--model", "chroma", "--mask"]) == 0
    mask = Image.open(tmp_path / "m.png")
    assert mask.mode == "L" and np.asarray(mask)[30, 40] == 255 and np.asarray(mask)[2, 2] == 0

    assert main(["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "c.png"), "--model", "chroma",
                 "--background", "#0000ff"]) == 0
    comp = np.asarray(Image.open(tmp_path / "c.png"))
    assert comp.shape == (60, 80, 3) and tuple(comp[2, 2]) == (0, 0, 255) and tuple(comp[30, 40]) == (220, 40, 30)


def test_folder_with_a_broken_file_reports_it_and_goes_on(tmp_path):
    (tmp_path / "in").mkdir()
    green_screen(tmp_path / "in" / "a.png")
    green_screen(tmp_path / "in" / "b.jpg")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image at all")
    proc = subprocess.run([sys.executable, "-m", "rmbg_stream", "image", str(tmp_path / "in"), "-o",
                           str(tmp_path / "out"), "--model", "chroma"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert any("broken.png" in line and "cannot read image" in line for line in errors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]


def test_runs_a_birefnet_checkpoint_file(tmp_path):
    torch.manual_seed(0)
    model = BiRefNet("swin_v1_t")
    save_file(model.state_dict(), str(tmp_path / "lite.safetensors"))
    green_screen(tmp_path / "in.png", h=50, w=70)
    args = ["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "m.png"), "--mask", "--resolution", "64",
            "--model", str(tmp_path / "lite.safetensors"), "--runtime", "eager"]  # auto would export it (~90 s)
    assert main(args) == 0
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == (50, 70)
    assert mask.std() > 0  # a real network ran; a constant image would mean nothing did


def test_bad_model_and_precision_give_one_line_errors(tmp_path, capsys):
    green_screen(tmp_path / "in.png")
    assert main(["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.png"), "--model",
                 str(tmp_path / "missing.safetensors")]) == 2
    assert main(["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.png"), "--model", "random:swin_v1_t",
                 "--precision", "fp16", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 2 and "CUDA" in err[1]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("bad", ["#12345", "nonsense-colour"])
def test_bad_background_is_refused(tmp_path, bad, capsys):
    green_screen(tmp_path / "in.png")
    assert main(["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.png"), "--model", "chroma",
                 "--background", bad]) == 2
    assert capsys.readouterr().err.startswith("error:")


# --- issue 10: outputs never land on inputs, files are not folders, 16-bit grey, bombs, permissions ------------


def cli(*argv, umask: int | None = None) -> subprocess.CompletedProcess:
    preexec = None if umask is None else (lambda: os.umask(umask))
    return subprocess.run([sys.executable, "-m", "rmbg_stream", "image", *map(str, argv), "--model", "chroma",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.strip()]


def snapshot(folder) -> dict:
    """Every path under `folder` (symlinks not followed) with its bytes, to show that nothing changed."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("spelling", ["same", "dot-dot", "symlink", "hard link", "symlinked input"])
def test_output_that_is_the_input_is_refused_under_every_spelling(tmp_path, spelling):
    (tmp_path / "sub").mkdir()
    green_screen(tmp_path / "in.png", h=31, w=45)
    src, out = tmp_path / "in.png", tmp_path / "in.png"
    if spelling == "dot-dot":
        out = f"{tmp_path}/./sub/../in.png"
    elif spelling == "symlink":
        out = tmp_path / "link.png"
        out.symlink_to("in.png")
    elif spelling == "hard link":
        out = tmp_path / "hard.png"
        os.link(src, out)
    elif spelling == "symlinked input":
        src = tmp_path / "sub" / "alias.png"
        src.symlink_to(tmp_path / "in.png")
    before = snapshot(tmp_path)
    proc = cli(src, "-o", out)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert line.startswith("error: -o ") and "would overwrite the input" in line
    assert snapshot(tmp_path) == before


def test_folder_batch_whose_outputs_land_on_its_inputs_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    green_screen(tmp_path / "in" / "a.jpg", h=22, w=35)
    green_screen(tmp_path / "in" / "b.png", h=22, w=35)  # b.png's cut-out is named b.png
    (tmp_path / "alias").symlink_to("in")
    before = snapshot(tmp_path)
    for out in (tmp_path / "in", tmp_path / "alias", f"{tmp_path}/in/../in/"):
        proc = cli(tmp_path / "in", "-o", out)
        assert proc.returncode == 2
        [line] = error_lines(proc)
        assert "b.png would overwrite the input" in line and str(tmp_path / "in" / "b.png") in line
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["several inputs", "folder input", "one input, name not an image",
                                  "inside a file", "folder named like an image", "trailing slash"])
def test_output_that_is_an_existing_file_is_one_line(tmp_path, case):
    (tmp_path / "in").mkdir()
    green_screen(tmp_path / "in" / "a.png", h=21, w=33)
    green_screen(tmp_path / "b.png", h=21, w=33)
    (tmp_path / "taken.png").write_bytes(b"the user's file")
    (tmp_path / "notes.txt").write_text("the user's notes")
    a, b = tmp_path / "in" / "a.png", tmp_path / "b.png"
    argv = {
        "several inputs": [a, b, "-o", tmp_path / "taken.png"],
        "folder input": [tmp_path / "in", "-o", tmp_path / "taken.png"],
        "one input, name not an image": [a, "-o", tmp_path / "notes.txt"],
        "inside a file": [a, "-o", tmp_path / "notes.txt" / "x.png"],
        "trailing slash": [a, "-o", f"{tmp_path / 'taken.png'}/"],
    }.get(case)
    before = snapshot(tmp_path)
    if case == "folder named like an image":  # a folder called x.png is a folder: the result goes inside it
        (tmp_path / "x.png").mkdir()
        proc = cli(a, "-o", tmp_path / "x.png")
        assert proc.returncode == 0, proc.stderr
        assert np.asarray(Image.open(tmp_path / "x.png" / "a.png")).shape == (21, 33, 4)
        return
    proc = cli(*argv)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert line.startswith("error: -o ") and "is a file, not a folder" in line
    assert snapshot(tmp_path) == before


def test_sixteen_bit_grey_input_and_background_are_scaled_not_white(tmp_path):
    h, w = 27, 41
    ramp = np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)
    want = np.repeat(np.round(ramp * (255 / 65535)).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    proc = cli(tmp_path / "grey16.png", "-o", tmp_path / "cut.png")
    assert proc.returncode == 0, proc.stderr
    cut = np.asarray(Image.open(tmp_path / "cut.png"))
    assert cut.shape == (h, w, 4) and np.all(cut[..., 3] == 255)  # grey is foreground to the green keyer
    np.testing.assert_array_equal(cut[..., :3], want)

    src = green_screen(tmp_path / "green.png", h=h, w=w)
    proc = cli(tmp_path / "green.png", "-o", tmp_path / "comp.png", "--background", tmp_path / "grey16.png")
    assert proc.returncode == 0, proc.stderr
    comp = np.asarray(Image.open(tmp_path / "comp.png"))
    np.testing.assert_array_equal(comp[:10], want[:10])  # green rows: the background, scaled, same size
    np.testing.assert_array_equal(comp[20:24, 25:35], src[20:24, 25:35])


def test_bomb_input_is_one_line_and_the_rest_of_the_folder_runs(tmp_path):
    from .test_images import bomb_png

    (tmp_path / "in").mkdir()
    bomb_png(tmp_path / "in" / "bomb.png")
    green_screen(tmp_path / "in" / "ok.png", h=19, w=29)
    proc = cli(tmp_path / "in", "-o", tmp_path / "out")
    assert proc.returncode == 1
    bomb_line, summary = error_lines(proc)
    assert bomb_line.startswith(f"error: {tmp_path / 'in' / 'bomb.png'}: refused") and "decompression bomb" in bomb_line
    assert summary == "error: 1 input(s) failed"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]

    proc = cli(tmp_path / "in" / "bomb.png", "-o", tmp_path / "one.png")
    assert proc.returncode == 1 and "decompression bomb" in error_lines(proc)[0]
    proc = cli(tmp_path / "in" / "ok.png", "-o", tmp_path / "two.png", "--background", tmp_path / "in" / "bomb.png")
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert line.startswith(f"error: background image {tmp_path / 'in' / 'bomb.png'}: refused")
    assert not (tmp_path / "one.png").exists() and not (tmp_path / "two.png").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    green_screen(tmp_path / "in.png", h=17, w=23)
    assert cli(tmp_path / "in.png", "-o", tmp_path / "one.png", umask=umask).returncode == 0
    assert cli(tmp_path / "in.png", "-o", tmp_path / "folder", "--background", "blur", umask=umask).returncode == 0
    assert stat.S_IMODE((tmp_path / "one.png").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "folder" / "in.jpg").stat().st_mode) == mode
