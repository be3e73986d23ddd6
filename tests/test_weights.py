"""Weights loading: every checkpoint format round-trips exactly, every failure is one actionable line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rmbg_stream.cli import make_parser
from rmbg_stream.models import BiRefNet
from rmbg_stream.models.registry import MODELS, PATCH_ORDERS, lookup
from rmbg_stream.models.weights import WeightsError, convert_patch_order, load_birefnet

DERIVED = ("relative_position_index", "num_batches_tracked")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill(model: BiRefNet, seed: int = 0) -> BiRefNet:
    """Seeded values unlike the default init, so a parameter left unloaded changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            last = name.rsplit(".", 1)[-1]
            if last == "num_batches_tracked":
                t.fill_(7)
            elif not t.is_floating_point():
                continue
            elif last == "running_var":
                t.uniform_(0.5, 2.0, generator=g)
            elif t.dim() >= 2:
                t.normal_(0.0, t[0].numel() ** -0.5, generator=g)
            elif last == "weight":
                t.normal_(1.0, 0.1, generator=g)
            else:
                t.normal_(0.0, 0.05, generator=g)
    return model.eval()


def run(model: BiRefNet, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        return model(x)


@pytest.fixture(scope="module")
def workdir():
    # Checkpoints are ~180 MB each; removed at once rather than kept by pytest's tmp_path retention.
    with tempfile.TemporaryDirectory(prefix="rmbg-weights-") as d:
        yield Path(d)


@pytest.fixture
def scratch(workdir, request):
    d = workdir / request.node.name.replace("/", "_")
    d.mkdir()
    yield d
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def original(workdir):
    """(state dict, input, outputs, a .safetensors file) of a filled swin_v1_t BiRefNet."""
    torch.manual_seed(0)
    model = fill(BiRefNet("swin_v1_t"))
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    path = workdir / "original.safetensors"
    save_file(sd, str(path))
    return sd, x, run(model, x), path


def assert_loaded(model, info, x, expected, path, backbone="swin_v1_t", resolution=(1024, 1024)):
    assert not model.training
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in model.parameters())
    assert info.backbone == backbone and info.resolution == resolution
    assert Path(info.path) == Path(path)
    got = run(model, x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


# --- every format loads to the same network ------------------------------------------------------


def save_plain(sd, d):
    torch.save(sd, d / "weights.pth")
    return d / "weights.pth", d / "weights.pth"


def save_module_prefixed(sd, d):
    torch.save({f"module.{k}": v for k, v in sd.items()}, d / "dp.pth")
    return d / "dp.pth", d / "dp.pth"


def save_wrapped(sd, d):
    torch.save({"state_dict": sd, "epoch": 120}, d / "wrapped.pth")
    return d / "wrapped.pth", d / "wrapped.pth"


def save_wrapped_prefixed(sd, d):
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, d / "both.pth")
    return d / "both.pth", d / "both.pth"


def save_compiled_pt(sd, d):
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}}, d / "compiled.pt")
    return d / "compiled.pt", d / "compiled.pt"


def save_bin(sd, d):
    torch.save(sd, d / "pytorch_model.bin")
    return d / "pytorch_model.bin", d / "pytorch_model.bin"


def save_snapshot(sd, d):
    snap = d / "snapshot"
    snap.mkdir()
    save_file(sd, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architectures": ["BiRefNet"], "bb_pretrained": False}))
    return snap, snap / "model.safetensors"


def save_snapshot_single_pth(sd, d):
    snap = d / "release"
    snap.mkdir()
    torch.save(sd, snap / "BiRefNet-general-epoch_244.pth")
    (snap / "README.md").write_text("weights\n")
    return snap, snap / "BiRefNet-general-epoch_244.pth"


def save_without_derived(sd, d):
    kept = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in DERIVED}
    assert len(kept) < len(sd)
    save_file(kept, str(d / "slim.safetensors"))
    return d / "slim.safetensors", d / "slim.safetensors"


@pytest.mark.parametrize(
    "save",
    [
        save_plain,
        save_module_prefixed,
        save_wrapped,
        save_wrapped_prefixed,
        save_compiled_pt,
        save_bin,
        save_snapshot,
        save_snapshot_single_pth,
        save_without_derived,
    ],
)
def test_format_loads_identically(original, scratch, save):
    sd, x, expected, _ = original
    source, file = save(sd, scratch)
    model, info = load_birefnet(str(source))
    assert info.source == str(source) and info.repo_id is None
    assert_loaded(model, info, x, expected, file)


