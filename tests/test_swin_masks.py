"""The Swin attention masks (relative-position bias + shift mask) are built once per padded size and dtype, and a
cached mask never outlives the weights or the dtype it was built from."""

from __future__ import annotations

import pytest
import torch

from rmbg_stream.models import BiRefNet
from rmbg_stream.models.swin import SwinStage

SIZE = (2, 3, 96, 160)  # non-square; 24x40 tokens pad to 28x42 in the first stage


def network(seed: int) -> BiRefNet:
    """Swin-T with random weights, including bias tables that are not zero (they start at zero)."""
    torch.manual_seed(seed)
    model = BiRefNet("swin_v1_t").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    return model


def logits(model: BiRefNet, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x.to(next(model.parameters()).dtype))[-1].float()


def count_builds(model: BiRefNet) -> list[int]:
    """Wraps each stage's `build_masks` with a counter; returns the one-element list it counts in."""
    calls = [0]
    for stage in model.bb.layers:
        def counted(*args, _build=stage.build_masks):
            calls[0] += 1
            return _build(*args)
        stage.build_masks = counted
    return calls


@pytest.fixture(autouse=True)
def cache_on_the_cpu(request, monkeypatch):
    """The cache is for CUDA (SwinStage.CACHE_DEVICES); its logic is the same on the CPU, where these tests run."""
    if "cpu_default" not in request.node.name:
        monkeypatch.setattr(SwinStage, "CACHE_DEVICES", ("cuda", "cpu"))


def test_cpu_default_rebuilds_the_masks_rather_than_holding_gigabytes_of_ram(x):
    model = network(0)
    calls = count_builds(model)
    logits(model, x)
    built = calls[0]
    logits(model, x)
    assert built > 0 and calls[0] == 2 * built
    assert all(not stage._masks for stage in model.bb.layers)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(SIZE, generator=torch.Generator().manual_seed(1))


def test_masks_are_built_once_per_size_and_cached_ones_give_bit_identical_outputs(x):
    model = network(0)
    calls = count_builds(model)
    first = logits(model, x)
    built = calls[0]
    assert 4 <= built <= 8  # per stage, at the input size and at half (BiRefNet's two backbone passes)
    second = logits(model, x)
    assert calls[0] == built
    assert torch.equal(first, second)
    with torch.enable_grad():  # autograd recording: the cache is bypassed, every mask rebuilt
        model(x)
    assert calls[0] == built + 8
    logits(model, x[:, :, :64, :96])  # another resolution: built, then both cached
    calls[0] = 0
    logits(model, x)
    logits(model, x[:, :, :64, :96])
    assert calls[0] == 0


@pytest.mark.parametrize("assign", [False, True])
def test_loading_other_weights_after_a_run_never_serves_a_stale_mask(x, assign):
    model, other = network(0), network(1)
    before = logits(model, x)
    model.load_state_dict(other.state_dict(), assign=assign)
    after = logits(model, x)
    assert not torch.equal(before, after)
    assert torch.equal(after, logits(network(1), x))


def test_editing_a_bias_table_in_place_after_a_run_rebuilds_its_mask(x):
    model = network(0)
    logits(model, x)
    with torch.no_grad():
        model.bb.layers[2].blocks[3].attn.relative_position_bias_table.mul_(3)
    fresh = network(0)
    with torch.no_grad():
        fresh.bb.layers[2].blocks[3].attn.relative_position_bias_table.mul_(3)
    assert torch.equal(logits(model, x), logits(fresh, x))


def test_changing_the_dtype_after_a_run_rebuilds_the_masks_in_the_new_dtype(x):
    model = network(0)
    fp32 = logits(model, x)
    model.to(torch.bfloat16)
    assert torch.equal(logits(model, x), logits(network(0).to(torch.bfloat16), x))
    model.float()  # the weights come back rounded: compare with a fresh model that went the same way
    assert torch.equal(logits(model, x), logits(network(0).to(torch.bfloat16).float(), x))
    assert not torch.equal(logits(model, x), fp32)
