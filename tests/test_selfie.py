"""The selfie segmenter: our PyTorch network against an independent TFLite interpreter on real pictures, through
every runtime, and the checks that keep a wrong file or a graph of unknown range from giving wrong masks.

The pictures are in tests/data: `astronaut.jpg` (NASA's portrait of Eileen Collins, public domain, from
scikit-image's data) and two frames of `chaplin.mp4` (../shared/media), 320 wide.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rmbg_stream.engine.backends import create_backend
from rmbg_stream.engine.setup import load_backend
from rmbg_stream.models.selfie import SELFIE_MODELS, load_selfie
from rmbg_stream.models.weights import WeightsError

DATA = Path(__file__).parent / "data"
PICTURES = ("astronaut.jpg", "chaplin_060.jpg", "chaplin_150.jpg")
TOLERANCE = 2e-3  # max |diff| of the mask, issue 18
CPU = torch.device("cpu")


def picture(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / name).convert("RGB"))


def network_input(name: str, size: tuple[int, int]) -> torch.Tensor:
    """A picture as the engine feeds it: float (1,3,h,w) RGB 0..1 at the network's size."""
    x = torch.from_numpy(picture(name).copy()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def litert_masks(model: str, x: torch.Tensor) -> np.ndarray:
    """(B,h,w) masks of the original file under ai-edge-litert's interpreter, one frame at a time (its input has
    batch 1)."""
    interpreter = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")
    it = interpreter.Interpreter(model_path=str(SELFIE_MODELS[model].path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    masks = []
    for frame in x:
        it.set_tensor(inp["index"], frame.permute(1, 2, 0)[None].contiguous().numpy())
        it.invoke()
        masks.append(it.get_tensor(out["index"])[0, ..., 0].copy())
    return np.stack(masks)


def batch_of(model: str, n: int) -> torch.Tensor:
    size = load_selfie(model)[1].resolution
    return torch.cat([network_input(PICTURES[i % len(PICTURES)], size) for i in range(n)])


@pytest.mark.parametrize("model", sorted(SELFIE_MODELS))
def test_the_file_says_rgb_in_0_to_1_nhwc_at_its_resolution_and_a_probability_out(model):
    _, info = load_selfie(model)
    assert info.resolution == {"selfie": (256, 256), "selfie-landscape": (144, 256)}[model]
    assert (info.io.input_range, info.io.output) == ("0..1", "probability")


@pytest.mark.parametrize("runtime", ["eager", "onnx"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model", sorted(SELFIE_MODELS))
def test_our_network_gives_litert_s_masks_on_real_pictures(model, batch, runtime):
    x = batch_of(model, batch)
    ref = litert_masks(model, x)
    backend = load_backend(model, "cpu", runtime=runtime)
    assert backend.resolution == tuple(x.shape[-2:])
    ours = backend(x)[:, 0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOLERANCE
    assert ref.max() > 0.99 and ref.min() < 0.01  # real masks: people and background, not a flat guess


@pytest.mark.slow
def test_compile_runtime_gives_litert_s_masks_at_batch_3():
    x = batch_of("selfie", 3)
    compiled = load_backend("selfie", "cpu", runtime="compile")(x)[:, 0].numpy()
    assert np.abs(compiled - litert_masks("selfie", x)).max() <= TOLERANCE


def test_the_mask_covers_the_astronaut_and_not_the_background():
    backend = load_backend("selfie", "cpu", runtime="eager")
    a = backend(network_input("astronaut.jpg", (256, 256)))[0, 0]
    face, suit = a[50:90, 96:136].mean(), a[170:230, 40:120].mean()  # rows, cols at 256x256
    corner, flag_top = a[:30, 200:].mean(), a[:30, :30].mean()
    assert face > 0.9 and suit > 0.95
    assert corner < 0.05 and flag_top < 0.05


def test_auto_runtime_on_the_cpu_runs_the_exported_graph_with_its_metadata():
    backend = load_backend("selfie", "cpu", runtime="auto")
    assert type(backend).__name__ == "OnnxBackend"
    assert (backend.io.input_range, backend.io.output) == ("0..1", "probability")


def test_resolution_is_refused_for_the_selfie_models():
    with pytest.raises(ValueError, match="leave out --resolution"):
        create_backend("selfie", CPU, resolution=(512, 512))


# --- files that are not what they claim ------------------------------------------------------------------------


def patched(tmp_path: Path, old: bytes, new: bytes, model: str = "selfie") -> Path:
    data = SELFIE_MODELS[model].path.read_bytes()
    assert data.count(old) == 1
    path = tmp_path / "patched.tflite"
    path.write_bytes(data.replace(old, new))
    return path


def test_a_file_without_metadata_is_refused_rather_than_given_a_guessed_range(tmp_path):
    path = patched(tmp_path, b"TFLITE_METADATA", b"TFLITE_METADATX")
    with pytest.raises(WeightsError, match="no input normalisation"):
        load_selfie(str(path))


def test_a_file_normalising_otherwise_is_refused_in_one_line(tmp_path):
    std_255 = np.float32(255).tobytes()
    path = patched(tmp_path, std_255 + b"\x01\x00\x00\x00", np.float32(127).tobytes() + b"\x01\x00\x00\x00")
    with pytest.raises(WeightsError, match=r"std \[127.0\]") as err:
        load_selfie(str(path))
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_tflite_is_refused_in_one_line(tmp_path):
    path = tmp_path / "x.tflite"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a TFLite model|subgraphs"):
        load_selfie(str(path))


def test_a_tflite_file_on_the_command_line_runs_like_the_bundled_one(tmp_path):
    copy = tmp_path / "mine.tflite"
    copy.write_bytes(SELFIE_MODELS["selfie"].path.read_bytes())
    x = batch_of("selfie", 1)
    a = create_backend(str(copy), CPU)(x)
    b = create_backend("selfie", CPU)(x)
    assert torch.equal(a, b)


# --- ONNX graphs and their metadata ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selfie_onnx(tmp_path_factory):
    from rmbg_stream.export import export_onnx

    path = tmp_path_factory.mktemp("selfie-onnx") / "selfie.onnx"
    export_onnx("selfie", path)
    return path


def without_metadata(src: Path, dest: Path, keep: tuple[str, ...] = ()) -> Path:
    import onnx

    proto = onnx.load(str(src))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key in keep]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dest))
    return dest


def test_an_exported_selfie_graph_records_its_input_range_and_output(selfie_onnx):
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(selfie_onnx)).metadata_props}
    assert meta["rmbg_stream.input_range"] == "0..1"
    assert meta["rmbg_stream.output"] == "probability"
    assert meta["rmbg_stream.network"] == "selfie"


def test_a_graph_that_says_neither_is_refused_in_one_line(selfie_onnx, tmp_path):
    bare = without_metadata(selfie_onnx, tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="--input-range .* --model-output") as err:
        load_backend(str(bare), "cpu", runtime="auto")
    assert "\n" not in str(err.value)


def test_a_graph_without_metadata_runs_right_with_explicit_options(selfie_onnx, tmp_path):
    bare = without_metadata(selfie_onnx, tmp_path / "bare.onnx")
    x = batch_of("selfie", 2)
    ref = litert_masks("selfie", x)
    got = load_backend(str(bare), "cpu", runtime="auto", input_range="0..1", model_output="probability")(x)
    got = got[:, 0].numpy()
    assert np.abs(got - ref).max() <= TOLERANCE
    # The old behaviour (ImageNet input and a second sigmoid) gave alpha in [0.5, 0.731]: clearly wrong.
    wrong = load_backend(str(bare), "cpu", runtime="auto", input_range="imagenet", model_output="logits")(x)
    wrong = wrong[:, 0].numpy()
    assert wrong.min() >= 0.5 - 1e-6 and np.abs(wrong - ref).max() > 0.2


def test_one_of_the_two_options_alone_is_refused(selfie_onnx):
    with pytest.raises(ValueError, match="go together"):
        load_backend(str(selfie_onnx), "cpu", runtime="auto", input_range="0..1")


def test_the_options_are_refused_for_a_model_that_says_them_itself():
    with pytest.raises(ValueError, match="describe a .onnx graph"):
        load_backend("selfie", "cpu", input_range="0..1", model_output="probability")


def test_the_command_line_refuses_an_unmarked_graph_in_one_error_line(selfie_onnx, tmp_path):
    bare = without_metadata(selfie_onnx, tmp_path / "bare.onnx")
    out = tmp_path / "cut.png"
    run = subprocess.run([sys.executable, "-m", "rmbg_stream", "image", str(DATA / "astronaut.jpg"), "-o", str(out),
                          "--model", str(bare)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")][0].count("--input-range") == 1
    assert not out.exists()
