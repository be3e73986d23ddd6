"""The engine's CUDA branch (copy streams, pinned double buffers, events, the finisher thread) on a simulated device.

`SimulatedDevice` defers every asynchronous copy until something waits for it and poisons buffers reused too
early, so a missing wait shows up as wrong pixels here; each test compares with the synchronous CPU engine.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from rmbg_stream.engine import transfer
from rmbg_stream.engine.backends import ChromaBackend
from rmbg_stream.engine.composite import parse_background
from rmbg_stream.engine.device_api import SimulatedDevice
from rmbg_stream.engine.engine import Engine, StreamOptions
from rmbg_stream.engine.smoothing import DEFAULT_STRENGTH

CPU = torch.device("cpu")
GREEN = (0, 177, 64)


def frame(i: int, h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    """A green-screen frame, odd and non-square, with a noisy box that moves with `i`."""
    rng = np.random.default_rng(seed * 1000 + i)
    f = np.empty((h, w, 3), np.uint8)
    f[:] = GREEN
    y, x = 3 + i % 7, 2 + (3 * i) % (w - 20)
    f[y:y + h // 2, x:x + 17] = rng.integers(0, 256, (h // 2, 17, 3), dtype=np.uint8)
    return f


def run_file_streams(api, n_streams: int = 3, n: int = 12, options=None, sizes=None, **engine_kw) -> list[list]:
    """Results of `n_streams` file streams of `n` frames each, fed from one thread each."""
    options = options or [StreamOptions(background=parse_background("#ff00ff"), smoothing=0.5, alpha=True)]
    sizes = sizes or [(37, 53), (30, 41), (37, 53)]
    with Engine(ChromaBackend(CPU), max_batch=4, max_wait_ms=2, device_api=api, **engine_kw) as e:
        streams = [e.open_stream(live=False, options=options[k % len(options)]) for k in range(n_streams)]
        got: list[list] = [[] for _ in streams]

        def feed(k, s):
            h, w = sizes[k % len(sizes)]
            for i in range(n):
                s.submit(frame(i, h, w, seed=k), pts=i)
            s.end()

        feeders = [threading.Thread(target=feed, args=(k, s)) for k, s in enumerate(streams)]
        readers = [threading.Thread(target=lambda s=s, g=g: g.extend(iter(lambda: s.get(timeout=30), None)))
                   for s, g in zip(streams, got)]
        for t in feeders + readers:
            t.start()
        for t in feeders + readers:
            t.join(60)
    return got


def assert_same(expected: list[list], got: list[list]) -> None:
    for k, (a, b) in enumerate(zip(expected, got)):
        assert [r.pts for r in b] == [r.pts for r in a], f"stream {k}: order"
        for ra, rb in zip(a, b):
            np.testing.assert_array_equal(rb.image, ra.image, err_msg=f"stream {k} frame {ra.pts}")
            if ra.alpha is not None:
                np.testing.assert_array_equal(rb.alpha, ra.alpha, err_msg=f"stream {k} frame {ra.pts}")


OPTIONS = [StreamOptions(background=parse_background("#ff00ff"), smoothing=0.5, alpha=True),
           StreamOptions(background=parse_background("transparent"), smoothing=0.3),
           StreamOptions(background=parse_background("blur"), smoothing=0, alpha=True)]


def test_several_file_streams_on_the_simulated_device_equal_the_cpu_engine_pixel_for_pixel():
    expected = run_file_streams(None, options=OPTIONS)
    sim = SimulatedDevice()
    got = run_file_streams(sim, options=OPTIONS)
    assert sim.hazards == []
    assert sim.copies > 12  # the asynchronous branch ran: uploads and downloads went through the device
    assert_same(expected, got)


def test_the_second_batch_reuses_no_memory_the_compute_stream_may_still_read():
    """transfer.py allocated the device staging buffer while the compute stream was current and wrote it first on
    the upload stream, which waited on nothing: memory batch k-1's kernels still read. Growth did it again."""
    sim = SimulatedDevice()
    # Growing frames: every few batches a slot reallocates.
    got = run_file_streams(sim, n_streams=1, n=10, sizes=[(37, 53)])
    grown = run_file_streams(sim, n_streams=2, n=6, sizes=[(60, 90), (101, 77)])
    assert sim.hazards == []
    assert_same(run_file_streams(None, n_streams=1, n=10, sizes=[(37, 53)]), got)
    assert_same(run_file_streams(None, n_streams=2, n=6, sizes=[(60, 90), (101, 77)]), grown)


