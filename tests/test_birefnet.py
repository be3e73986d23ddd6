"""The network contract: reference key layout, conformance vectors in both patch orders, batches, non-square inputs.

The compact vectors of tests/data run everywhere; the full encoder features need ../shared/conformance.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rmbg_stream.models import BACKBONES, BiRefNet
from rmbg_stream.models.birefnet import image_patches
from rmbg_stream.models.weights import convert_patch_order, patch_permutation
from tests.conformance import (
    BACKBONE,
    CONFORMANCE,
    ENC_SUB,
    ENCS,
    VECTORS,
    compact,
    full_vectors,
    read_keys,
    synthetic_state_dict,
)

NO_FULL = f"{CONFORMANCE} is absent (set RMBG_CONFORMANCE): this test needs the full vector files"


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


def assert_conforms(name: str, got: dict[str, torch.Tensor], ref: dict[str, np.ndarray]) -> None:
    """The README's tolerance: max |diff| <= 2e-3 and mean |diff| <= 2e-4 on every array."""
    for key, tensor in got.items():
        assert tensor.shape == ref[key].shape, key
        diff = np.abs(tensor.numpy() - ref[key])
        assert diff.max() <= 2e-3 and diff.mean() <= 2e-4, f"{name} {key}: max {diff.max():.2e} mean {diff.mean():.2e}"


@pytest.fixture(scope="module")
def computed():
    """name -> (our outputs and encoder features on that vector's input, its compact arrays); each run once."""
    cache = {}

    def get(name: str) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        if name not in cache:
            sd, arrays = synthetic_state_dict(name)
            model = BiRefNet(BACKBONE[name]).eval()
            own = model.state_dict()
            for key, value in sd.items():
                if not value.is_floating_point() and "relative_position_index" in key:
                    assert torch.equal(own[key], value), f"derived buffer {key} differs from the reference"
            # Our model runs the legacy order: a current-order checkpoint is permuted at load, as the loader does.
            model.load_state_dict(convert_patch_order(sd, VECTORS[name].patch_order, "legacy"), strict=True)
            x = torch.from_numpy(arrays["input"])
            with torch.inference_mode():
                got = {k: t for k, t in zip(ENCS, model.encode(x), strict=True)}
                got.update({f"out{i}": t for i, t in enumerate(model(x))})
            cache[name] = got, arrays
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VECTORS))
def test_conformance_vectors(computed, name):
    got, arrays = computed(name)
    outs = {k: v for k, v in got.items() if k.startswith("out")}
    subs = {f"{k}_sub": got[k][ENC_SUB] for k in ENCS}
    assert len(outs) == 4 and len(subs) == 4
    assert_conforms(name, {**outs, **subs}, arrays)


@pytest.mark.skipif(full_vectors() is None, reason=NO_FULL)
@pytest.mark.parametrize("name", list(VECTORS))
def test_full_encoder_features_conform(computed, name):
    got, _ = computed(name)
    with np.load(full_vectors() / f"{name}.npz") as z:
        full = {k: z[k] for k in ENCS}
    assert_conforms(name, {k: got[k] for k in ENCS}, full)


@pytest.mark.skipif(full_vectors() is None, reason=NO_FULL)
@pytest.mark.parametrize("name", list(VECTORS))
def test_compact_copy_in_tests_data_equals_the_full_vectors(name):
    with np.load(full_vectors() / f"{name}.npz") as z:
        want = compact(dict(z))
    _, have = synthetic_state_dict(name)
    assert sorted(have) == sorted(want)
    for key in want:
        assert have[key].dtype == want[key].dtype and np.array_equal(have[key], want[key]), key


def test_legacy_and_current_orders_differ_on_the_current_vector():
    """Loading the current-order weights without the permutation misses the vector: the order matters."""
    sd, arrays = synthetic_state_dict("current_t_256")
    model = BiRefNet("swin_v1_t").eval()
    model.load_state_dict(sd, strict=True)
    with torch.inference_mode():
        out = model(torch.from_numpy(arrays["input"]))[-1].numpy()
    assert np.abs(out - arrays["out3"]).max() > 0.05


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_patch_permutation_maps_legacy_patches_to_the_current_split(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    for g in (2, 4, 8):
        h, w = size[0] // g, size[1] // g
        legacy = image_patches(x, h, w)
        # einops "b c (hg h) (wg w) -> b (c hg wg) h w", BiRefNet's current split.
        current = x.view(2, 3, g, h, g, w).permute(0, 1, 2, 4, 3, 5).reshape(2, 3 * g * g, h, w)
        assert torch.equal(legacy[:, patch_permutation(g)], current)


def test_converting_the_patch_order_there_and_back_is_the_identity():
    sd, _ = synthetic_state_dict("lite_256")
    there = convert_patch_order(sd, "legacy", "current")
    key = "decoder.ipt_blk3.conv1.weight"
    assert not torch.equal(there[key], sd[key])
    assert torch.equal(there["decoder.ipt_blk1.conv1.weight"], sd["decoder.ipt_blk1.conv1.weight"])
    back = convert_patch_order(there, "current", "legacy")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


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
        # Copies: the shared fixture stays fp32 on the CPU, and fp16 -> bf16 in place would round twice.
        out = copy.deepcopy(model).cuda()(x.cuda())[-1].float().cpu()
        assert np.abs(out.numpy() - arrays["out3"]).max() <= 2e-3
        ref = out.sigmoid()
        for dtype in (torch.float16, torch.bfloat16):
            half = copy.deepcopy(model).cuda().to(dtype)(x.cuda().to(dtype))[-1].float().cpu().sigmoid()
            assert (half - ref).abs().mean() < 0.01, dtype
