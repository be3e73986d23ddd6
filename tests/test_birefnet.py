"""The network contract: reference key layout, conformance vectors, batches and non-square inputs."""

import numpy as np
import pytest
import torch

from rmbg_stream.models import BACKBONES, BiRefNet
from tests.conformance import BACKBONE, read_keys, synthetic_state_dict


@pytest.fixture(scope="module")
def lite():
    sd, arrays = synthetic_state_dict("lite_256")
    model = BiRefNet("swin_v1_t").eval()
    model.load_state_dict(sd, strict=True)
    return model, arrays


@pytest.mark.parametrize("backbone", ["swin_v1_t", "swin_v1_l"])
def test_state_dict_layout_equals_reference(backbone):
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in BiRefNet(backbone).state_dict().items()]
    assert ours == [tuple(row) for row in read_keys(backbone)]


@pytest.mark.parametrize("name", ["lite_256", "general_256"])
def test_conformance_vectors(name):
    sd, arrays = synthetic_state_dict(name)
    model = BiRefNet(BACKBONE[name]).eval()
    own = model.state_dict()
    for key, value in sd.items():
        if not value.is_floating_point() and "relative_position_index" in key:
            assert torch.equal(own[key], value), f"derived buffer {key} differs from the reference"
    model.load_state_dict(sd, strict=True)
    x = torch.from_numpy(arrays["input"])
    with torch.inference_mode():
        got = {f"enc{i + 1}": t for i, t in enumerate(model.encode(x))}
        got.update({f"out{i}": t for i, t in enumerate(model(x))})
    assert len(got) == 8
    for key, tensor in got.items():
        ref = arrays[key]
        assert tensor.shape == ref.shape, key
        diff = np.abs(tensor.numpy() - ref)
        assert diff.max() <= 2e-3 and diff.mean() <= 2e-4, f"{name} {key}: max {diff.max():.2e} mean {diff.mean():.2e}"


def test_batch_of_two_equals_two_singles(lite):
    model, arrays = lite
    x = torch.from_numpy(arrays["input"])
    pair = torch.cat([x, x.flip(-1)])
    with torch.inference_mode():
        both = model(pair)
        single = model(x.flip(-1))
    assert [tuple(t.shape) for t in both] == [(2, 1, 8, 8), (2, 1, 16, 16), (2, 1, 32, 32), (2, 1, 256, 256)]
    np.testing.assert_allclose(both[-1][0].numpy(), arrays["out3"][0], atol=2e-3)
    np.testing.assert_allclose(both[-1][1].numpy(), single[-1][0].numpy(), atol=2e-3)


def test_non_square_input(lite):
    model, _ = lite
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 160)
    with torch.inference_mode():
        outs = model(x)
        # The second image alone must give the same logits: nothing leaks across the batch.
        alone = model(x[1:])[-1]
    assert [tuple(t.shape) for t in outs] == [(2, 1, 3, 5), (2, 1, 6, 10), (2, 1, 12, 20), (2, 1, 96, 160)]
    assert torch.isfinite(outs[-1]).all()
    torch.testing.assert_close(outs[-1][1:], alone, atol=2e-3, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_builds_and_runs(backbone):
    model = BiRefNet(backbone).eval()
    with torch.inference_mode():
        outs = model(torch.randn(1, 3, 64, 64))
    assert len(outs) == 4 and outs[-1].shape == (1, 1, 64, 64)


def test_bad_backbone_and_bad_size():
    with pytest.raises(ValueError, match="unknown backbone"):
        BiRefNet("resnet50")
    with pytest.raises(ValueError, match="multiples of 32"):
        BiRefNet("swin_v1_t")(torch.zeros(1, 3, 100, 64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_conformance_and_half_precision(lite):
    model, arrays = lite
    x = torch.from_numpy(arrays["input"])
    with torch.inference_mode():
        cuda = model.cuda()
        out = cuda(x.cuda())[-1].float().cpu()
        assert np.abs(out.numpy() - arrays["out3"]).max() <= 2e-3
        ref = out.sigmoid()
        for dtype in (torch.float16, torch.bfloat16):
            half = cuda.to(dtype)(x.cuda().to(dtype))[-1].float().cpu().sigmoid()
            assert (half - ref).abs().mean() < 0.01, dtype
    model.float().cpu()
