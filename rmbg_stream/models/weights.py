"""Load BiRefNet / RMBG-2.0 weights from the hub, a snapshot folder or a single checkpoint file.

Every failure is a WeightsError whose message is one line: what is wrong and what to do. A model
is returned only when every parameter came from the checkpoint; nothing is left at its random init.

Patch order (see registry.py): our network runs the legacy order only. A checkpoint trained with the
current order has the input channels of `decoder.ipt_blk{2..5}.conv1.weight` permuted once, here, at
load time, rather than the model keeping both split functions: one code path to test and to export,
no cost per frame, and the permutation is exact (an index shuffle), so both orders give the numbers
of their own reference. The order comes from, first to last: the caller (`--patch-order`); the code
bundled beside the checkpoint, read as text and never run; the registry entry of its repo or name;
else legacy, with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .birefnet import BACKBONES, BiRefNet
from .registry import ALIASES, PATCH_ORDERS, ModelSpec, PatchOrder, lookup, lookup_name
from .swin import SWIN_CONFIGS

log = logging.getLogger(__name__)

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
DEFAULT_RESOLUTION = (1024, 1024)
# Buffers the network computes itself; some exporters drop them and they carry nothing learned.
DERIVED = ("relative_position_index", "num_batches_tracked")
# Training scripts save {"state_dict": ...} or {"model": ...}; DataParallel and torch.compile prefix keys.
WRAPPERS = ("state_dict", "model", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")
PATCH_KEY = "bb.patch_embed.proj.weight"
STAGE3_BLOCK = re.compile(r"^bb\.layers\.2\.blocks\.(\d+)\.")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Seconds for the hub's first answer (a HEAD on huggingface.co takes well under one), so that a hub out of reach
# fails fast. huggingface_hub 2.4 adds up to 3 s of its own before it (an agent list it fetches once a day).
PROBE_TIMEOUT = 3.0
RETRIED_STATUSES = (429, 500, 502, 503, 504)  # what hf_hub_download would retry for ~25 s: the hub is unavailable
LOGIN = "set HF_TOKEN (or log in with `hf auth login`, `huggingface-cli login` on older huggingface_hub)"
# The decoder's image-patch convolutions whose input channels depend on the patch order (ipt_blk1 sees a 1x1 grid).
PATCH_KEYS = tuple(f"decoder.ipt_blk{i}.conv1.weight" for i in (2, 3, 4, 5))
# What BiRefNet's code looks like in each order. A current file may keep a dead get_patches_batch, a legacy
# one never splits with (c hg wg), so the current signature is looked for first.
CODE_SIGNS: tuple[tuple[PatchOrder, re.Pattern[str]], ...] = (
    ("current", re.compile(r"image2patches\(.*?->\s*b\s*\(\s*c\s+hg\s+wg\s*\)", re.S)),
    ("legacy", re.compile(r"\bget_patches_batch\b")),
)
CODE_FILE = "birefnet.py"  # what every BiRefNet hub repository bundles; other *.py are read when it says nothing


class WeightsError(RuntimeError):
    """A checkpoint could not be found, read or matched to the network."""

    def __init__(self, message: str):
        # Collapsed to one line so a CLI or a log shows it whole, whatever a library put in it.
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class ModelInfo:
    source: str  # what the caller asked for
    backbone: str
    resolution: tuple[int, int]  # (h, w) the model was trained at
    path: Path  # the file the weights came from
    repo_id: str | None = None
    spec: ModelSpec | None = None
    patch_order: PatchOrder = "legacy"  # the order the checkpoint was trained with (the model runs legacy)
    order_from: str = "default"  # what decided it: "argument", "code <file>", "registry <repo>" or "default"


def load_birefnet(
    source: str | os.PathLike,
    *,
    backbone: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    patch_order: PatchOrder | None = None,
) -> tuple[BiRefNet, ModelInfo]:
    """Build BiRefNet with the weights of `source`: a hub id or alias, a snapshot folder or a checkpoint file.

    The model comes back in eval mode, float32, on the CPU. `backbone` is checked against the checkpoint
    (and inferred from it when None). `cache_dir` overrides the Hugging Face cache for hub ids.
    `patch_order` ('legacy' | 'current') overrides what the bundled code or the registry say.
    """
    if backbone is not None and backbone not in SWIN_CONFIGS:
        raise WeightsError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    if patch_order is not None and patch_order not in PATCH_ORDERS:
        raise WeightsError(f"unknown patch order {patch_order!r}: choose one of {', '.join(PATCH_ORDERS)}")
    source = os.fspath(source)
    path, repo_id = resolve(source, cache_dir)
    spec = lookup(repo_id) if repo_id else None
    named = spec or lookup_name(path.stem) or lookup_name(path.parent.name)
    sd = read_state_dict(path)  # first: an unreadable or refused file says so before any patch-order notice
    order, order_from = choose_order(path, patch_order, orders_in_code(path.parent), named)

    found = infer_backbone(sd, path)
    if found is not None and spec is not None and found != spec.backbone:
        raise WeightsError(
            f"{path} holds a {found} backbone but {spec.repo_id} is a {spec.backbone} model: "
            "the file is not that model's checkpoint; delete it and download again"
        )
    if found is not None and backbone is not None and found != backbone:
        raise WeightsError(
            f"{path} holds a {found} backbone ({describe(found)}) but backbone={backbone!r} was asked for: "
            f"pass backbone={found!r} or leave it out"
        )
    chosen = found or backbone or (spec.backbone if spec else None)
    if chosen is None:
        raise WeightsError(
            f"{path} has no key {PATCH_KEY}, so it is not a BiRefNet checkpoint (or its backbone cannot be told): "
            "pass a BiRefNet / RMBG-2.0 checkpoint"
        )

    model = build(chosen, convert_patch_order(sd, order, "legacy"), path)
    resolution = spec.resolution if spec else DEFAULT_RESOLUTION
    return model.eval(), ModelInfo(source, chosen, resolution, path, repo_id, spec, order, order_from)


# --- patch order -------------------------------------------------------------------------------


def orders_in_code(folder: Path) -> dict[PatchOrder, Path]:
    """The patch orders the Python code bundled in `folder` uses, each with a file that says so; {} without code.

    The files are read as text and never imported or run. birefnet.py decides alone when it says anything.
    """
    files = sorted(folder.glob("*.py"), key=lambda p: (p.name != CODE_FILE, p.name))
    found: dict[PatchOrder, Path] = {}
    for file in files:
        order = order_in_text(file.read_text(encoding="utf-8", errors="replace"))
        if order is not None and file.name == CODE_FILE:
            return {order: file}
        if order is not None:
            found.setdefault(order, file)
    return found


def order_in_text(code: str) -> PatchOrder | None:
    """'current' for image2patches with (c hg wg), 'legacy' for get_patches_batch, else None (comments ignored)."""
    code = re.sub(r"#[^\n]*", "", code)
    return next((order for order, sign in CODE_SIGNS if sign.search(code)), None)


def choose_order(
    path: Path, asked: PatchOrder | None, code: Mapping[PatchOrder, Path], spec: ModelSpec | None
) -> tuple[PatchOrder, str]:
    """The order to load `path` in and what decided it: the caller, else the code, else the registry, else legacy."""
    says = ", ".join(f"{file.name} uses {order}" for order, file in code.items())
    if asked is not None:
        if set(code) - {asked}:
            log.warning("%s: loading in the %s patch order as asked, though %s", path, asked, says)
        return asked, "argument"
    if len(code) > 1:
        raise WeightsError(f"the code beside {path} disagrees on the patch order ({says}): pass --patch-order")
    if code:
        ((order, file),) = code.items()
        if spec is not None and spec.patch_order != order:
            log.warning(
                "%s uses the %s patch order but the registry lists %s as %s: following the code",
                file, order, spec.repo_id, spec.patch_order,
            )
        return order, f"code {file.name}"
    if spec is not None:
        log.info("%s: %s patch order, as the registry lists %s", path, spec.patch_order, spec.repo_id)
        return spec.patch_order, f"registry {spec.repo_id}"
    log.warning(
        "%s: no bundled code or known name tells its patch order; assuming legacy (RMBG-2.0, BiRefNet before "
        "2024-11), pass --patch-order current for a checkpoint of newer BiRefNet code", path,
    )
    return "legacy", "default"


def patch_permutation(g: int) -> torch.Tensor:
    """(3*g*g,) int64 `idx` with current[:, k] = legacy[:, idx[k]] for a g x g patch grid of RGB.

    Legacy stacks columns outer, rows inner, colour innermost: channel (j*g + i)*3 + c holds row i,
    column j, colour c; current puts it at c*g*g + i*g + j.
    """
    c, i, j = torch.meshgrid(torch.arange(3), torch.arange(g), torch.arange(g), indexing="ij")
    return ((j * g + i) * 3 + c).flatten()


def convert_patch_order(sd: Mapping[str, torch.Tensor], src: PatchOrder, dst: PatchOrder) -> dict[str, torch.Tensor]:
    """A copy of state dict `sd` with the patch convolutions' input channels moved from order `src` to `dst`.

    Exact (an index shuffle); keys that are absent or of an unexpected shape are left for check_keys to report.
    """
    out = dict(sd)
    if src == dst:
        return out
    for key in PATCH_KEYS:
        w = sd.get(key)
        g = math.isqrt(w.shape[1] // 3) if w is not None and w.dim() == 4 else 0
        if g == 0 or w.shape[1] != 3 * g * g:
            continue
        idx = patch_permutation(g)
        out[key] = w[:, idx] if dst == "current" else w[:, torch.argsort(idx)]
    return out


# --- where the file is -------------------------------------------------------------------------


def resolve(source: str, cache_dir: str | os.PathLike | None) -> tuple[Path, str | None]:
    """The checkpoint file for `source`, and the hub repo it belongs to when that is known."""
    path = Path(source).expanduser()
    if path.is_dir():
        return checkpoint_in(path), repo_of(path)
    if path.is_file():
        return path, repo_of(path)
    spec = lookup(source)
    if spec is not None:
        return hub_file(spec.repo_id, cache_dir), spec.repo_id
    if HUB_ID.match(source) and path.suffix.lower() not in SUFFIXES:
        return hub_file(source, cache_dir), source
    raise WeightsError(
        f"no such checkpoint file or folder: {source} "
        f"(pass a {'/'.join(SUFFIXES)} file, a folder holding one, or a hub id such as briaai/RMBG-2.0)"
    )


def checkpoint_in(folder: Path) -> Path:
    for name in HUB_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise WeightsError(
            f"folder {folder} holds no checkpoint (looked for {', '.join(HUB_FILES)} or a single "
            f"{'/'.join(SUFFIXES)} file): pass the checkpoint file itself"
        )
    names = ", ".join(p.name for p in found[:5])
    raise WeightsError(f"folder {folder} holds several checkpoints ({names}): pass the one to load")


def repo_of(path: Path) -> str | None:
    """The repo of a file or folder inside a hub cache (`models--owner--name/...`), so its table entry applies."""
    for part in path.absolute().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def hub_file(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    """Download (or find in the cache) the repo's weights, trying safetensors first."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hub_offline()
    unreachable: Exception | None = None
    for filename in HUB_FILES:
        # Once the hub proved unreachable, look only in the cache.
        local_only = offline or unreachable is not None
        try:
            if not local_only and (failed := announce(repo_id, filename, cache_dir)) is not None:
                unreachable, local_only = failed, True  # this file may still be in the cache
            path = Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=local_only))
        except GatedRepoError as e:
            raise WeightsError(denied(repo_id)) from e
        except RepositoryNotFoundError as e:
            raise WeightsError(
                f"{repo_id} is neither a local file or folder nor a model on the Hugging Face hub: check the name "
                f"(known aliases: {', '.join(ALIASES)}), or if the repo is private, {LOGIN}"
            ) from e
        except LocalEntryNotFoundError as e:
            if http_status(e) in (401, 403):
                raise WeightsError(denied(repo_id)) from e
            # Not cached and the hub is out of reach; the other file may still be in the cache.
            unreachable = unreachable or e
        except EntryNotFoundError:
            continue
        except HfHubHTTPError as e:
            if http_status(e) in (401, 403):
                raise WeightsError(denied(repo_id)) from e
            raise WeightsError(f"the Hugging Face hub failed on {repo_id}/{filename} ({brief(e)}): retry later") from e
        except Exception as e:
            raise WeightsError(f"could not fetch {repo_id}/{filename} from the Hugging Face hub ({brief(e)})") from e
        else:
            if not local_only:
                fetch_code(repo_id, path, cache_dir)
            return path
    if unreachable is not None:
        spec = lookup(repo_id)
        why = ("HF_HUB_OFFLINE is set" if offline else str(unreachable) if isinstance(unreachable, Unreachable)
               else brief(unreachable.__cause__ or unreachable))
        then = f"; it is gated: accept the licence at {spec.url} and {LOGIN} first" if spec and spec.gated else ""
        raise WeightsError(
            f"could not reach the Hugging Face hub for {repo_id} ({why}) and it is not in the local cache: "
            f"pass a local checkpoint file or folder, or download it once while online with `hf download {repo_id}` "
            f"(`huggingface-cli download {repo_id}` on older huggingface_hub){then}; or, offline, --model selfie (a "
            "person segmenter that ships with rmbg-stream: no download)"
        ) from unreachable
    raise WeightsError(
        f"{repo_id} on the Hugging Face hub holds neither {' nor '.join(HUB_FILES)}: "
        "download its checkpoint and pass the file's path"
    )


