"""`--runtime`: the choice table, the compiled network's batch padding and progress line, the flag on every command.

Compiling BiRefNet itself takes minutes on two shared CPU cores (Swin-T at 128x128: 405 s, measured while other
jobs ran), so the compiled path is tested on a small convolutional network with the same output contract
(a list of maps); scripts/bench_model.py --compare compiles the real one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rmbg_stream.cli import make_parser
from rmbg_stream.engine.runtimes import AUTO, CompiledNet, bucket, choose_runtime, onnx_available, pad_batch

CPU = torch.device("cpu")


class TwoMaps(nn.Module):
    """(B,3,h,w) -> [(B,1,h/2,w/2), (B,1,h,w)], like BiRefNet's side and final outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = self.head(torch.relu(self.conv(x)))
        return [nn.functional.avg_pool2d(y, 2), y]


def test_batches_pad_up_to_the_next_power_of_two_by_repeating_the_last_frame():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    x = torch.arange(3.0).view(3, 1, 1, 1)
    assert pad_batch(x, 4).flatten().tolist() == [0, 1, 2, 2]
    assert pad_batch(x, 3) is x


def test_compiled_network_equals_eager_on_short_batches_and_announces_each_new_size(capfd):
    torch.manual_seed(0)
    net = TwoMaps().eval()
    compiled = CompiledNet(net, CPU)
    x = torch.rand(3, 3, 22, 34)  # not a multiple of 4 in either side, non-square
    with torch.inference_mode():
        got, want = compiled(x), net(x)
        again = compiled(x[:3])  # pads to 4 again: the same graph, no new line
        one = compiled(x[:1])
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    torch.testing.assert_close(again[1], want[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(one[1], want[1][:1], atol=1e-5, rtol=0)
    err = capfd.readouterr().err
    starts = [line for line in err.splitlines() if line.startswith("compiling the network")]
    assert starts == [
        f"compiling the network for 34x22, batch 4 (once per size; kernels cached in {compiled_cache()}) ...",
        f"compiling the network for 34x22, batch 1 (once per size; kernels cached in {compiled_cache()}) ...",
    ]
    assert err.count("compiled in ") == 2


def compiled_cache() -> str:
    from rmbg_stream.engine.runtimes import inductor_cache

    return inductor_cache()


@pytest.mark.parametrize(("runtime", "model", "device", "want"), [
    ("auto", "briaai/RMBG-2.0", "cpu", AUTO["cpu"] if AUTO["cpu"] != "onnx" or onnx_available() else "eager"),
    ("auto", "birefnet", "cuda", "compile"),
    ("auto", "random:swin_v1_t", "cpu", "eager"),
    ("auto", "random:swin_v1_l", "cuda", "eager"),
    ("auto", "model.onnx", "cpu", "onnx"),
    ("onnx", "model.ONNX", "cpu", "onnx"),
    ("compile", "briaai/RMBG-2.0", "cpu", "compile"),
    ("compile", "chroma:auto", "cpu", "eager"),
    ("eager", "birefnet", "cuda", "eager"),
])
def test_runtime_choice_table(runtime, model, device, want):
    assert choose_runtime(runtime, model, torch.device(device)) == want


def test_bad_runtime_choices_are_one_line_value_errors():
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        choose_runtime("tensorrt", "birefnet", CPU)
    with pytest.raises(ValueError, match="runs with --runtime onnx"):
        choose_runtime("compile", "m.onnx", CPU)


@pytest.mark.parametrize("command", [["image", "a.png", "-o", "b.png"], ["transcode", "a.mp4", "-o", "b.mp4"],
                                     ["serve"], ["camera"]])
def test_every_model_command_takes_runtime_with_auto_the_default(command):
    parser = make_parser()
    assert parser.parse_args(command).runtime == "auto"
    assert parser.parse_args([*command, "--runtime", "compile"]).runtime == "compile"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--runtime", "tvm"])


@pytest.mark.parametrize("version, device, refused", [
    ("0.28.0+cu128", "cuda", True), ("0.27.1", "cuda:1", True), ("0.29.0+cu130", "cuda", False),
    ("0.30.1", "cuda", False), ("0.28.0", "cpu", False),
])
def test_cuda_refuses_a_torchvision_whose_deform_conv_ignores_the_current_stream(version, device, refused):
    from rmbg_stream.models.blocks import check_deform_stream

    if refused:
        with pytest.raises(ValueError, match=r"^torchvision .* wrong CUDA stream.*>=0\.29\.0$"):
            check_deform_stream(torch.device(device), version)
    else:
        check_deform_stream(torch.device(device), version)
    check_deform_stream(torch.device("cpu"))  # the installed one
