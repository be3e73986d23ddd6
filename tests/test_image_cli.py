"""`rmbg-stream image` end to end: real files in, real files out."""

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
            "--model", str(tmp_path / "lite.safetensors")]
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
