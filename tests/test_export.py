"""`rmbg-stream export` and `--model FILE.onnx`: the graph under onnxruntime against the conformance vectors.

The exporter (onnx, onnxscript) and onnxruntime come with the ``onnx`` extra; without them these tests skip.
Each export takes 30-60 s on two shared CPU cores, so the graphs are made once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rmbg_stream.cli import main
from rmbg_stream.engine.backends import IMAGENET_MEAN, IMAGENET_STD, create_backend
from tests.conformance import OUTS, synthetic_state_dict

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[onnx]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install '.[onnx]')")

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """(checkpoint of the lite_256 synthetic weights, its graph at 256x256 batch 1, the vector's arrays)."""
    folder = tmp_path_factory.mktemp("export")
    sd, arrays = synthetic_state_dict("lite_256")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "lite.safetensors"))
    graph = folder / "lite.onnx"
    assert main(["export", str(folder / "lite.safetensors"), "-o", str(graph), "--resolution", "256",
                 "--patch-order", "legacy"]) == 0
    return folder / "lite.safetensors", graph, arrays


def test_exported_graph_reproduces_the_conformance_vectors_under_onnxruntime(lite):
    _, graph, arrays = lite
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"x": arrays["input"]})
    for key, got in zip(OUTS, outs, strict=True):
        diff = np.abs(got - arrays[key])
        assert got.shape == arrays[key].shape, key
        # The README's tolerance; measured: out3 max 1.4e-4, mean 1.4e-5.
        assert diff.max() <= 2e-3 and diff.mean() <= 2e-4, f"{key}: max {diff.max():.2e} mean {diff.mean():.2e}"


def test_deformable_convolutions_are_native_deform_conv_nodes_not_gathers(lite):
    nodes = [n.op_type for n in onnx.load(str(lite[1])).graph.node]
    assert nodes.count("DeformConv") == 20  # 5 decoder blocks x 4 ASPP branches
    assert not {"GatherElements", "GatherND", "GridSample"} & set(nodes)
    meta = {p.key: p.value for p in onnx.load(str(lite[1])).metadata_props}
    assert meta["rmbg_stream.resolution"] == "256x256" and meta["rmbg_stream.batch"] == "1"


def test_onnx_backend_runs_batches_larger_than_the_graphs_in_chunks(lite):
    _, graph, arrays = lite
    backend = create_backend(str(graph), CPU, runtime="auto")
    assert backend.resolution == (256, 256) and backend.batch == 1
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    image = torch.from_numpy(arrays["input"]) * std + mean
    x = torch.cat([image, image.flip(-1), image])
    alpha = backend(x)
    want = torch.from_numpy(arrays["out3"]).sigmoid()
    assert alpha.shape == (3, 1, 256, 256) and alpha.dtype == torch.float32
    assert (alpha[0] - want[0]).abs().max() <= 1e-3 and (alpha[2] - want[0]).abs().max() <= 1e-3
    assert (alpha[1] - alpha[0]).abs().max() > 1e-2  # the flipped frame is its own result, not a copy


def test_image_through_the_graph_equals_the_eager_checkpoint_on_an_odd_frame(lite, tmp_path):
    weights, graph, _ = lite
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    common = ["image", str(tmp_path / "in.png"), "--mask", "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "onnx.png"), "--model", str(graph)]) == 0
    assert main([*common, "-o", str(tmp_path / "eager.png"), "--model", str(weights), "--runtime", "eager",
                 "--resolution", "256", "--patch-order", "legacy"]) == 0
    a = np.asarray(Image.open(tmp_path / "onnx.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "eager.png")).astype(int)
    assert a.shape == (53, 71) and np.abs(a - b).max() <= 1 and a.std() > 0


@pytest.mark.parametrize("case", ["missing model", "bad resolution", "bad batch", "not .onnx", "no folder",
                                  "unwritable", "chroma"])
def test_bad_export_inputs_are_one_line_and_write_nothing(lite, tmp_path, capsys, case):
    weights = str(lite[0])
    out = str(tmp_path / "m.onnx")
    argv = {
        "missing model": [str(tmp_path / "missing.safetensors"), "-o", out],
        "bad resolution": [weights, "-o", out, "--resolution", "100"],
        "bad batch": [weights, "-o", out, "--batch", "0"],
        "not .onnx": [weights, "-o", str(tmp_path / "m.txt")],
        "no folder": [weights, "-o", str(tmp_path / "nowhere" / "m.onnx")],
        "unwritable": [weights, "-o", "/proc/m.onnx"],
        "chroma": ["chroma", "-o", out],
    }[case]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_model_refuses_the_eager_runtime_in_one_line(lite, tmp_path, capsys):
    Image.new("RGB", (33, 17)).save(tmp_path / "in.png")
    argv = ["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--model", str(lite[1])]
    assert main([*argv, "--runtime", "eager"]) == 2
    assert main([*argv, "--resolution", "512"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "--runtime onnx" in err[0] and "fixed at export" in err[1]
    assert not (tmp_path / "o.png").exists()


def test_runtime_onnx_exports_a_checkpoint_once_into_the_cache_as_a_dynamic_batch_non_square_graph(
        lite, tmp_path, monkeypatch, capfd):
    # One export serves three checks (each costs about a minute on two cores): the cache, a batch axis that is
    # symbolic (batch 3 through a graph traced at 2), and a non-square size in (h, w) order.
    monkeypatch.setenv("RMBG_ONNX_CACHE", str(tmp_path))
    weights = str(lite[0])
    first = create_backend(weights, CPU, resolution=(64, 96), patch_order="legacy", runtime="onnx")
    assert "exporting" in capfd.readouterr().err
    second = create_backend(weights, CPU, resolution=(64, 96), patch_order="legacy", runtime="onnx")
    assert "exporting" not in capfd.readouterr().err
    [graph] = tmp_path.iterdir()
    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    assert meta["rmbg_stream.resolution"] == "96x64" and meta["rmbg_stream.batch"] == "dynamic"
    assert first.batch is None and first.resolution == (64, 96)
    eager = create_backend(weights, CPU, "fp32", (64, 96), patch_order="legacy", runtime="eager")
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first(x), second(x), atol=0, rtol=0)
    torch.testing.assert_close(first(x), eager(x), atol=2e-3, rtol=0)