class Unreachable(ConnectionError):
    """The hub did not answer the first request for a file (the message says why); the cache may still hold it."""


def announce(repo_id: str, filename: str, cache_dir: str | os.PathLike | None) -> Unreachable | None:
    """Asks the hub for the file's metadata once, and says what is about to be downloaded and how large it is.

    One HEAD request with a short timeout and none of the hub client's retries: hf_hub_download, on a network
    error or a 429/5xx, asks again with back-off (1+2+4+8+8 s in huggingface_hub 2.4), so an unreachable hub cost
    25-35 s before its error. Returns Unreachable for those (the cache may still hold the file), and raises the
    hub's own errors (missing repo or file, gated) as hf_hub_download would. Nothing is printed when the file of
    that commit is already in the cache.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import HfHubHTTPError

    try:
        meta = get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=probe_timeout())
    except HfHubHTTPError as e:
        if http_status(e) in RETRIED_STATUSES:
            return Unreachable(brief(e))
        raise
    except Exception as e:  # the transport's own errors (refused, timed out, DNS, TLS), whatever its library
        slow = "Timeout" in type(e).__name__ or isinstance(e, TimeoutError)
        hint = f" after {probe_timeout():g} s; on a slow connection set HF_HUB_ETAG_TIMEOUT=30" if slow else ""
        return Unreachable(brief(e) + hint)
    if meta.commit_hash and isinstance(
        try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=meta.commit_hash), str
    ):
        return None
    size = f" ({human_size(meta.size)})" if meta.size else ""
    print(f"downloading {repo_id}/{filename}{size} from {constants.ENDPOINT} into the Hugging Face cache, once",
          file=sys.stderr, flush=True)
    return None


def probe_timeout() -> float:
    """Seconds to wait for the hub's first answer: HF_HUB_ETAG_TIMEOUT when set, else PROBE_TIMEOUT."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT)
    except ValueError:
        return PROBE_TIMEOUT


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def fetch_code(repo_id: str, weights: Path, cache_dir: str | os.PathLike | None) -> None:
    """Put the repo's bundled *.py beside `weights` (same commit): it tells the patch order, read as text only.

    A repo without code, or a failure here, only costs that hint: the registry's entry is used instead.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):  # a few kB of code: its "Fetching N files" bars would only clutter the weights' own bar
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    if any(weights.parent.glob("*.py")):
        return  # fetched with the weights before; saves a round trip to the hub on every load
    # hf_hub_download returned .../snapshots/<commit>/<file>: pin that commit so code and weights match.
    commit = weights.parent.name if re.fullmatch(r"[0-9a-f]{40}", weights.parent.name) else None
    try:
        snapshot_download(repo_id, revision=commit, cache_dir=cache_dir, allow_patterns=["*.py"], tqdm_class=Quiet)
    except Exception as e:
        log.warning("could not fetch the code bundled with %s (%s), which tells its patch order", repo_id, brief(e))


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a later setting counts too.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def denied(repo_id: str) -> str:
    return (
        f"access to {repo_id} on the Hugging Face hub was refused (gated or private): accept the licence "
        f"at https://huggingface.co/{repo_id} and {LOGIN}, or pass a local checkpoint path"
    )


def http_status(err: BaseException | None) -> int | None:
    """The HTTP status behind a hub error; huggingface_hub often wraps it as the cause of another error."""
    while err is not None:
        code = getattr(err.__dict__.get("response"), "status_code", None)
        if isinstance(code, int):
            return code
        err = err.__cause__
    return None


def brief(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --- what the file holds -----------------------------------------------------------------------

# torch names the global its weights-only unpickler refused, in wordings whose case changes between releases:
# "Unsupported global: GLOBAL torch.nn.Linear ..." (a class), "unsupported GLOBAL posix.system whose module ...".
REFUSED_GLOBAL = re.compile(r"unsupported global\W+(?:global\s+)?([\w.]+)", re.IGNORECASE)


def refused_global(err: BaseException, path: Path) -> str | None:
    """The function or class a pickle refused by torch would have called, or None when it is not that.

    torch names it, except in a plain (non-zip) pickle of protocol 4+, whose framing its unpickler stops at first
    ("Unsupported operand 149"): there the opcodes are read, never run, for the first import."""
    text = str(err)
    found = REFUSED_GLOBAL.search(text)
    if found or "weights_only" not in text or zipfile.is_zipfile(path):
        return found.group(1) if found else None
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    return arg.replace(" ", ".")
                if "UNICODE" in op.name:
                    strings.append(arg)
                if op.name == "STACK_GLOBAL":  # module and name are the two strings pushed just before
                    return ".".join(strings[-2:])
    except Exception:  # not a pickle after all
        return None
    return None


def unpickler_reason(err: BaseException) -> str:
    """`brief`, but for torch's weights-only refusals the line that says what was refused, never the preamble that
    suggests weights_only=False (which would run whatever the file holds)."""
    if "weights_only" not in str(err):
        return brief(err)
    lines = [line.strip() for line in str(err).splitlines() if "unsupported" in line.lower()]
    return f"{type(err).__name__}: {lines[0][:120]}" if lines else f"{type(err).__name__}: not a plain checkpoint"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, unwrapped, with training-time prefixes stripped and floats as float32."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(f"{path}: unknown checkpoint format {suffix or '(none)'}, expected {'/'.join(SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's business
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\b")
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = refused_global(e, path)
        if refused:
            # A pickled function, module or optimiser: unpickling it would run code, so it is never loaded.
            raise WeightsError(
                f"{path} holds pickled code that we refuse to run ({refused}); a checkpoint must hold "
                "only tensors: if you made it, re-save it with torch.save(model.state_dict(), ...) or convert it "
                "to safetensors"
            ) from e
        kind = "safetensors" if suffix == ".safetensors" else "PyTorch"
        raise WeightsError(
            f"could not read {path} as a {kind} checkpoint ({unpickler_reason(e)}): the file is truncated, corrupted "
            "or not a checkpoint; download or export it again"
        ) from e

    sd = unwrap(obj)
    if sd is None:
        raise WeightsError(
            f"{path} holds no state dict of tensors (found {type(obj).__name__}): "
            "pass a checkpoint saved from model.state_dict()"
        )
    out = {strip_prefixes(k): v.float() if v.is_floating_point() else v for k, v in sd.items()}
    if len(out) != len(sd):
        raise WeightsError(f"{path} holds the same key with and without a module./_orig_mod. prefix: re-export it")
    return out


def unwrap(obj) -> dict[str, torch.Tensor] | None:
    for _ in range(len(WRAPPERS)):
        if not isinstance(obj, Mapping):
            return None
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return dict(obj)
    return None


def strip_prefixes(key: str) -> str:
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


def infer_backbone(sd: Mapping[str, torch.Tensor], path: Path) -> str | None:
    """The Swin variant a checkpoint was trained with, or None when it has no patch embedding at all."""
    if PATCH_KEY not in sd:
        return None
    dim = sd[PATCH_KEY].shape[0]
    depth = len({m.group(1) for k in sd if (m := STAGE3_BLOCK.match(k))})
    for name, cfg in SWIN_CONFIGS.items():
        if cfg.embed_dim == dim and cfg.depths[2] == depth:
            return name
    raise WeightsError(
        f"{path} has a Swin backbone with embed dim {dim} and {depth} blocks in stage 3, which is none of "
        f"{', '.join(f'{b} ({describe(b)})' for b in BACKBONES)}: this loader supports only those"
    )


def describe(backbone: str) -> str:
    cfg = SWIN_CONFIGS[backbone]
    return f"embed dim {cfg.embed_dim}, {cfg.depths[2]} blocks in stage 3"


def build(backbone: str, sd: dict[str, torch.Tensor], path: Path) -> BiRefNet:
    """BiRefNet(backbone) holding exactly the checkpoint's tensors."""
    with torch.device("meta"):
        # No random init (seconds for swin_v1_l) when the checkpoint supplies every tensor anyway.
        model = BiRefNet(backbone)
    own = model.state_dict()
    check_keys(own, sd, path, backbone)
    if all(k in sd for k in own):
        # Fresh copies: safetensors hands out unaligned views into its file buffer, on which CPU kernels
        # take other paths and give (slightly) different numbers than the same weights in aligned memory.
        fresh = {k: sd[k].to(v.dtype, copy=True, memory_format=torch.contiguous_format) for k, v in own.items()}
        model.load_state_dict(fresh, strict=True, assign=True)
    else:
        # Derived buffers are absent: a fully built model computes them.
        model = BiRefNet(backbone)
        model.load_state_dict({**model.state_dict(), **sd}, strict=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise WeightsError(f"BiRefNet({backbone}) has tensors outside its state dict that {path} cannot fill (a bug)")
    return model


def check_keys(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], path: Path, backbone: str) -> None:
    """Names, shapes and kinds must match; only the derived buffers may be absent."""
    missing = [k for k in own if k not in sd and k.rsplit(".", 1)[-1] not in DERIVED]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        groups = (("missing", missing), ("unexpected", unexpected))
        parts = "; ".join(f"{len(keys)} {what} ({few(keys)})" for what, keys in groups if keys)
        raise WeightsError(
            f"{path} does not match BiRefNet({backbone}): keys {parts}: "
            "it is not a checkpoint of this network, or it is incomplete; pass the original file"
        )
    bad = [
        k
        for k, v in own.items()
        if k in sd and (sd[k].shape != v.shape or sd[k].is_floating_point() != v.is_floating_point())
    ]
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WeightsError(
            f"{path}: {k} is {list(sd[k].shape)} {sd[k].dtype} in the checkpoint but BiRefNet({backbone}) "
            f"expects {list(own[k].shape)} {own[k].dtype}{more}: the file is for another network configuration"
        )


def few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
