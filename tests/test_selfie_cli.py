"""`--model selfie` through the command line, on every file command: image, transcode, export and a graph of it,
--cluster. Everything runs offline (HF_HUB_OFFLINE=1, an empty HF_HOME, the hub client's download functions made to
fail), on the real pictures of tests/data, and the results are checked pixel by pixel.

`astronaut.jpg` (tests/data, 320x320 RGB) holds a person in the middle: the regions below, in its rows and columns,
are ones the selfie mask covers (face, suit) or leaves out (the flag at the top left, the wall by the shuttle's tip at
the top right), each well away from the mask's edges.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from rmbg_stream.cli import main

from .test_media import read_video
from .test_selfie import without_metadata

REPO = Path(__file__).resolve().parents[1]
ASTRONAUT = REPO / "tests" / "data" / "astronaut.jpg"
Box = tuple[slice, slice]  # (rows, cols)
PERSON: dict[str, Box] = {"face": (slice(40, 90), slice(125, 165)), "suit": (slice(210, 290), slice(60, 150))}
BACKGROUND: dict[str, Box] = {"flag": (slice(0, 30), slice(0, 30)), "wall": (slice(0, 30), slice(280, 320))}


def astronaut() -> np.ndarray:
    """(320,320,3) uint8 RGB."""
    return np.asarray(Image.open(ASTRONAUT).convert("RGB"))


def go_offline(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No hub: offline mode, an empty HF_HOME, and the hub client's downloads fail the test if anything asks."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args} {kwargs}")

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HOME", str(home))
    for name in ("hf_hub_download", "snapshot_download", "get_hf_file_metadata"):
        mp.setattr(huggingface_hub, name, no_hub)


def nothing_in(home: Path) -> bool:
    return not home.exists() or not any(home.rglob("*"))


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    go_offline(monkeypatch, tmp_path / "hf")
    yield
    assert nothing_in(tmp_path / "hf"), "something was downloaded or cached in HF_HOME"


def rmbg(*argv) -> int:
    """The command line in this process: `rmbg-stream ARGV`."""
    return main([*map(str, argv)])


def alpha_of(path: Path) -> np.ndarray:
    """(H,W) uint8: a mask PNG's grey, or an RGBA PNG's alpha."""
    im = Image.open(path)
    return np.asarray(im)[..., 3] if im.mode == "RGBA" else np.asarray(im.convert("L"))


def covers_the_person(alpha: np.ndarray, person=PERSON, background=BACKGROUND) -> None:
    """alpha (H,W) uint8 is opaque over the person's regions and transparent over the background's."""
    for name, box in person.items():
        assert alpha[box].mean() > 245 and alpha[box].min() > 150, f"{name}: {alpha[box].mean():.1f}"
    for name, box in background.items():
        assert alpha[box].max() < 13, f"{name}: {alpha[box].max()}"


@pytest.fixture(scope="module")
def selfie_mask(tmp_path_factory) -> np.ndarray:
    """The astronaut's mask from `image --model selfie --mask`: (320,320) uint8."""
    out = tmp_path_factory.mktemp("mask") / "mask.png"
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp, out.parent / "hf")
        assert rmbg("image", ASTRONAUT, "--model", "selfie", "--mask", "-o", out) == 0
    assert nothing_in(out.parent / "hf")
    return alpha_of(out)


def test_the_help_names_the_shipped_selfie_models(monkeypatch):
    from rmbg_stream.cli import make_parser

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping, which would break "selfie-landscape" at its hyphen
    parser = make_parser()
    top = " ".join(parser.format_help().split())
    assert "--model selfie or selfie-landscape" in top and "offline" in top
    assert "rmbg-stream image photo.jpg --model selfie -o cut.png" in top
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("image", "transcode"):
        text = " ".join(commands[name].format_help().split())
        assert "selfie or selfie-landscape (MediaPipe's person segmenter" in text and "no download" in text, name


# -- image --------------------------------------------------------------------------------------------------------


def test_the_quick_start_command_cuts_out_the_astronaut_offline_in_a_fresh_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and not k.upper().endswith("_PROXY")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", NO_PROXY="*",
               PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "rmbg_stream", "image", str(ASTRONAUT), "--model", "selfie",
                           "-o", "cut.png"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cut = np.asarray(Image.open(tmp_path / "cut.png"))
    assert cut.shape == (320, 320, 4) and cut.dtype == np.uint8
    covers_the_person(cut[..., 3])
    person = cut[..., 3] > 250
    assert np.array_equal(cut[..., :3][person], astronaut()[person]), "the person's colours changed"
    assert not (tmp_path / "hf").exists(), "nothing is downloaded or cached"


