"""The engine on CPU with the chroma backend: order, drops, several streams, every background mode."""

import threading
import time

import numpy as np
import pytest
import torch

from rmbg_stream.engine.backends import ChromaBackend, create_backend
from rmbg_stream.engine.composite import parse_background
from rmbg_stream.engine.engine import Engine, StreamOptions

GREEN = (0, 177, 64)
CPU = torch.device("cpu")


def green_frame(h=48, w=64, box=(12, 36, 16, 48), color=(200, 60, 40), seed=0):
    """A green-screen frame with a solid foreground box (rows y0:y1, cols x0:x1); returns frame, true alpha."""
    f = np.empty((h, w, 3), np.uint8)
    f[:] = GREEN
    y0, y1, x0, x1 = box
    f[y0:y1, x0:x1] = color
    a = np.zeros((h, w), np.uint8)
    a[y0:y1, x0:x1] = 255
    return f, a


def interior(a, margin=2):
    """Pixels at least `margin` away from any edge of the mask (codec- and filter-safe)."""
    import cv2

    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    inside = cv2.erode((a > 0).astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE) > 0
    outside = cv2.erode((a == 0).astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE) > 0
    return inside, outside


@pytest.fixture
def engine():
    with Engine(ChromaBackend(CPU), max_batch=4, max_wait_ms=2) as e:
        yield e


def test_chroma_backend_keys_green_only():
    frame, truth = green_frame()
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    alpha = ChromaBackend(CPU)(x)[0, 0].numpy()
    assert alpha.shape == truth.shape
    assert np.all(alpha[truth == 255] == 1) and np.all(alpha[truth == 0] == 0)
    blue = create_backend("chroma:#0000ff", CPU)
    assert np.all(blue(x)[0, 0].numpy() == 1)  # nothing blue in a green-screen frame


def test_file_stream_is_lossless_and_in_order(engine):
    opts = StreamOptions(background=parse_background("#0000ff"), smoothing=0, alpha=True)
    s = engine.open_stream(live=False, options=opts, max_in_flight=3)
    n = 25
    got = []
    consumer = threading.Thread(target=lambda: got.extend(iter(s.get, None)))
    consumer.start()
    for i in range(n):
        f, _ = green_frame(box=(10, 30, i, i + 20))
        assert s.submit(f, pts=1000 + 33 * i, meta={"i": i})
        assert s.waiting <= 3  # back-pressure keeps memory bounded
    s.end()
    consumer.join(10)
    assert [r.pts for r in got] == [1000 + 33 * i for i in range(n)]
    assert [r.meta["i"] for r in got] == list(range(n)) and s.dropped == 0
    for i, r in enumerate(got):
        _, truth = green_frame(box=(10, 30, i, i + 20))
        np.testing.assert_array_equal(r.alpha, truth)
        assert r.image.shape == (48, 64, 3)


def test_live_stream_drops_old_frames_under_overload():
    backend = create_backend("random:swin_v1_t", CPU, resolution=(64, 64))  # really slow on CPU
    with Engine(backend, max_batch=2) as engine:
        s = engine.open_stream(live=True, max_in_flight=2)
        frame, _ = green_frame()
        peak = 0
        for i in range(60):
            s.submit(frame, pts=i)
            peak = max(peak, len(s.pending), s.results.qsize())
            time.sleep(0.002)
        deadline = time.time() + 30
        while s.delivered + s.dropped < 60 and time.time() < deadline:
            time.sleep(0.02)
        assert peak <= 2
        assert s.dropped > 30 and s.delivered >= 1
        assert s.delivered + s.dropped == 60
        results = []
        while not s.results.empty():
            results.append(s.get())
        pts = [r.pts for r in results]
        assert pts == sorted(pts) and pts[-1] == 59  # the newest frame always comes out
        s.close()


def test_live_results_nobody_reads_are_counted_once_as_dropped(engine):
    """A live consumer that falls behind loses its oldest results; each such frame counts as dropped, not also as
    delivered (delivered + dropped == submitted, whatever the timing)."""
    s = engine.open_stream(live=True, max_in_flight=2, options=StreamOptions(smoothing=0))
    frame, _ = green_frame()
    for i in range(12):
        s.submit(frame, pts=i)
        deadline = time.time() + 10
        while s.delivered + s.dropped < i + 1 and time.time() < deadline:
            time.sleep(0.002)
    stats = s.stats()
    assert stats["submitted"] == 12 and stats["delivered"] + stats["dropped"] == 12, stats
    assert s.results.qsize() == stats["delivered"] == 2
    assert [s.get(timeout=5).pts for _ in range(2)] == [10, 11]
    s.close()


