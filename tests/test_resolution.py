"""Network input sizes: --resolution WxH, aspect-preserving sizes for dynamic models, non-square inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmbg_stream.cli import main
from rmbg_stream.engine.backends import NetworkBackend, create_backend
from rmbg_stream.engine.engine import Engine, StreamOptions
from rmbg_stream.engine.preprocess import check_size, fit_aspect
from rmbg_stream.engine.setup import parse_resolution
from rmbg_stream.models import BiRefNet
from rmbg_stream.models.registry import MODELS

CPU = torch.device("cpu")


class RedChannelBackend:
    """The mask is the red channel of what the network sees: the output depends on where things are, and the
    shapes the network was given are recorded."""

    def __init__(self, resolution: tuple[int, int]):
        self.name, self.device, self.dtype = "red", CPU, torch.float32
        self.resolution = resolution
        self.guided = False  # plain bilinear upsampling: the mask is compared with the picture itself
        self.seen: list[tuple[int, ...]] = []

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return self.resolution

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return x[:, :1].clone()


def red_box_frame(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Black (h, w, 3) uint8 frame with a red box at rows y0:y1, columns x0:x1."""
    frame = np.zeros((h, w, 3), np.uint8)
    y0, y1, x0, x1 = box
    frame[y0:y1, x0:x1, 0] = 255
    return frame


def test_resolution_option_takes_n_or_w_x_h_as_height_and_width():
    assert parse_resolution("1024x576") == (576, 1024)
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution(768) == (768, 768)
    assert parse_resolution(" 320X192 ") == (192, 320)
    assert parse_resolution(None) is None


@pytest.mark.parametrize("text, message", [("1000x576", "multiples of 32"), ("1024x0", "multiples of 32"),
                                           ("wide", "N or WxH"), ("1024x576x3", "N or WxH")])
def test_bad_resolution_is_one_line_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_resolution(text)


def test_bad_resolution_on_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    frame = red_box_frame(36, 64, (4, 20, 8, 40))
    from PIL import Image

    Image.fromarray(frame).save(tmp_path / "in.png")
    code = main(["image", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--model", "random:swin_v1_t",
                 "--resolution", "500x288", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "500x288" in err[0] and "multiples of 32" in err[0]
    assert not (tmp_path / "out.png").exists()


def test_backend_refuses_sizes_that_are_not_multiples_of_32():
    with pytest.raises(ValueError, match=r"got 1000x576 \(WxH\); try 992x576"):
        check_size((576, 1000))
    with pytest.raises(ValueError, match="multiples of 32"):
        create_backend("random:swin_v1_t", CPU, resolution=(288, 500))


@pytest.mark.parametrize("h, w, side, expected", [
    (1080, 1920, 1024, (576, 1024)),   # 16:9 landscape
    (1920, 1080, 1024, (1024, 576)),   # portrait
    (720, 1280, 512, (288, 512)),
    (480, 640, 1024, (768, 1024)),     # 4:3
    (100, 3000, 1024, (32, 1024)),     # never below 32
    (1000, 1000, 1024, (1024, 1024)),
])
def test_aspect_preserving_size_keeps_the_long_side_and_rounds_to_32(h, w, side, expected):
    assert fit_aspect(h, w, side) == expected


def test_only_the_dynamic_checkpoint_keeps_the_frame_aspect():
    assert [m.repo_id for m in MODELS.values() if m.dynamic] == ["ZhengPeng7/BiRefNet_dynamic"]


def test_engine_with_512x288_places_a_16_9_frame_mask_correctly():
    """--resolution 512x288: the network sees the 640x360 frame unsquashed, and the mask comes back where the
    picture's red box is."""
    h, w, box = 360, 640, (90, 270, 160, 480)
    backend = RedChannelBackend(parse_resolution("512x288"))
    frame = red_box_frame(h, w, box)
    options = StreamOptions(smoothing=0.0, alpha=True, image=False)
    with Engine(backend, max_batch=1) as engine:
        s = engine.open_stream(live=False, options=options)
        s.submit(frame)
        alpha = s.get(timeout=30).alpha
    assert backend.seen == [(1, 3, 288, 512)]
    assert alpha.shape == (h, w)
    y0, y1, x0, x1 = box
    inside = np.zeros((h, w), bool)
    inside[y0 + 3:y1 - 3, x0 + 3:x1 - 3] = True
    outside = np.ones((h, w), bool)
    outside[y0 - 3:y1 + 3, x0 - 3:x1 + 3] = False
    assert (alpha[inside] == 255).all() and (alpha[outside] == 0).all()


def test_dynamic_backend_feeds_each_frame_at_its_own_aspect():
    """A dynamic model (aspect=True) at long side 128: a 16:9 frame goes in at 128x64 (WxH), a portrait one at
    64x128, in the same engine; the masks are finite, non-trivial and at frame size."""
    torch.manual_seed(0)
    backend = NetworkBackend(BiRefNet("swin_v1_t"), (128, 128), CPU, torch.float32, aspect=True)
    seen = []
    backend.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    rng = np.random.default_rng(0)
    options = StreamOptions(smoothing=0.0, alpha=True, image=False)
    with Engine(backend, max_batch=1) as engine:
        alphas = []
        for h, w in ((180, 320), (200, 110)):
            s = engine.open_stream(live=False, options=options)
            s.submit(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            alphas.append(s.get(timeout=120).alpha)
            s.close()
    assert seen == [(1, 3, 64, 128), (1, 3, 128, 64)]
    assert [a.shape for a in alphas] == [(180, 320), (200, 110)]
    assert all(a.std() > 0 for a in alphas)


def test_fixed_model_with_w_x_h_resolution_feeds_that_size():
    backend = create_backend("random:swin_v1_t", CPU, resolution=parse_resolution("512x288"))
    assert backend.input_size(1080, 1920) == (288, 512) and backend.input_size(480, 640) == (288, 512)


def test_swin_l_window_padding_on_a_non_square_input():
    """Swin-L's 12 x 12 windows pad every stage of a 96x160 input (24x40 ... 3x5); the result is finite and the
    same for an image alone as in a batch."""
    torch.manual_seed(0)
    model = BiRefNet("swin_v1_l").eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.inference_mode():
        both = model(x)[-1]
        alone = model(x[1:])[-1]
    assert both.shape == (2, 1, 96, 160) and torch.isfinite(both).all()
    torch.testing.assert_close(both[1:], alone, atol=2e-3, rtol=0)


def legacy_patches(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The reference's get_patches_batch (code bundled with RMBG-2.0): split into columns w wide, each into
    tiles h high, and stack the tiles on channels, column by column."""
    out = []
    for img in x:
        tiles = [t for col in torch.split(img, w, dim=-1) for t in torch.split(col, h, dim=-2)]
        out.append(torch.cat(tiles, 0))
    return torch.stack(out)


@pytest.mark.parametrize("H, W", [(576, 1024), (1024, 576), (96, 160)])
def test_decoder_tiles_of_a_non_square_input_equal_the_reference_split(H, W):
    """At every decoder level the tiles are (H/g) x (W/g), not square for a 16:9 input; the split must still be
    exact and in the reference's order."""
    from rmbg_stream.models.birefnet import image_patches

    x = torch.randn(2, 3, H, W)
    for g in (32, 16, 8, 4):
        h, w = H // g, W // g
        torch.testing.assert_close(image_patches(x, h, w), legacy_patches(x, h, w), atol=0, rtol=0)