def test_the_mask_covers_the_astronaut_and_is_the_cut_out_s_alpha(selfie_mask, tmp_path):
    covers_the_person(selfie_mask)
    assert rmbg("image", ASTRONAUT, "--model", "selfie", "-o", tmp_path / "cut.png") == 0
    assert np.abs(alpha_of(tmp_path / "cut.png").astype(int) - selfie_mask).max() <= 1


def test_selfie_landscape_on_an_odd_crop_composites_onto_red(tmp_path):
    left, top = 10, 20  # a 251x187 crop: rows 20..206, cols 10..260 of the astronaut
    src = astronaut()[top:top + 187, left:left + 251]
    Image.fromarray(src).save(tmp_path / "crop.png")
    assert rmbg("image", tmp_path / "crop.png", "--model", "selfie-landscape", "--background", "#ff0000",
                "-o", tmp_path / "red.png") == 0
    got = np.asarray(Image.open(tmp_path / "red.png").convert("RGB")).astype(int)
    assert got.shape == (187, 251, 3)
    for name, (rows, cols) in {"face": (slice(20, 70), slice(115, 155)),  # astronaut rows 40..89
                               "chest": (slice(130, 180), slice(75, 175))}.items():
        assert np.abs(got[rows, cols] - src[rows, cols]).mean() < 2, name
        assert np.abs(got[rows, cols] - src[rows, cols]).max() <= 64, name
    for name, (rows, cols) in {"flag": (slice(0, 20), slice(0, 20)), "wall": (slice(0, 20), slice(225, 251))}.items():
        assert np.abs(got[rows, cols] - (255, 0, 0)).max() <= 12, name


# -- transcode ----------------------------------------------------------------------------------------------------

CLIP_W, CLIP_H, CLIP_N, SCALE = 213, 157, 12, 236 / 320


def clip_frame(i: int) -> np.ndarray:
    """Frame i: the astronaut at 236x236, a 213x157 window moving 2 px right and 1 px down per frame."""
    img = np.asarray(Image.fromarray(astronaut()).resize((236, 236), Image.BILINEAR))
    return img[10 + i:10 + i + CLIP_H, 2 * i:2 * i + CLIP_W]


def in_frame(box: Box, i: int) -> Box:
    """An astronaut box (320x320 coordinates) in clip frame i, shrunk by 2 px on each side for the resampling."""
    rows, cols = box
    top, left = 10 + i, 2 * i
    return (slice(round(rows.start * SCALE) - top + 2, round(rows.stop * SCALE) - top - 2),
            slice(round(cols.start * SCALE) - left + 2, round(cols.stop * SCALE) - left - 2))


FRAME_PERSON = {"face": PERSON["face"], "collar": (slice(105, 150), slice(110, 155))}  # astronaut boxes
# Frame corners, in every frame: astronaut rows 14..48 and cols 0..50 (flag) or 268..319 (wall).
FRAME_BACKGROUND = {"flag": (slice(0, 15), slice(0, 15)), "wall": (slice(0, 15), slice(CLIP_W - 15, CLIP_W))}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """12 frames, 213x157 (odd: H.264 4:4:4, lossless), 30 fps, a keyframe every 6 frames."""
    path = tmp_path_factory.mktemp("clip") / "astronaut.mp4"
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = CLIP_W, CLIP_H, "yuv444p"
        v.options = {"qp": "0", "preset": "ultrafast"}
        v.codec_context.gop_size = 6
        for i in range(CLIP_N):
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(clip_frame(i)), format="rgb24")))
        c.mux(v.encode())
    return path


def transcode(src: Path, out: Path, *options) -> int:
    return rmbg("transcode", src, "-o", out, "--model", "selfie", "--quiet", "--crf", "1", *options)


def test_transcode_with_selfie_keys_every_frame_of_an_odd_size_clip_onto_blue(clip, tmp_path):
    out = tmp_path / "blue.mp4"
    assert transcode(clip, out, "--background", "#0000ff") == 0
    src, src_times, _ = read_video(clip)
    got, times, stream = read_video(out)
    assert len(got) == len(src) == CLIP_N and times == src_times
    assert (stream.width, stream.height) == (CLIP_W, CLIP_H)
    for i, frame in enumerate(got):
        frame = frame.astype(int)
        for name, box in FRAME_PERSON.items():
            box = in_frame(box, i)
            diff = np.abs(frame[box] - src[i][box])
            assert diff.mean() < 2 and diff.max() <= 24, f"frame {i}, {name}: {diff.mean():.2f} {diff.max()}"
        for name, box in FRAME_BACKGROUND.items():
            assert np.abs(frame[box] - (0, 0, 255)).max() <= 12, f"frame {i}, {name}"