def _smoothed_file_run(max_batch: int, frames: list[np.ndarray]) -> tuple[list[np.ndarray], dict]:
    with Engine(ChromaBackend(CPU), max_batch=max_batch, max_wait_ms=2000) as engine:
        idle = engine.open_stream(live=False)  # never ready: the worker waits for a full batch instead
        s = engine.open_stream(live=False, max_in_flight=len(frames), options=StreamOptions(
            background=parse_background("#ff00ff"), smoothing=0.7))
        for i, f in enumerate(frames):
            s.submit(f, pts=i)
        s.end()
        out = [s.get(timeout=30).image for _ in frames]
        batches = engine.stats()
        s.close()
        idle.close()
    return out, batches


def test_file_frames_batched_together_are_smoothed_as_one_after_another():
    """Smoothing must not depend on how a file's frames fall into batches (a transcode at --batch 4 equals one
    at --batch 1, frame for frame)."""
    frames = []
    for t in range(8):
        f, _ = green_frame(h=45, w=67, box=(10, 35, 4 + 5 * t, 24 + 5 * t))  # a box moving 5 px a frame
        frames.append(f)
    single, _ = _smoothed_file_run(1, frames)
    batched, stats = _smoothed_file_run(4, frames)
    assert stats["batches"] <= 4, stats  # the frames really shared batches
    for t, (a, b) in enumerate(zip(single, batched, strict=True)):
        assert np.array_equal(a, b), t


def test_several_streams_share_batches(engine):
    colours = {"#ff0000": (255, 0, 0), "#00ffff": (0, 255, 255), "white": (255, 255, 255)}
    sizes = [(48, 64), (40, 40), (30, 50)]
    outputs = {}

    def run(key, hw):
        s = engine.open_stream(live=False, options=StreamOptions(background=parse_background(key), smoothing=0))
        got = []
        t = threading.Thread(target=lambda: got.extend(iter(s.get, None)))
        t.start()
        for i in range(12):
            f, _ = green_frame(h=hw[0], w=hw[1], box=(5, hw[0] - 5, 5, 20))
            s.submit(f, pts=i)
        s.end()
        t.join(20)
        outputs[key] = (hw, got)
        s.close()

    threads = [threading.Thread(target=run, args=(k, hw)) for k, hw in zip(colours, sizes)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert engine.batches < engine.frames  # frames of different streams went through together
    for key, (hw, got) in outputs.items():
        assert [r.pts for r in got] == list(range(12))
        f, truth = green_frame(h=hw[0], w=hw[1], box=(5, hw[0] - 5, 5, 20))
        fg, bg = interior(truth)
        for r in got:
            assert r.image.shape == (*hw, 3)
            assert np.all(r.image[bg] == colours[key])
            assert np.all(r.image[fg] == f[fg])


def run_one(engine, options, frame, background_source=None):
    s = engine.open_stream(live=False, options=options, background_source=background_source)
    s.submit(frame)
    s.end()
    r = s.get(timeout=10)
    s.close()
    return r


class LoopingFrames:
    """A video background: a new frame each read."""

    def __init__(self, frames):
        self.frames, self.i = frames, 0

    def read(self):
        self.i += 1
        return self.frames[(self.i - 1) % len(self.frames)]


def test_every_background_mode(engine, tmp_path):
    from PIL import Image

    frame, truth = green_frame()
    fg, bg = interior(truth)

    r = run_one(engine, StreamOptions(background=parse_background("transparent"), smoothing=0), frame)
    assert r.image.shape == (48, 64, 4)
    assert np.all(r.image[..., 3][fg] == 255) and np.all(r.image[..., 3][bg] == 0)
    assert np.all(r.image[..., :3][fg] == frame[fg])

    r = run_one(engine, StreamOptions(background=parse_background("none"), smoothing=0), frame)
    np.testing.assert_array_equal(r.image, frame)

    pattern = np.zeros((48, 64, 3), np.uint8)
    pattern[:, :32] = (255, 255, 0)
    pattern[:, 32:] = (0, 0, 255)
    Image.fromarray(pattern).save(tmp_path / "bg.png")
    r = run_one(engine, StreamOptions(background=parse_background(str(tmp_path / "bg.png")), smoothing=0), frame)
    np.testing.assert_array_equal(r.image[bg], pattern[bg])
    assert np.all(r.image[fg] == frame[fg])

    video = LoopingFrames([np.full((96, 128, 3), 90, np.uint8)])
    opts = StreamOptions(background=parse_background(str(tmp_path / "bg.mp4")), smoothing=0)
    r = run_one(engine, opts, frame, background_source=video)
    assert np.all(r.image[bg] == 90) and np.all(r.image[fg] == frame[fg])

    noisy = frame.copy()
    noisy[truth == 0] = np.random.default_rng(1).integers(0, 2, (int((truth == 0).sum()), 1)) * 40 + GREEN[1] - 20
    noisy[truth == 0, 0] = 0
    noisy[truth == 0, 2] = 64
    r = run_one(engine, StreamOptions(background=parse_background("blur"), smoothing=0), noisy)
    assert r.image[bg][:, 1].std() < noisy[bg][:, 1].std() / 2  # the background got blurred
    assert np.all(np.abs(r.image[fg].astype(int) - frame[fg]) <= 1)

    r = run_one(engine, StreamOptions(background=parse_background("#123456"), smoothing=0, mask_view=True,
                                      alpha=True), frame)
    np.testing.assert_array_equal(r.image[..., 0], r.alpha)
    np.testing.assert_array_equal(r.alpha, truth)

    r = run_one(engine, StreamOptions(background=parse_background("#ffffff"), smoothing=0, decontaminate=True),
                frame)
    assert np.all(r.image[bg] == 255) and np.all(np.abs(r.image[fg].astype(int) - frame[fg]) <= 2)


def test_results_equal_between_live_and_file_paths(engine):
    frame, _ = green_frame()
    opts = StreamOptions(background=parse_background("#00ff00"), smoothing=0, alpha=True)
    a = run_one(engine, opts, frame)
    live = engine.open_stream(live=True, options=opts)
    live.submit(frame)
    b = live.get(timeout=10)
    live.close()
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.alpha, b.alpha)