def test_staging_offsets_are_aligned_to_256_bytes():
    sim = SimulatedDevice()
    up = transfer.Uploader(CPU, sim)
    arrays = [np.full((3, 5, 3), k, np.uint8) for k in range(4)]  # 45 bytes each
    with sim.use(sim.stream()):
        out = up.upload(arrays)
        up.release()
    base = up.dev[0].data_ptr()
    assert [(t.data_ptr() - base) % 256 for t in out] == [0, 0, 0, 0]
    assert [int(t[0, 0, 0]) for t in out] == [0, 1, 2, 3]


def test_yuv_streams_with_a_video_background_on_the_simulated_device_equal_the_cpu_engine():
    class Video:
        def __init__(self):
            self.i = 0

        def read(self):
            self.i += 1
            return frame(self.i, 24, 40, seed=9)

    def run(api):
        import av

        def rgb_to_i420_numpy(rgb):
            return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()

        opts = StreamOptions(background=parse_background("bg.mp4"), smoothing=0.4, alpha=True)
        with Engine(ChromaBackend(CPU), max_batch=3, max_wait_ms=2, device_api=api) as e:
            s = e.open_stream(live=False, options=opts, pixel_format="yuv420p", background_source=Video())
            got = []
            t = threading.Thread(target=lambda: got.extend(iter(lambda: s.get(timeout=30), None)))
            t.start()
            for i in range(9):
                s.submit(rgb_to_i420_numpy(frame(i, 34, 46)), pts=i)
            s.end()
            t.join(60)
        return [got]

    sim = SimulatedDevice()
    got = run(sim)
    assert sim.hazards == []
    assert_same(run(None), got)


def test_live_streams_drop_on_the_simulated_device_and_what_they_deliver_equals_the_cpu_engine():
    opts = StreamOptions(background=parse_background("#00ffff"), smoothing=0, alpha=True)
    expected = run_file_streams(None, n_streams=2, n=30, options=[opts])
    sim = SimulatedDevice()
    with Engine(ChromaBackend(CPU), max_batch=2, max_wait_ms=1, device_api=sim) as e:
        streams = [e.open_stream(live=True, options=opts) for _ in range(2)]
        sizes = [(37, 53), (30, 41)]
        for i in range(30):
            for k, s in enumerate(streams):
                s.submit(frame(i, *sizes[k], seed=k), pts=i)
        results = []
        for s in streams:
            s.end()
            results.append(list(iter(lambda s=s: s.get(timeout=30), None)))
    assert sim.hazards == []
    for k, got in enumerate(results):
        assert got and got[-1].pts == 29  # the newest frame always comes out
        assert [r.pts for r in got] == sorted({r.pts for r in got})
        for r in got:
            np.testing.assert_array_equal(r.image, expected[k][r.pts].image)
            np.testing.assert_array_equal(r.alpha, expected[k][r.pts].alpha)
    assert sum(s.dropped for s in streams) + sum(len(g) for g in results) == 60


def test_a_batch_that_fails_after_its_upload_still_releases_the_buffer_and_resets_the_smoothing():
    """`_process` skipped `release()` when a stage raised: two batches later the upload stream overwrote the buffer
    without waiting for the failed batch's kernels. The stream's smoother is reset too."""
    sim = SimulatedDevice()
    backend = ChromaBackend(CPU)
    calls = {"n": 0}
    real = backend.__call__

    class Failing:
        def __getattr__(self, name):
            return getattr(backend, name)

        def __call__(self, x):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure")
            return real(x)

    opts = StreamOptions(background=parse_background("#ff00ff"), smoothing=0, alpha=True)
    with Engine(Failing(), max_batch=1, max_wait_ms=0, device_api=sim) as e:
        s = e.open_stream(live=False, options=opts, max_in_flight=1)
        out = []
        for i in range(6):
            s.submit(frame(i), pts=i)
            try:
                out.append(s.get(timeout=30))
            except RuntimeError as exc:
                assert "injected failure" in str(exc)
                out.append(None)
    assert [r is None for r in out] == [False, True, False, False, False, False]
    assert sim.hazards == []
    expected = run_file_streams(None, n_streams=1, n=6, options=[opts])[0]
    for r in out:
        if r is not None:
            np.testing.assert_array_equal(r.image, expected[r.pts].image)


def test_an_on_result_that_raises_neither_kills_the_finisher_nor_hangs_close():
    sim = SimulatedDevice()
    seen = []

    def on_result(r):
        seen.append(r.pts)
        raise ValueError("consumer bug")

    with Engine(ChromaBackend(CPU), max_batch=2, max_wait_ms=1, device_api=sim) as e:
        s = e.open_stream(live=False, on_result=on_result, max_in_flight=2)
        for i in range(8):  # more than the finisher's 2-slot queue holds
            assert s.submit(frame(i), pts=i, timeout=30)
        s.end()
        deadline = time.monotonic() + 30
        while len(seen) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        t = threading.Thread(target=e.close)
        t.start()
        t.join(30)
        assert not t.is_alive(), "close() hung"
    assert sorted(seen) == list(range(8))