def test_safetensors_file_and_explicit_backbone(original):
    sd, x, expected, path = original
    model, info = load_birefnet(path, backbone="swin_v1_t")
    assert_loaded(model, info, x, expected, path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_as_float32(original, scratch, dtype):
    sd, x, expected, _ = original
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(half, str(scratch / "half.safetensors"))
    # The exact expectation: the original network with its weights rounded to the checkpoint's precision.
    rounded = BiRefNet("swin_v1_t").eval()
    rounded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    model, info = load_birefnet(scratch / "half.safetensors")
    assert_loaded(model, info, x, run(rounded, x), scratch / "half.safetensors")
    # And rounding moved the logits only a little.
    assert (run(model, x)[-1] - expected[-1]).abs().max() < 0.05 * expected[-1].abs().max()


@pytest.fixture(scope="module")
def swin_s_file(workdir):
    path = workdir / "swin_v1_s.safetensors"
    save_file({k: v.contiguous() for k, v in BiRefNet("swin_v1_s").state_dict().items()}, str(path))
    return path


def test_backbone_is_inferred(swin_s_file):
    _, info = load_birefnet(swin_s_file)
    assert info.backbone == "swin_v1_s"


# --- failures --------------------------------------------------------------------------------------


def raises(source, **kw) -> str:
    with pytest.raises(WeightsError) as e:
        load_birefnet(source, **kw)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_truncated_safetensors(original, scratch):
    data = original[3].read_bytes()
    bad = scratch / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    msg = raises(bad)
    assert str(bad) in msg and "truncated" in msg and "safetensors" in msg


def test_text_file_named_pth(scratch):
    bad = scratch / "notes.pth"
    bad.write_text("these are not weights\n")
    msg = raises(bad)
    assert str(bad) in msg and "not a checkpoint" in msg


def test_truncated_pth(original, scratch):
    torch.save(original[0], scratch / "full.pth")
    data = (scratch / "full.pth").read_bytes()
    (scratch / "cut.pth").write_bytes(data[: len(data) // 3])
    msg = raises(scratch / "cut.pth")
    assert "cut.pth" in msg and "truncated" in msg


def test_pickled_module_is_refused(scratch):
    torch.save(torch.nn.Linear(2, 2), scratch / "module.pth")
    msg = raises(scratch / "module.pth")
    assert "module.pth" in msg and "state_dict()" in msg


def test_missing_path(scratch):
    msg = raises(scratch / "nowhere" / "model.safetensors")
    assert "no such checkpoint file or folder" in msg and "nowhere" in msg


def test_folder_without_checkpoint(scratch):
    (scratch / "config.json").write_text("{}")
    msg = raises(scratch)
    assert "holds no checkpoint" in msg and "model.safetensors" in msg


def test_folder_with_several_checkpoints(original, scratch):
    for name in ("a.pth", "b.pth"):
        (scratch / name).write_bytes(b"x")
    msg = raises(scratch)
    assert "several checkpoints" in msg and "a.pth" in msg and "b.pth" in msg


def test_unsupported_suffix(scratch):
    (scratch / "model.onnx").write_bytes(b"onnx")
    msg = raises(scratch / "model.onnx")
    assert "unknown checkpoint format .onnx" in msg


def test_not_a_birefnet_checkpoint(scratch):
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(scratch / "other.safetensors"))
    msg = raises(scratch / "other.safetensors")
    assert "not a BiRefNet checkpoint" in msg and "bb.patch_embed.proj.weight" in msg


def test_missing_key(original, scratch):
    sd = dict(original[0])
    del sd["decoder.conv_out1.0.weight"]
    save_file(sd, str(scratch / "m.safetensors"))
    msg = raises(scratch / "m.safetensors")
    assert "1 missing (decoder.conv_out1.0.weight)" in msg and "unexpected" not in msg


def test_missing_learned_buffer_is_not_excused(original, scratch):
    sd = {k: v for k, v in original[0].items() if not k.endswith("running_mean")}
    save_file(sd, str(scratch / "m.safetensors"))
    msg = raises(scratch / "m.safetensors")
    assert "missing" in msg and "running_mean" in msg


def test_extra_key(original, scratch):
    sd = {**original[0], "decoder.extra.weight": torch.ones(2)}
    save_file(sd, str(scratch / "x.safetensors"))
    msg = raises(scratch / "x.safetensors")
    assert "1 unexpected (decoder.extra.weight)" in msg and "missing" not in msg


def test_unexpected_and_missing_keys_are_counted(original, scratch):
    sd = dict(original[0])
    sd["decoder.extra.weight"] = torch.ones(2)
    for k in [k for k in sd if k.startswith(("decoder.conv_out1.", "decoder.gdt_convs_4."))]:
        del sd[k]
    save_file(sd, str(scratch / "x.safetensors"))
    msg = raises(scratch / "x.safetensors")
    assert "1 unexpected (decoder.extra.weight)" in msg
    # 8, not 9: the dropped num_batches_tracked is a derived buffer and excused.
    assert "8 missing (decoder.conv_out1.0.weight, decoder.conv_out1.0.bias, decoder.gdt_convs_4.0.weight" in msg
    assert ", ...)" in msg


def test_shape_mismatch(original, scratch):
    sd = dict(original[0])
    sd["decoder.conv_out1.0.weight"] = torch.zeros(2, 3, 1, 1)
    save_file(sd, str(scratch / "s.safetensors"))
    msg = raises(scratch / "s.safetensors")
    assert "decoder.conv_out1.0.weight" in msg and "[2, 3, 1, 1]" in msg
    assert str(list(original[0]["decoder.conv_out1.0.weight"].shape)) in msg


def test_backbone_mismatch(swin_s_file):
    msg = raises(swin_s_file, backbone="swin_v1_t")
    assert "holds a swin_v1_s backbone" in msg and "backbone='swin_v1_t'" in msg


def test_unknown_backbone_argument(original):
    msg = raises(original[3], backbone="resnet50")
    assert "unknown backbone 'resnet50'" in msg and "swin_v1_l" in msg


# --- the hub -----------------------------------------------------------------------------------------


def test_registry():
    assert lookup("RMBG-2.0") is lookup("briaai/rmbg-2.0") is MODELS["briaai/RMBG-2.0"]
    rmbg = MODELS["briaai/RMBG-2.0"]
    assert (rmbg.backbone, rmbg.resolution, rmbg.gated) == ("swin_v1_l", (1024, 1024), True)
    assert rmbg.licence == "CC BY-NC 4.0"
    assert lookup("birefnet").repo_id == "ZhengPeng7/BiRefNet"
    assert lookup("BiRefNet-Lite").backbone == "swin_v1_t"
    assert lookup("ZhengPeng7/BiRefNet_lite-2K").resolution == (1440, 2560)
    assert lookup("ZhengPeng7/BiRefNet_HR").resolution == (2048, 2048)
    assert lookup("ZhengPeng7/BiRefNet_512x512").resolution == (512, 512)
    assert lookup("someone/else") is None
    assert all(s.licence == "MIT" and not s.gated for r, s in MODELS.items() if r.startswith("ZhengPeng7/"))


@pytest.fixture
def offline(monkeypatch, scratch):
    """HF_HUB_OFFLINE=1, a private HF_HOME, and the cache folder to hand to load_birefnet."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(scratch / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return scratch / "hf" / "hub"


def cache_put(cache: Path, repo_id: str, file: Path, filename: str = "model.safetensors") -> Path:
    """Place `file` where huggingface_hub's cache layout expects `repo_id`'s `filename` at main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap / filename


@pytest.mark.parametrize("source", ["briaai/RMBG-2.0", "rmbg-2.0"])
def test_offline_without_cache_says_how_to_fix(offline, source):
    msg = raises(source, cache_dir=offline)
    assert "could not reach the Hugging Face hub for briaai/RMBG-2.0" in msg and "HF_HUB_OFFLINE" in msg
    assert "local checkpoint" in msg and "huggingface-cli download briaai/RMBG-2.0" in msg
    assert "accept the licence at https://huggingface.co/briaai/RMBG-2.0" in msg and "HF_TOKEN" in msg


def test_offline_unknown_repo(offline):
    msg = raises("someone/not-cached", cache_dir=offline)
    assert "someone/not-cached" in msg and "hf download someone/not-cached" in msg and "licence" not in msg


@pytest.mark.parametrize(
    "source, repo_id, resolution",
    [
        ("birefnet-lite", "ZhengPeng7/BiRefNet_lite", (1024, 1024)),
        ("ZhengPeng7/BiRefNet_lite-2K", "ZhengPeng7/BiRefNet_lite-2K", (1440, 2560)),
        ("someone/my-birefnet", "someone/my-birefnet", (1024, 1024)),
    ],
)
def test_offline_cache_hit(original, offline, source, repo_id, resolution):
    sd, x, expected, path = original
    file = cache_put(offline, repo_id, path)
    model, info = load_birefnet(source, cache_dir=offline)
    assert info.repo_id == repo_id and info.source == source
    assert info.spec is lookup(repo_id)
    assert_loaded(model, info, x, expected, file, resolution=resolution)


def test_offline_cache_falls_back_to_pytorch_model_bin(original, offline, scratch):
    sd, x, expected, _ = original
    torch.save(sd, scratch / "weights.bin")
    file = cache_put(offline, "ZhengPeng7/BiRefNet_lite", scratch / "weights.bin", "pytorch_model.bin")
    model, info = load_birefnet("ZhengPeng7/BiRefNet_lite", cache_dir=offline)
    assert_loaded(model, info, x, expected, file)


def test_snapshot_folder_inside_cache_keeps_its_table_entry(original, offline):
    sd, x, expected, path = original
    file = cache_put(offline, "ZhengPeng7/BiRefNet_lite-2K", path)
    model, info = load_birefnet(file.parent)
    assert info.repo_id == "ZhengPeng7/BiRefNet_lite-2K" and info.resolution == (1440, 2560)


def test_known_repo_with_wrong_backbone(original, offline):
    cache_put(offline, "briaai/RMBG-2.0", original[3])
    msg = raises("briaai/RMBG-2.0", cache_dir=offline)
    assert "swin_v1_t" in msg and "briaai/RMBG-2.0 is a swin_v1_l model" in msg


class FakeHub(BaseHTTPRequestHandler):
    """Answers the way huggingface.co does for gated, missing, private and empty repositories.

    No 5xx case: huggingface_hub retries those with back-off for ~20 s before giving up.
    """

    ANSWERS = {
        "owner/gated": (401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted."}),
        "owner/missing": (404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
        "owner/forbidden": (403, {}),
        "owner/empty": (404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}),
        "owner/private": (401, {}),
    }

    def do_HEAD(self):
        repo = "/".join(self.path.lstrip("/").split("/")[:2])
        status, headers = self.ANSWERS.get(repo, (500, {}))
        self.send_response(status)
        for k, v in {**headers, "Content-Length": "0"}.items():
            self.send_header(k, v)
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_hub(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A hub on loopback answering with `handler`; yields its endpoint URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """This process's environment for a child whose huggingface_hub talks to `endpoint` only, with a private
    HF_HOME under `home`: no HF_* settings or proxies of ours leak in."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home / "hf"), NO_PROXY="*")
    return env


def test_hub_errors_are_mapped(scratch):
    # A fresh interpreter, because huggingface_hub reads HF_ENDPOINT only when it is imported.
    script = (
        "import json, sys\n"
        "from rmbg_stream.models.weights import WeightsError, load_birefnet\n"
        "out = {}\n"
        "for repo in sys.argv[1:]:\n"
        "    try:\n"
        "        load_birefnet(repo)\n"
        "    except WeightsError as e:\n"
        "        out[repo] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    with local_hub(FakeHub) as endpoint:
        done = subprocess.run([sys.executable, "-c", script, *FakeHub.ANSWERS], env=hub_env(endpoint, scratch),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    msg = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(msg) == set(FakeHub.ANSWERS)
    for repo in ("owner/gated", "owner/forbidden", "owner/private"):
        assert f"accept the licence at https://huggingface.co/{repo}" in msg[repo] and "HF_TOKEN" in msg[repo]
    assert "owner/missing is neither a local file or folder nor a model on the Hugging Face hub" in msg["owner/missing"]
    assert "holds neither model.safetensors nor pytorch_model.bin" in msg["owner/empty"]


# --- patch order ---------------------------------------------------------------------------------------

# The order of each checkpoint, from BiRefNet's public history (issue 11): trained before or after 2024-11-05.
ORDERS = {
    "briaai/RMBG-2.0": "legacy",
    "ZhengPeng7/BiRefNet": "legacy",
    "ZhengPeng7/BiRefNet_lite": "legacy",
    "ZhengPeng7/BiRefNet_lite-2K": "legacy",
    "ZhengPeng7/BiRefNet-matting": "legacy",
    "ZhengPeng7/BiRefNet-portrait": "legacy",
    "ZhengPeng7/BiRefNet_HR": "current",
    "ZhengPeng7/BiRefNet_HR-matting": "current",
    "ZhengPeng7/BiRefNet_dynamic": "current",
    "ZhengPeng7/BiRefNet_512x512": "current",
}

# Excerpts in the shape of the two generations of BiRefNet's birefnet.py. The first line would leave a file
# behind if anything ran it: the loader must only read it.
RUN_TRAP = "open(__file__ + '.ran', 'w').close()\n"
LEGACY_CODE = RUN_TRAP + """
def image2patches(image, grid_h=2, grid_w=2, patch_ref=None, transformation='b c (hg h) (wg w) -> (b hg wg) c h w'):
    return rearrange(image, transformation, hg=grid_h, wg=grid_w)

class Decoder(nn.Module):
    def get_patches_batch(self, x, p):
        _size_h, _size_w = p.shape[2:]
        ...

    def forward(self, features):
        x, x1, x2, x3, x4 = features
        patches_batch = self.get_patches_batch(x, x4) if self.split else x
"""
CURRENT_CODE = RUN_TRAP + """
def image2patches(image, grid_h=2, grid_w=2, patch_ref=None, transformation='b c (hg h) (wg w) -> (b hg wg) c h w'):
    return rearrange(image, transformation, hg=grid_h, wg=grid_w)

class Decoder(nn.Module):
    def forward(self, features):
        x, x1, x2, x3, x4 = features
        patches_batch = image2patches(
            x, patch_ref=x4, transformation='b c (hg h) (wg w) -> b (c hg wg) h w'
        ) if self.split else x
"""
# A legacy file that only mentions the current pattern in a comment.
LEGACY_WITH_COMMENT = "# newer code: image2patches(x, transformation='... -> b (c hg wg) h w')\n" + LEGACY_CODE


def test_every_registry_entry_has_its_patch_order():
    assert {repo: spec.patch_order for repo, spec in MODELS.items()} == ORDERS
    assert set(PATCH_ORDERS) == {"legacy", "current"}


@pytest.fixture(scope="module")
def current_file(original, workdir):
    """The original network's checkpoint as BiRefNet's current code would hold it."""
    path = workdir / "current.safetensors"
    save_file(convert_patch_order(original[0], "legacy", "current"), str(path))
    return path


def make_snapshot(folder: Path, weights: Path, code: dict[str, str]) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(weights)
    (folder / "config.json").write_text(json.dumps({"architectures": ["BiRefNet"]}))
    for name, text in code.items():
        (folder / name).write_text(text)
    return folder


# id: (folder name, weights in order, bundled code, asked order, order taken, decided by, warning or None)
SNAPSHOTS = {
    "legacy code": ("snap", "legacy", {"birefnet.py": LEGACY_CODE}, None, "legacy", "code birefnet.py", None),
    "current code": ("snap", "current", {"birefnet.py": CURRENT_CODE}, None, "current", "code birefnet.py", None),
    "no code": ("snap", "legacy", {}, None, "legacy", "default", "assuming legacy"),
    "no code, registry name": (
        "BiRefNet_dynamic", "current", {}, None, "current", "registry ZhengPeng7/BiRefNet_dynamic", None,
    ),
    "code disagrees with the registry": (
        "BiRefNet_lite", "current", {"birefnet.py": CURRENT_CODE}, None, "current", "code birefnet.py",
        "registry lists ZhengPeng7/BiRefNet_lite as legacy: following the code",
    ),
    "code in another file": (
        "snap", "current", {"BiRefNet_config.py": "class Config: pass\n", "modeling.py": CURRENT_CODE},
        None, "current", "code modeling.py", None,
    ),
    "a comment is not code": (
        "snap", "legacy", {"birefnet.py": LEGACY_WITH_COMMENT}, None, "legacy", "code birefnet.py", None,
    ),
    "asked over code": (
        "snap", "legacy", {"birefnet.py": CURRENT_CODE}, "legacy", "legacy", "argument", "as asked, though",
    ),
}


@pytest.mark.parametrize("case", list(SNAPSHOTS))
def test_snapshot_patch_order_comes_from_its_bundled_code(original, current_file, scratch, caplog, case):
    folder, weights, code, asked, order, decided_by, warning = SNAPSHOTS[case]
    sd, x, expected, legacy_file = original
    snap = make_snapshot(scratch / folder, current_file if weights == "current" else legacy_file, code)
    with caplog.at_level(logging.INFO, logger="rmbg_stream.models.weights"):
        model, info = load_birefnet(snap, patch_order=asked)
    assert (info.patch_order, info.order_from) == (order, decided_by)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warning is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warning in warned[0] and "\n" not in warned[0]
    assert not list(snap.glob("*.ran")), "the bundled code was run"
    # The network is the original exactly when the order taken is the one the weights are in.
    same = [torch.equal(a, b) for a, b in zip(run(model, x), expected, strict=True)]
    assert all(same) if order == weights else not any(same)


def test_legacy_checkpoint_converted_to_current_and_back_gives_identical_outputs(original, scratch):
    sd, x, expected, _ = original
    there = convert_patch_order(sd, "legacy", "current")
    assert not torch.equal(there["decoder.ipt_blk5.conv1.weight"], sd["decoder.ipt_blk5.conv1.weight"])
    save_file(there, str(scratch / "current.safetensors"))
    model, info = load_birefnet(scratch / "current.safetensors", patch_order="current")
    assert info.order_from == "argument"
    for a, b in zip(run(model, x), expected, strict=True):
        assert torch.equal(a, b)
    back = convert_patch_order(model.state_dict(), "legacy", "current")
    assert torch.equal(back["decoder.ipt_blk5.conv1.weight"], there["decoder.ipt_blk5.conv1.weight"])


def test_code_files_that_disagree_need_patch_order(original, scratch):
    code = {"a.py": LEGACY_CODE, "b.py": CURRENT_CODE}
    snap = make_snapshot(scratch / "snap", original[3], code)
    msg = raises(snap)
    assert "disagrees on the patch order" in msg and "a.py uses legacy" in msg and "b.py uses current" in msg
    assert "--patch-order" in msg
    _, info = load_birefnet(snap, patch_order="legacy")
    assert info.patch_order == "legacy"


def test_unknown_patch_order_argument(original):
    assert "unknown patch order 'new'" in raises(original[3], patch_order="new")


def test_hub_id_in_the_cache_takes_the_order_of_its_bundled_code(original, current_file, offline, caplog):
    _, x, expected, _ = original
    file = cache_put(offline, "ZhengPeng7/BiRefNet_lite", current_file)
    (file.parent / "birefnet.py").write_text(CURRENT_CODE)
    with caplog.at_level(logging.WARNING, logger="rmbg_stream.models.weights"):
        model, info = load_birefnet("birefnet-lite", cache_dir=offline)
    assert info.repo_id == "ZhengPeng7/BiRefNet_lite" and info.patch_order == "current"
    assert any("following the code" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(run(model, x), expected, strict=True))


def test_hub_id_in_the_cache_without_code_takes_the_registry_order(original, offline):
    cache_put(offline, "ZhengPeng7/BiRefNet_lite", original[3])
    _, info = load_birefnet("ZhengPeng7/BiRefNet_lite", cache_dir=offline)
    assert (info.patch_order, info.order_from) == ("legacy", "registry ZhengPeng7/BiRefNet_lite")


@pytest.mark.parametrize("command", ["image a.png -o b.png", "transcode a.mp4 -o b.mp4", "serve", "camera"])
def test_every_model_command_takes_patch_order(command, capsys):
    parser = make_parser()
    assert parser.parse_args(command.split()).patch_order is None
    assert parser.parse_args([*command.split(), "--patch-order", "current"]).patch_order == "current"
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*command.split(), "--patch-order", "new"])
    assert e.value.code == 2 and "invalid choice: 'new'" in capsys.readouterr().err


class ServingHub(BaseHTTPRequestHandler):
    """Serves one repository the way huggingface.co does: the file listing of a revision, and its files."""

    files: dict[str, bytes] = {}

    def do_GET(self, body: bool = True):
        parts = self.path.split("?")[0].lstrip("/").split("/")
        name = "/".join(parts[4:])
        status, data, headers = 404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
        if parts[:1] == ["api"] and "tree" in parts:  # snapshot_download lists a revision's files
            tree = [{"type": "file", "path": f, "size": len(b), "oid": f"{i:040x}"} for i, (f, b) in self.listing()]
            status, data, headers = 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}
        elif len(parts) >= 5 and parts[2] == "resolve" and name in self.files:
            data = self.files[name]
            status, headers = 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{zlib.crc32(data):08x}"'}
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def listing(self):
        return enumerate(self.files.items())

    def do_HEAD(self):
        self.do_GET(body=False)

    def log_message(self, *args):
        pass


def test_hub_download_fetches_the_bundled_code_and_takes_its_order(original, current_file, scratch):
    _, x, expected, _ = original
    ServingHub.files = {
        "model.safetensors": current_file.read_bytes(),
        "birefnet.py": CURRENT_CODE.encode(),
        "config.json": b"{}",
        "README.md": b"# weights\n",
    }
    script = (
        "import json, torch\n"
        "from rmbg_stream.models.weights import load_birefnet\n"
        "model, info = load_birefnet('owner/hub-model')\n"
        f"x = torch.load({str(scratch / 'x.pt')!r})\n"
        "with torch.inference_mode():\n"
        f"    torch.save(model(x), {str(scratch / 'out.pt')!r})\n"
        "print(json.dumps([info.patch_order, info.order_from, sorted(p.name for p in info.path.parent.iterdir())]))\n"
    )
    torch.save(x, scratch / "x.pt")
    with local_hub(ServingHub) as endpoint:
        done = subprocess.run([sys.executable, "-c", script], env=hub_env(endpoint, scratch), capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    order, decided_by, files = json.loads(done.stdout.strip().splitlines()[-1])
    # Only the weights and the code come down: no README or config is needed.
    assert (order, decided_by, files) == ("current", "code birefnet.py", ["birefnet.py", "model.safetensors"])
    got = torch.load(scratch / "out.pt")
    # Another process may sum with another thread count (earlier tests tune it): float noise, not a wrong order,
    # which moves the logits by whole units.
    assert all(torch.allclose(a, b, rtol=0, atol=1e-4) for a, b in zip(got, expected, strict=True))


class _RunsAShellCommand:
    """Unpickling this calls os.system: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Prints:
    # eval, not print: once Ray has run in this process (tests/test_cluster.py), builtins.print is Ray's wrapper.
    def __reduce__(self):
        return eval, ("print('PAYLOAD RAN')",)


def _malicious(kind: str, path: Path, marker: Path) -> str:
    """Writes a checkpoint whose pickle would run code; returns the callable the message must name."""
    import pickle

    if kind == "torch.save":  # the zip format: torch names the refused global itself
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _RunsAShellCommand(marker)}, path)
        return f"{os.system.__module__}.system"
    if kind == "pickle protocol 2":  # a bare legacy pickle
        path.write_bytes(pickle.dumps({"w": _RunsAShellCommand(marker)}, protocol=2))
        return f"{os.system.__module__}.system"
    path.write_bytes(pickle.dumps({"w": _Prints()}, protocol=pickle.DEFAULT_PROTOCOL))  # framed: torch stops early
    return "builtins.eval"


@pytest.mark.parametrize("kind", ["torch.save", "pickle protocol 2", "default pickle"])
def test_malicious_pickle_is_refused_as_code_and_nothing_runs(tmp_path, kind):
    from PIL import Image

    marker = tmp_path / "ran"
    name = _malicious(kind, tmp_path / "evil.pth", marker)
    Image.new("RGB", (33, 21), (0, 177, 64)).save(tmp_path / "in.png")
    proc = subprocess.run([sys.executable, "-m", "rmbg_stream", "image", str(tmp_path / "in.png"), "-o",
                           str(tmp_path / "out.png"), "--model", str(tmp_path / "evil.pth"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'evil.pth'} holds pickled code that we refuse to run ({name}); a checkpoint must hold "
        "only tensors: if you made it, re-save it with torch.save(model.state_dict(), ...) or convert it to "
        "safetensors"
    ]
    assert not marker.exists() and "PAYLOAD RAN" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out.png").exists()