def test_bad_frame_is_rejected_and_engine_keeps_serving(engine):
    s = engine.open_stream(live=False)
    with pytest.raises(ValueError, match="uint8"):
        s.submit(np.zeros((8, 8), np.float32))
    frame, _ = green_frame()
    s.submit(frame)
    s.end()
    assert s.get(timeout=10) is not None
    s.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_equals_cpu_path():
    frame, _ = green_frame(h=360, w=640, box=(60, 300, 100, 400))
    opts = StreamOptions(background=parse_background("#ff00ff"), smoothing=0.5, alpha=True)
    out = {}
    for dev in ("cpu", "cuda"):
        with Engine(ChromaBackend(torch.device(dev)), max_batch=4) as e:
            s = e.open_stream(live=False, options=opts)
            got = []
            t = threading.Thread(target=lambda s=s, got=got: got.extend(iter(s.get, None)))
            t.start()
            for i in range(10):
                s.submit(np.roll(frame, 3 * i, axis=1), pts=i)
            s.end()
            t.join(30)
            out[dev] = got
    assert [r.pts for r in out["cuda"]] == list(range(10))
    for a, b in zip(out["cpu"], out["cuda"]):
        assert np.abs(a.alpha.astype(int) - b.alpha).max() <= 1
        assert np.abs(a.image.astype(int) - b.image).max() <= 1


def _hammered_outputs(tmp_path, seconds: float) -> tuple[dict, dict, dict, list]:
    """Three file streams (two RGB, one I420) whose options another thread flips between two sets as fast as it
    can while frames flow. Returns per stream: its option sets, the reference output of each set (from a stream
    left alone) and every output under the hammer, plus whatever the streams delivered that was not a Result."""
    import sys

    import cv2
    from PIL import Image

    for name, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (20, 14), rgb).save(tmp_path / f"{name}.png")
    red, blue = (parse_background(str(tmp_path / f"{n}.png")) for n in ("red", "blue"))
    plain = StreamOptions(background=parse_background("#ff0000"), smoothing=0.0)
    sets = {  # stream 1 and 2 share `plain`, so their frames are composited together while both are on it
        "rgb1": (plain, StreamOptions(background=blue, smoothing=0.9)),
        "rgb2": (plain, StreamOptions(background=parse_background("#ffff00"), smoothing=0.5, mask_view=True)),
        "yuv": (StreamOptions(background=red, smoothing=0.0),
                StreamOptions(background=blue, smoothing=0.7, mask_view=False, alpha=True)),
    }
    rgb, _ = green_frame(37, 53, box=(9, 30, 11, 40))  # odd and not multiples of 4, not square
    yuv = cv2.cvtColor(green_frame(30, 46, box=(8, 22, 10, 34))[0], cv2.COLOR_RGB2YUV_I420)  # 2 mod 4
    frames = {"rgb1": rgb, "rgb2": rgb, "yuv": yuv}
    fmt = {"rgb1": "rgb24", "rgb2": "rgb24", "yuv": "yuv420p"}
    with Engine(ChromaBackend(CPU), max_batch=4, max_wait_ms=1) as engine:
        refs = {}
        for name, pair in sets.items():
            for opts in pair:
                s = engine.open_stream(live=False, options=opts, pixel_format=fmt[name])
                for _ in range(3):  # past the first frame, which has no smoothing history
                    s.submit(frames[name])
                refs.setdefault(name, []).append([s.get(timeout=10).image for _ in range(3)][-1])
                s.close()
        outputs = {name: [] for name in sets}
        streams = {name: engine.open_stream(live=False, options=sets[name][0], pixel_format=fmt[name],
                                            on_result=lambda r, n=name: outputs[n].append(r.image))
                   for name in sets}
        stop = threading.Event()

        def hammer():
            k = 0
            while not stop.is_set():
                k += 1
                for name, s in streams.items():
                    s.set_options(**vars(sets[name][k % 2]))

        def produce(name):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                streams[name].submit(frames[name], timeout=10)
            streams[name].end()

        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # thread switches land anywhere, as in the server (which sets 1e-4)
        try:
            threads = [threading.Thread(target=hammer)] + [threading.Thread(target=produce, args=(n,)) for n in sets]
            for t in threads:
                t.start()
            for t in threads[1:]:
                t.join(seconds + 30)
            stop.set()
            threads[0].join(10)
        finally:
            sys.setswitchinterval(switch)
        failures = [streams[name].get(timeout=30) for name in sets]  # None once all are out; a failure raises
    return sets, refs, outputs, failures