@pytest.mark.parametrize("broken", ["compute skips the upload event", "upload skips consumed",
                                    "host skips uploaded", "finisher skips the download event",
                                    "download skips ready"])
def test_the_simulation_turns_each_broken_wait_of_the_double_buffer_protocol_into_wrong_pixels(broken, monkeypatch):
    """A guard on the guard: with one wait taken out, the comparison with the CPU engine must fail."""
    sim = SimulatedDevice()
    real_wait = sim.wait

    def wait(stream, ev):
        up, down = engine_ref[-1].uploader, engine_ref[-1].downloader
        if broken == "compute skips the upload event" and stream is engine_ref[-1].compute_stream:
            return
        if broken == "upload skips consumed" and stream is up.stream:
            return
        if broken == "download skips ready" and stream is down.stream:
            return
        real_wait(stream, ev)

    engine_ref: list = []
    monkeypatch.setattr(sim, "wait", wait)
    if broken in ("host skips uploaded", "finisher skips the download event"):
        from rmbg_stream.engine import device_api

        real_sync = device_api.SimEvent.synchronize
        monkeypatch.setattr(device_api.SimEvent, "synchronize", lambda ev: (
            None if ev.blocking and _from_host_side(broken) else real_sync(ev)))
    real_init = Engine.__init__

    def init(self, *a, **kw):
        engine_ref.append(self)
        real_init(self, *a, **kw)

    monkeypatch.setattr(Engine, "__init__", init)
    expected = run_file_streams(None, n_streams=2, n=10)
    got = run_file_streams(sim, n_streams=2, n=10)
    with pytest.raises(AssertionError):
        assert_same(expected, got)


def _from_host_side(broken: str) -> bool:
    """Which host waits the test above removes: the uploader's (before reusing a staging buffer) or the
    finisher's (before reading the downloaded results), told apart by the calling thread."""
    finisher = threading.current_thread().name == "rmbg-engine-dl"
    return finisher if broken == "finisher skips the download event" else not finisher


def test_image_backgrounds_on_the_simulated_device_equal_the_cpu_engine_and_are_decoded_off_the_worker(
        tmp_path, monkeypatch):
    """The worker decoded image backgrounds with PIL and copied them to the device with a blocking .to(device):
    every stream waited. Now the opening thread decodes, and the image goes up with a batch's upload."""
    from PIL import Image

    from rmbg_stream.engine.composite import prepare_background, to_uint8
    from rmbg_stream.media import images

    rgb = np.random.default_rng(5).integers(0, 256, (83, 121, 3), dtype=np.uint8)  # odd, not the frames' aspect
    rgb[20:60, 30:90] = (250, 20, 120)
    path = tmp_path / "bg.png"
    Image.fromarray(rgb).save(path)
    threads = []
    real = images.load_rgb

    def load_rgb(*args, **kw):
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(images, "load_rgb", load_rgb)
    options = [StreamOptions(background=parse_background(str(path)), smoothing=0.4, alpha=True)]
    expected = run_file_streams(None, n_streams=3, n=8, options=options)
    sim = SimulatedDevice()
    got = run_file_streams(sim, n_streams=3, n=8, options=options)
    assert sim.hazards == []
    assert_same(expected, got)
    assert len(threads) == 6 and "rmbg-engine" not in threads  # each stream's opener, in both runs
    for k, (h, w) in enumerate([(37, 53), (30, 41), (37, 53)]):
        r = got[k][0]
        bg = to_uint8(prepare_background(rgb, h, w)).permute(0, 2, 3, 1)[0].numpy()
        keyed = r.alpha == 0
        assert keyed.mean() > 0.3
        np.testing.assert_array_equal(r.image[..., :3][keyed], bg[keyed])


def test_a_new_image_background_is_decoded_by_set_options_and_a_bad_one_changes_nothing(tmp_path):
    from PIL import Image

    from rmbg_stream.media.images import ImageError

    Image.fromarray(np.full((9, 13, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with Engine(ChromaBackend(CPU), device_api=SimulatedDevice()) as e:
        s = e.open_stream(live=True)
        s.set_options(background=parse_background(str(tmp_path / "a.png")))
        assert s.image.path == str(tmp_path / "a.png") and s.image.rgb.shape == (9, 13, 3)
        with pytest.raises(ImageError, match="bad.png"):
            s.set_options(background=parse_background(str(tmp_path / "bad.png")), smoothing=0.1)
        assert s.options.background.path == str(tmp_path / "a.png") and s.options.smoothing == DEFAULT_STRENGTH
        s.set_options(background=parse_background("blur"))
        assert s.image is None
