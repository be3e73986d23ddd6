"""The shared still-image loader (`media.images`) and everything that reads pictures through it: 16-bit grey is
scaled, decompression bombs are refused in one line before any work, for inputs, backgrounds and uploads."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmbg_stream.media.images import ImageError, ImageTooLarge, load_rgb, open_image
from rmbg_stream.server.sessions import ControlError, decode_upload

from .test_media import make_clip


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmbg_stream", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout)


def bomb_png(path: Path, width: int = 20000, height: int = 10000) -> Path:
    """A valid 1-bit grey PNG of width x height black pixels (200 M by default, over twice PIL's 89 M limit) that
    is 25 kB on disk: zlib squeezes its rows of zeros a thousandfold."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def grey16(h: int = 23, w: int = 37) -> np.ndarray:
    """(h, w) uint16 ramp over the whole 16-bit range, odd size."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def expected8(values: np.ndarray) -> np.ndarray:
    """16-bit grey -> the 8-bit RGB it stands for, (h, w, 3) uint8."""
    v = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- 16-bit grey -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif")])
def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path, mode, suffix):
    values = grey16()
    if mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    else:
        img = Image.frombytes(mode, (values.shape[1], values.shape[0]),
                              values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    path = tmp_path / f"grey{suffix}"
    img.save(path)
    assert Image.open(path).mode == mode
    rgb = load_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.flags.writeable and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, expected8(values))


def test_sixteen_bit_rgba_png_keeps_its_colours(tmp_path):
    import cv2

    rgb16 = np.stack([grey16(), grey16()[::-1], np.full((23, 37), 40000, np.uint16)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba16.png"), np.dstack([rgb16[..., ::-1], np.full((23, 37), 65535, np.uint16)]))
    got = load_rgb(tmp_path / "rgba16.png").astype(int)
    want = (rgb16.astype(np.float64) * 255 / 65535).round()
    assert np.abs(got - want).max() <= 1  # PIL keeps the high byte; never clipped to 255


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :5] = (255, 0, 0)  # red stripe on the left of the stored picture
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    rgb = load_rgb(tmp_path / "rot.jpg")
    assert rgb.shape == (30, 10, 3) and rgb[2, 5, 0] > 200 and rgb[27, 5, 0] < 60  # the stripe is now on top


def test_uploaded_sixteen_bit_background_is_scaled(tmp_path):
    values = grey16()
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    img = decode_upload(buf.getvalue(), limit=1_000_000)
    np.testing.assert_array_equal(np.asarray(img), expected8(values))


# --- decompression bombs ---------------------------------------------------------------------------------------


def test_bombs_are_refused_from_the_header(bomb, tmp_path):
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageTooLarge, match=r"bomb\.png: refused: .*decompression bomb"):
        load_rgb(bomb)
    # Between the limit and twice it PIL only warns, and would decode 100 M pixels: refused here as well.
    near = bomb_png(tmp_path / "near.png", 10000, 10000)
    with pytest.raises(ImageTooLarge, match=r"100000000 pixels"):
        open_image(near)
    with pytest.raises(ImageTooLarge) as info:
        open_image(io.BytesIO(bomb.read_bytes()), "the upload")
    assert str(info.value).startswith("the upload: refused") and "BytesIO" not in str(info.value)


def test_uploaded_bomb_is_one_control_error(bomb):
    with pytest.raises(ControlError, match="decompression bomb"):
        decode_upload(bomb.read_bytes(), limit=1_000_000)
    with pytest.raises(ControlError, match="^not an image"):
        decode_upload(b"\x89PNG\r\n\x1a\n but no more", limit=1_000_000)


def test_unreadable_files_are_image_errors(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="text.png: cannot read image"):
        load_rgb(tmp_path / "text.png")
    with pytest.raises(ImageError, match="no such file"):
        load_rgb(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:-30])
    with pytest.raises(ImageError, match="cut.png: cannot read image"):
        load_rgb(tmp_path / "cut.png")


def test_transcode_with_a_bomb_background_stops_before_the_output_opens(bomb, tmp_path):
    make_clip(tmp_path / "in.mp4", n=4, size=(48, 34), audio=False)
    proc = cli("transcode", tmp_path / "in.mp4", "-o", tmp_path / "out.mp4", "--background", bomb,
               "--model", "chroma", "--device", "cpu", "--quiet")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line.startswith(f"error: background image {bomb}: refused") and "decompression bomb" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_serve_with_a_bomb_background_refuses_to_start(bomb):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    proc = cli("serve", "--port", port, "--background", bomb, "--model", "chroma", "--device", "cpu", timeout=60)
    assert proc.returncode == 2 and "serving" not in proc.stdout
    line = one_error_line(proc)
    assert line.startswith(f"error: background image {bomb}: refused") and "decompression bomb" in line
    assert time.monotonic() - t0 < 30


def test_camera_with_a_missing_background_image_is_one_line(tmp_path):
    proc = cli("camera", "--input", tmp_path / "none.mp4", "--output", tmp_path / "o.mp4",
               "--background", tmp_path / "nowhere.png", "--model", "chroma", "--device", "cpu", timeout=60)
    assert proc.returncode == 2
    missing = tmp_path / "nowhere.png"
    assert one_error_line(proc) == f"error: background image {missing}: cannot read image: no such file"
    assert not os.path.exists(tmp_path / "o.mp4")