def test_transcode_mask_with_selfie_is_white_on_the_person_and_black_elsewhere(clip, tmp_path):
    out = tmp_path / "mask.mp4"
    assert transcode(clip, out, "--mask") == 0
    got, _, stream = read_video(out)
    assert len(got) == CLIP_N and (stream.width, stream.height) == (CLIP_W, CLIP_H)
    for i, frame in enumerate(got):
        grey = frame[..., 0]
        assert np.abs(frame.astype(int) - grey[..., None]).max() <= 2, "a mask is grey"
        for name, box in FRAME_PERSON.items():
            assert grey[in_frame(box, i)].mean() > 240, f"frame {i}, {name}"
        for name, box in FRAME_BACKGROUND.items():
            assert grey[box].max() < 16, f"frame {i}, {name}"


# -- export, and graphs without metadata ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "s.onnx"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        go_offline(mp, path.parent / "hf")
        assert rmbg("export", "selfie", "-o", path) == 0
    assert nothing_in(path.parent / "hf")
    assert out.getvalue().startswith(f"wrote {path}: 256x256, batch 1"), out.getvalue()
    return path


@pytest.mark.parametrize("how", ["exported graph", "--runtime onnx", "--runtime eager"])
def test_the_exported_graph_and_every_runtime_give_the_selfie_mask(how, exported, selfie_mask, tmp_path):
    model = {"exported graph": ["--model", exported], "--runtime onnx": ["--model", "selfie", "--runtime", "onnx"],
             "--runtime eager": ["--model", "selfie", "--runtime", "eager"]}[how]
    assert rmbg("image", ASTRONAUT, *model, "--mask", "-o", tmp_path / "mask.png") == 0
    assert np.abs(alpha_of(tmp_path / "mask.png").astype(int) - selfie_mask).max() <= 2


def test_export_with_a_dynamic_batch_runs_any_batch_as_eager_does(tmp_path):
    import torch

    from rmbg_stream.engine.backends import create_backend

    graph = tmp_path / "dyn.onnx"
    assert rmbg("export", "selfie-landscape", "-o", graph, "--batch", "dynamic") == 0
    cpu = torch.device("cpu")
    onnx_net, eager = create_backend(str(graph), cpu, runtime="onnx"), create_backend("selfie-landscape", cpu,
                                                                                       runtime="eager")
    assert onnx_net.batch is None and onnx_net.resolution == eager.resolution == (144, 256)
    x = torch.rand(3, 3, 144, 256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(onnx_net(x), eager(x), atol=2e-3, rtol=0)


def test_a_graph_without_metadata_needs_its_range_and_output_on_the_command_line(exported, selfie_mask, tmp_path,
                                                                                 capsys):
    bare = without_metadata(exported, tmp_path / "bare.onnx")
    out = tmp_path / "mask.png"
    assert rmbg("image", ASTRONAUT, "--model", bare, "--mask", "-o", out) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "--input-range" in line and "--model-output" in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == [bare]
    assert rmbg("image", ASTRONAUT, "--model", bare, "--input-range", "0..1", "--model-output", "probability",
                "--mask", "-o", out) == 0
    assert np.abs(alpha_of(out).astype(int) - selfie_mask).max() <= 2


# -- --cluster ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # with tests/test_cluster.py: one local Ray at a time
def test_cluster_transcode_with_selfie_on_onnx_gives_the_single_process_frames(clip, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rmbg-stream[cluster]')")
    # Lossless (--crf 0), as x264's lossy output depends on its thread count, which a worker's share of the CPUs sets.
    common = ["--background", "#0000ff", "--runtime", "onnx", "--crf", "0"]
    assert transcode(clip, tmp_path / "single.mp4", *common) == 0
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        t0 = time.monotonic()
        # Two workers, cut at the keyframe of frame 6: two segments, joined.
        assert transcode(clip, tmp_path / "out" / "cluster.mp4", *common, "--cluster", "--cluster-workers", "2",
                         "--segment-seconds", "0.1") == 0
        print(f"cluster run: {time.monotonic() - t0:.1f} s")
    finally:
        if started:
            ray.shutdown()
    got, times, stream = read_video(tmp_path / "out" / "cluster.mp4")
    ref, ref_times, _ = read_video(tmp_path / "single.mp4")
    assert len(got) == len(ref) == CLIP_N and times == ref_times
    assert (stream.width, stream.height) == (CLIP_W, CLIP_H)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert np.abs(a.astype(int) - b).max() <= 2, f"frame {i} differs from the single-process output"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cluster.mp4"], "segments are swept"