def test_options_changed_from_another_thread_never_fail_a_batch_nor_mix_in_one_frame(tmp_path):
    sets, refs, outputs, ends = _hammered_outputs(tmp_path, seconds=3.0)
    assert ends == [None, None, None]  # every stream ended cleanly: no batch failed
    for name, images in outputs.items():
        assert len(images) > 50, f"{name}: only {len(images)} frames came through"
        a, b = refs[name]
        assert not np.array_equal(a, b)
        seen = [0, 0]
        for n, img in enumerate(images):
            match = [np.array_equal(img, a), np.array_equal(img, b)]
            assert sum(match) == 1, f"{name}: frame {n} matches neither option set"
            seen[match.index(True)] += 1
        assert min(seen) > 0, f"{name}: the options never took effect ({seen})"


def test_a_closed_stream_and_its_last_frames_are_freed_without_the_garbage_collector(engine):
    import gc
    import weakref

    class Owner:  # a session: it holds its stream, whose callback points back at it
        def __init__(self):
            self.stream = engine.open_stream(live=True, on_result=self.got)
            self.results = []

        def got(self, r):
            self.results.append(r)

    owner = Owner()
    frame, _ = green_frame(38, 54)
    for _ in range(5):
        owner.stream.submit(frame.copy())
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    while not owner.results and time.monotonic() < deadline:
        time.sleep(0.01)
    owner.stream.close()
    stream, first = weakref.ref(owner.stream), weakref.ref(owner.results[0])
    gc.disable()  # the server freezes most objects and its cyclic GC may not run for a long while
    try:
        del owner
        deadline = time.monotonic() + 2
        while stream() is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker may still be finishing the last batch
        assert stream() is None and first() is None
    finally:
        gc.enable()


class CountingBackend:
    """A real backend that records the shape of every batch it is handed."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.resolution, self.guided = inner.resolution, inner.guided
        self.shapes: list[tuple[int, ...]] = []

    def input_size(self, h: int, w: int):
        return self.inner.input_size(h, w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def test_warm_up_runs_every_batch_size_the_engine_submits_before_the_constructor_returns():
    """cudnn.benchmark tunes each input shape on its first call: seconds a live stream would stall on CUDA."""
    backend = CountingBackend(create_backend("random:swin_v1_t", CPU, "fp32", (32, 64), runtime="eager"))
    with Engine(backend, max_batch=3, max_wait_ms=2, warm=True) as e:
        assert backend.shapes == [(1, 3, 32, 64), (2, 3, 32, 64), (3, 3, 32, 64)]
        s = e.open_stream(live=False)
        s.submit(green_frame(37, 53)[0])
        assert s.get(timeout=30).image.shape == (37, 53, 4)
    assert backend.shapes[3:] == [(1, 3, 32, 64)]


def test_the_cpu_engine_warms_nothing_up_by_default():
    backend = CountingBackend(create_backend("random:swin_v1_t", CPU, "fp32", (32, 64), runtime="eager"))
    with Engine(backend, max_batch=3):
        assert backend.shapes == []
