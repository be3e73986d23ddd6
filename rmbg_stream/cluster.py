"""`rmbg-stream transcode --cluster [ADDRESS]`: files and segments of long videos on a Ray cluster.

    driver (this process): list inputs -> probe each (demux only: frame times, keyframes) -> jobs
        -> ray.util.ActorPool of Workers (one Engine each, the model loaded once per actor process)
        -> segment files joined by remuxing packets (no re-encode), audio and subtitles from the source

Ray does the scheduling and the retries: a worker process that dies is restarted (`max_restarts`) and its call
run again (`max_task_retries` = `--retries`), possibly on another node. We keep no queue of our own.

A video longer than `--segment-seconds` is cut at keyframes. Each segment decodes `RUNIN_FRAMES` frames before
its start and drops their results, so temporal smoothing has the same history as in one process: with
smoothing 0 a segmented output equals the single-process one frame for frame. Every frame keeps its source pts,
so the joined file's timestamps are the source's (variable frame rate too) without any offset arithmetic. A PNG
sequence's segments are hidden folders of frames numbered by their place in the whole, moved into one folder.
With one worker a file goes whole: segments give nothing to run in parallel.

Start-up: the actors (a process, torch, the model: 2-5 s on two cores) start while this process probes the
inputs, and serve every file of the command. Per frame, a worker pays one clock read (progress goes to the tally
at most every PROGRESS_EVERY seconds); its fps on a whole file equals one process's (measured 284 against 291).

Storage: inputs and outputs are paths every node sees (a shared mount). Outputs stay atomic: segments and the
joined file are hidden names beside the output until the rename; the driver removes every temporary name of
its outputs when it ends, however it ends (a worker killed mid-file leaves a `.part` behind it).
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import av

from .engine.setup import MODEL_OPTIONS
from .engine.yuv import i420_planes
from .media.reader import Frame, MediaError, VideoReader, io_threads, open_input, upright
from .transcode import DEFAULT_COLOR, FORMATS, Summary, check_video_background, input_pairs
from .transcode import transcode as transcode_file

EXTRA_HINT = "--cluster needs Ray: pip install 'rmbg-stream[cluster]'"
LIST_SUFFIXES = {".txt", ".list"}  # a text file naming one input per line
# Frames decoded before each segment and dropped after the engine: history for the smoother. Its per-pixel
# weight follows motion, and on a still scene the old state fades by about half a frame at the default 0.5:
# 24 frames leave < 1e-4 of it (well under one 8-bit step), for 24 / 1800 = 1.3 % more work at 30 fps, 60 s.
RUNIN_FRAMES = 24
# Seconds between a worker's progress reports: a fire-and-forget call to the tally, so the per-frame cost is one
# clock read (measured: the actor's fps on a whole file is the single process's, 284 against 291 at 640x360).
PROGRESS_EVERY = 0.5


def require_ray():
    """The `ray` module, or ValueError naming the extra (one line at the command line)."""
    try:
        import ray
    except ImportError:
        raise ValueError(EXTRA_HINT) from None
    return ray


# -- planning (driver)


@dataclass(frozen=True)
class Segment:
    index: int
    seek: int | None  # pts to seek to (a keyframe at or before run_in); None: decode from the file's start
    run_in: int  # first pts fed to the engine
    start: int  # first pts written
    end: int | None  # first pts of the next segment; None: to the end
    frames: int  # frames in [start, end)
    number: int  # frames before `start` in the whole file (a PNG sequence numbers this segment's from number + 1)


@dataclass(frozen=True)
class Job:
    id: int
    src: str
    dest: str  # the output, or the segment's hidden file
    background: str
    options: dict  # mask, smoothing, decontaminate, codec, crf, allow_truncated
    segment: Segment | None = None


@dataclass
class Probe:
    pts: list[int]  # every video packet's pts, sorted (= the frames' presentation times)
    keyframes: list[int]  # sorted
    time_base: object
    video_index: int


def probe(path: str | Path) -> Probe | None:
    """Frame times and keyframes by demuxing (no decoding); None when the file cannot be segmented (no
    timestamps, damaged, not media): it then goes to a worker whole, which reports any error as one process does."""
    try:
        with open_input(path) as c:
            videos = [s for s in c.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            if not videos:
                return None
            s = videos[0]
            pts, keys = [], []
            for p in c.demux(s):
                if not p.size:
                    continue
                if p.pts is None or p.is_corrupt:
                    return None
                pts.append(p.pts)
                if p.is_keyframe:
                    keys.append(p.pts)
            return Probe(sorted(pts), sorted(keys), s.time_base, s.index) if pts else None
    except (MediaError, av.error.FFmpegError, OSError):
        return None


def plan_segments(p: Probe, seconds: float, run_in: int = RUNIN_FRAMES) -> list[Segment]:
    """Cut at the first keyframe at least `seconds` after the previous cut; [] when the video stays whole."""
    step = round(seconds / p.time_base)
    cuts = [p.pts[0]]
    for k in p.keyframes:
        if k >= cuts[-1] + step:
            cuts.append(k)
    if len(cuts) < 2:
        return []
    segments = []
    for i, start in enumerate(cuts):
        end = cuts[i + 1] if i + 1 < len(cuts) else None
        first = bisect.bisect_left(p.pts, start)
        last = bisect.bisect_left(p.pts, end) if end is not None else len(p.pts)
        begin = p.pts[max(0, first - run_in)]
        seek = None if i == 0 else p.keyframes[max(0, bisect.bisect_right(p.keyframes, begin) - 1)]
        segments.append(Segment(i, seek, begin, start, end, last - first, first))
    return segments


def list_inputs(src: Path, dest: Path, fmt: str | None) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file, a folder (as single-process mode), or a text file of inputs, one a line
    (relative to the list's folder; blank lines and '#' comments skipped) into the output folder."""
    if not (src.is_file() and src.suffix.lower() in LIST_SUFFIXES):
        return input_pairs(src, dest, fmt)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: the input is a list, so the output must be a folder")
    lines = [ln.strip() for ln in src.read_text().splitlines()]
    files = [src.parent / ln if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln and ln[0] != "#"]
    stems = [p.stem for p in files]
    suffix = FORMATS[fmt or "mp4"]
    return [(p, dest / ((p.stem if stems.count(p.stem) == 1 else p.name) + suffix)) for p in files]


# -- workers (Ray actors)


class SegmentReader:
    """Frames [run_in, end) of a video, like VideoReader (same conversion, same `info`): seeks to the keyframe
    before the run-in instead of decoding from the start. `decoded` counts the frames from `start` on. Every pts
    comes out less `origin` (see `segment_origin`)."""

    def __init__(self, path: str, seg: Segment, prefer_yuv: bool, origin: int = 0):
        with VideoReader(path, prefer_yuv=prefer_yuv) as whole:  # the first frame decides info, yuv, rotation
            self.info, self.yuv, self.spec, self.rotation = whole.info, whole.yuv, whole.spec, whole.rotation
        self.path, self.seg, self.origin = path, seg, origin
        self.decoded = 0
        self.truncated = None
        self.container = None

    def _open(self, seek: int | None):
        if self.container is not None:
            self.container.close()
        self.container = open_input(self.path)
        stream = self.container.streams[self.info.index]
        stream.thread_type, stream.thread_count = "AUTO", io_threads()
        if seek is not None:
            self.container.seek(seek, stream=stream, backward=True)
        return stream

    def _frames(self):
        """Decoded frames from the run-in on; a seek that lands after the run-in starts over from the top."""
        for seek in (self.seg.seek, None) if self.seg.seek is not None else (None,):
            stream = self._open(seek)
            first = True
            for packet in self.container.demux(stream):
                for frame in packet.decode():
                    if first and seek is not None and frame.pts > self.seg.run_in:
                        break
                    first = False
                    yield frame
                else:
                    continue
                break
            else:
                return

    def __iter__(self):
        tb = self.info.time_base
        for frame in self._frames():
            pts = frame.pts
            if pts < self.seg.run_in:
                continue
            if self.seg.end is not None and pts >= self.seg.end:
                return
            if pts >= self.seg.start:
                self.decoded += 1
            image = i420_planes(frame) if self.yuv else upright(
                frame.to_ndarray(format="rgb24", threads=io_threads()), self.rotation)
            yield Frame(image, pts - self.origin, float((pts - self.origin) * tb))

    def close(self) -> None:
        if self.container is not None:
            self.container.close()


class Tally:
    """Progress from the workers (a Ray actor): frames done per job in its latest attempt, and who is busy."""

    def __init__(self):
        self.done: dict[int, int] = {}
        self.active: dict[int, int] = {}  # job -> worker

    def report(self, job: int, worker: int, done: int, finished: bool = False) -> None:
        self.done[job] = done
        if finished:
            self.active.pop(job, None)
        else:
            self.active[job] = worker

    def state(self) -> tuple[int, int]:
        return sum(self.done.values()), len(set(self.active.values()))


class Worker:
    """One engine per actor process (a Ray actor); `run(job)` returns a result dict and never raises for a bad
    input, so Ray retries only what a dead process left unfinished."""

    def __init__(self, index: int, model: dict, batch: int, cpus: float | None, tally: str):
        """`cpus`: the worker's share of its node without GPUs (thread counts follow it); None with a GPU, whose
        decoders and encoders feed the card with the node's threads, as one process does."""
        import ray
        import torch

        from .engine.engine import Engine
        from .engine.setup import build_backend
        from .tuning import cores, limit_cores, share_cpu

        limit_cores(cpus)  # before any thread count is chosen
        # By name, not a handle: a restarted actor gets its arguments again, and plain ones cannot go missing.
        self.index, self.tally = index, ray.get_actor(tally)
        backend = build_backend(SimpleNamespace(**model))
        share_cpu(backend)
        if backend.device.type == "cpu":
            torch.set_num_threads(max(1, min(torch.get_num_threads(), cores())))
        self.engine = Engine(backend, max_batch=max(1, batch), max_wait_ms=4)
        self.ready_at = time.time()  # wall clock: the driver reports its start-up (process, imports, model) apart

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Job) -> dict:
        from .engine.composite import parse_background

        last = [0.0]

        def on_frame(done, total):
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                self.tally.report.remote(job.id, self.index, done)

        seg = job.segment
        origin = segment_origin(job.dest, seg)
        opener = (lambda yuv: SegmentReader(job.src, seg, yuv, origin)) if seg is not None else None
        numbering = {"keep_from": seg.start - origin, "number_from": seg.number + 1} if seg is not None else {}
        result = {"job": job.id, "worker": self.index, "status": "ok", "error": None, "ready_at": self.ready_at,
                  "started": time.time()}
        try:
            s = transcode_file(self.engine, job.src, job.dest, background=parse_background(job.background),
                               on_frame=on_frame, open_reader=opener, **numbering, **job.options)
            result.update(frames_in=s.frames_in, frames_out=s.frames_out, seconds=s.seconds, warnings=s.warnings)
        except (MediaError, ValueError, RuntimeError, OSError, av.error.FFmpegError) as exc:
            bad = isinstance(exc, ValueError) and not isinstance(exc, av.error.FFmpegError)
            result.update(status="invalid" if bad else "error", error=str(exc), frames_in=0, frames_out=0)
        self.tally.report.remote(job.id, self.index, result["frames_out"], finished=True)
        return result


# -- joining segments (driver)

# Containers whose files start their timeline at zero: a later start goes into an edit list in the movie's
# timescale (1/1000 s), which moves every frame by the rounding (195000/90000 s came back as 194940). Their
# segments are written from pts 0 and moved back when joined, exactly, in the track's own timescale.
ZERO_BASED = {".mp4", ".m4v", ".mov"}


def segment_origin(dest: str | Path, seg: Segment | None) -> int:
    """The pts a segment file's timestamps count from (source time base)."""
    return seg.start if seg is not None and Path(dest).suffix.lower() in ZERO_BASED else 0


def join_segments(parts: list[tuple[Path, int]], dest: Path, src: str, video_index: int, time_base
                  ) -> tuple[int, list[str]]:
    """Remux the segments' video packets (same encoder settings; each (file, origin in `time_base`)) into `dest`
    at the source's pts, with the source's audio and subtitles as single-process mode copies them; atomic.
    Returns (frames, warnings)."""
    from .media.writer import CONTAINERS, DEFAULTS, Passthrough, temp_beside  # the writer's own, not second ones

    fmt = CONTAINERS[dest.suffix.lower()]
    tmp = temp_beside(dest, folder=False)
    warnings: list[str] = []
    out = passthrough = None
    frames = 0
    try:
        out = av.open(str(tmp), "w", format=fmt)
        with av.open(str(parts[0][0])) as first:
            template = first.streams.video[0]
            vs = out.add_stream_from_template(template)
            vs.time_base = template.time_base
        passthrough = Passthrough(src, out, video_index, DEFAULTS[fmt][2], warnings.append)
        out.metadata.update({k: v for k, v in passthrough.src.metadata.items()
                             if k.lower() not in ("major_brand", "minor_version", "compatible_brands", "encoder")})
        last_dts = None
        for part, origin in parts:
            with av.open(str(part)) as c:
                for p in c.demux(c.streams.video[0]):
                    if not p.size:
                        continue
                    shift = origin * time_base / p.time_base
                    if shift.denominator != 1:
                        raise RuntimeError(f"{part.name}: time base {p.time_base} cannot hold the source's")
                    p.pts += int(shift)
                    if p.dts is not None:
                        p.dts += int(shift)
                    if last_dts is not None and p.dts is not None and p.dts <= last_dts:
                        raise RuntimeError(f"{part.name}: decode timestamps go back at the join ({p.dts})")
                    last_dts = p.dts
                    p.stream = vs
                    out.mux(p)
                    frames += 1
                    passthrough.pump(float(p.pts * p.time_base))
        passthrough.finish()
        passthrough.close()
        out.close()
        os.replace(tmp, dest)
    except BaseException:
        for closing in (passthrough, out):
            try:
                if closing is not None:
                    closing.close()
            except Exception:  # already failing: the temporary file goes either way
                pass
        tmp.unlink(missing_ok=True)
        raise
    return frames, warnings


def join_frames(parts: list[Path], dest: Path, frames: int) -> int:
    """Move the segments' PNG frames (each folder numbered from its place in the whole) into one folder and rename
    that onto `dest`, atomic as a single process's sequence is; returns the frame count, which must be `frames`
    numbered 1..frames without a gap."""
    from .media.writer import PNG_PATTERN, check_png_folder, commit_folder, temp_beside

    check_png_folder(dest)
    tmp = temp_beside(dest, folder=True)
    try:
        names = [f.name for part in parts for f in part.iterdir()]
        if sorted(names) != sorted(PNG_PATTERN % i for i in range(1, frames + 1)):
            raise RuntimeError(f"the segments hold {len(names)} frames, not frames 1 to {frames}")
        for part in parts:
            for f in part.iterdir():
                os.replace(f, tmp / f.name)
        commit_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return frames


def temporaries(dest: Path) -> list[Path]:
    """Every hidden name this job's output can have left beside it: the writer's, the join's, the segments'."""
    d, name = dest.parent, glob.escape(dest.name)
    return [Path(p) for pattern in (f".{name}.*.part", f".{name}.*.seg*", f"..{name}.*.seg*")
            for p in glob.glob(str(d / pattern))]


def remove(path: Path) -> None:
    """A temporary file, or folder (PNG segments), gone."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(dests) -> None:
    for dest in dests:
        for p in temporaries(Path(dest)):
            remove(p)


# -- the command (driver)


@dataclass
class FileRun:
    """One input on its way through the cluster: its jobs (one, or one per segment) and their results."""

    src: Path
    dest: Path
    jobs: list[Job]
    probe: Probe | None
    png: bool  # a PNG sequence: segments are folders of frames, joined by moving the files
    results: dict[int, dict] = field(default_factory=dict)
    summary: Summary | None = None


class ClusterProgress:
    """One bar for the whole job: frames done / total, fps, ETA and workers busy (tqdm on a terminal, a plain
    line every `interval` seconds otherwise, nothing when quiet)."""

    def __init__(self, total: int, workers: int, quiet: bool, interval: float = 5.0):
        self.total, self.workers, self.quiet, self.interval = total, workers, quiet, interval
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, desc="cluster", unit="frame", dynamic_ncols=True, leave=False)

    def update(self, done: int, busy: int) -> None:
        done = min(done, self.total) if self.total else done
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix_str(f"{busy}/{self.workers} workers busy", refresh=False)
        self.done = done
        now = time.monotonic()
        if self.bar is None and not self.quiet and now - self.last >= self.interval:
            self.last = now
            fps = done / max(now - self.start, 1e-9)
            eta = f"{max(self.total - done, 0) / fps:.0f} s" if fps > 0 else "?"
            print(f"cluster: {done}/{self.total} frames, {fps:.1f} fps, ETA {eta}, "
                  f"{busy}/{self.workers} workers busy", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check(args, pairs) -> dict[Path, str]:
    """Every option and output checked before Ray starts; the background text for each output."""
    from .engine.composite import parse_background
    from .media.writer import alpha_capable, check_png_folder, is_png_sequence, plan

    if not 0.0 <= args.smoothing <= 1.0:
        raise ValueError(f"--smoothing must be within 0..1, got {args.smoothing}")
    if args.retries < 0 or args.segment_seconds <= 0 or args.cluster_cpus <= 0 or args.cluster_workers < 0:
        raise ValueError("--retries and --cluster-workers must be >= 0, --segment-seconds and --cluster-cpus > 0")
    backgrounds = {}
    for _, out in pairs:
        text = args.background or ("transparent" if alpha_capable(out) else DEFAULT_COLOR)
        bg = parse_background(text)
        check_video_background(bg)
        plan(out, "gray" if args.mask else ("rgba" if bg.kind == "transparent" else "rgb"), 2, 2, args.codec, args.crf)
        if is_png_sequence(out):  # now, not when the segments are joined after all the work
            check_png_folder(out)
        backgrounds[out] = text
    return backgrounds


def _plan(args, pairs, backgrounds, token: str, workers: int) -> list[FileRun]:
    """The jobs: a file whole, or its segments when it is longer than --segment-seconds and there are workers to
    share them (one worker gains nothing from segments and would pay their run-ins and the join). A PNG sequence's
    segments are hidden folders, made here so the writer sees folders, numbered from each one's place."""
    from .media.writer import is_png_sequence

    options = {"mask": args.mask, "smoothing": args.smoothing, "decontaminate": args.decontaminate,
               "codec": args.codec, "crf": args.crf, "allow_truncated": getattr(args, "allow_truncated", False)}
    runs, n = [], 0
    for src, dest in pairs:
        p = probe(src)
        png = is_png_sequence(dest)
        segments = plan_segments(p, args.segment_seconds) if p and workers > 1 else []
        jobs = []
        for seg in segments or [None]:
            part = dest if seg is None else dest.parent / f".{dest.name}.{token}.seg{seg.index:04d}{dest.suffix}"
            if seg is not None and png:
                part.mkdir(parents=True)
            jobs.append(Job(n, str(src), str(part), backgrounds[dest], options, seg))
            n += 1
        runs.append(FileRun(src, dest, jobs, p, png))
    return runs


def _connect(ray, args) -> bool:
    """Join the cluster at ADDRESS (or RAY_ADDRESS), or start a local one; True when we started it."""
    if ray.is_initialized():  # a caller's own Ray (tests, notebooks)
        return False
    address = None if args.cluster == "auto" else args.cluster
    quiet = {"log_to_driver": bool(getattr(args, "verbose", False)), "logging_level": "ERROR"}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, **quiet)
        return True
    ray.init(address=address, **quiet)
    return False


def _workers(ray, args, tally: str) -> list:
    """The actors: one GPU each where the cluster has GPUs (and --device allows), else --cluster-cpus each."""
    res = ray.cluster_resources()
    gpus = 0 if args.device == "cpu" else int(res.get("GPU", 0))
    n = args.cluster_workers or (gpus or max(1, int(res.get("CPU", 1) // args.cluster_cpus)))
    model = {k: getattr(args, k, None) for k in MODEL_OPTIONS}
    cls = ray.remote(Worker).options(num_gpus=1 if gpus else 0, num_cpus=args.cluster_cpus, max_restarts=-1,
                                     max_task_retries=args.retries)
    return [cls.remote(i, model, args.batch, None if gpus else args.cluster_cpus, tally) for i in range(n)]


def _join(run: FileRun) -> tuple[int, list[str]]:
    """A segmented file's parts joined at its output: (frames, warnings)."""
    if run.png:
        from .media.writer import dropped_streams

        frames = join_frames([Path(j.dest) for j in run.jobs], run.dest, sum(j.segment.frames for j in run.jobs))
        return frames, dropped_streams(str(run.src), run.probe.video_index)
    parts = [(Path(j.dest), segment_origin(j.dest, j.segment)) for j in run.jobs]
    return join_segments(parts, run.dest, str(run.src), run.probe.video_index, run.probe.time_base)


def _finish_file(run: FileRun) -> Summary:
    """All of a file's jobs are back: its summary; segments joined (or discarded when one failed)."""
    res = [run.results[j.id] for j in run.jobs]
    bad = next((r for r in res if r["status"] != "ok"), None)
    if bad is None and run.jobs[0].segment is not None:
        short = next((j for j, r in zip(run.jobs, res) if r["frames_out"] != j.segment.frames), None)
        if short is not None:
            bad = {"status": "error", "error": f"{run.src}: segment {short.segment.index} gave "
                   f"{run.results[short.id]['frames_out']} of {short.segment.frames} frames"}
        else:
            try:
                frames, warnings = _join(run)
            except (RuntimeError, OSError, ValueError, av.error.FFmpegError) as exc:
                bad = {"status": "error", "error": f"{run.src}: joining the segments: {exc}"}
            else:
                # From its first segment's start (worker clocks) to the end of the join: the file's wall time.
                seconds = round(time.time() - min(r["started"] for r in res), 3)
                s = Summary(str(run.src), str(run.dest), frames_in=sum(r["frames_in"] for r in res),
                            frames_out=frames, seconds=seconds, warnings=res[0].get("warnings", []) + warnings)
    if run.jobs[0].segment is not None:
        for j in run.jobs:
            remove(Path(j.dest))
    if bad is not None:
        text = bad["error"] if str(bad["error"]).startswith(str(run.src)) else f"{run.src}: {bad['error']}"
        print(f"error: {text}", file=sys.stderr)
        return Summary(str(run.src), None, status=bad["status"], error=str(bad["error"]))
    if run.jobs[0].segment is None:
        r = res[0]
        s = Summary(str(run.src), str(run.dest), frames_in=r["frames_in"], frames_out=r["frames_out"],
                    seconds=r["seconds"], warnings=r["warnings"])
    s.fps = round(s.frames_out / max(s.seconds, 1e-9), 2)
    return s


def _drive(ray, pool, runs: list[FileRun], tally, progress: ClusterProgress, retries: int
           ) -> tuple[dict[int, int], float | None]:
    """Submit every job to the pool and collect results as they come; returns the frames written per worker and
    when (wall clock) the first worker was ready."""
    owner = {j.id: r for r in runs for j in r.jobs}
    for r in runs:
        for j in r.jobs:
            pool.submit(lambda actor, job: actor.run.remote(job), j)
    per_worker: dict[int, int] = {}
    ready: float | None = None
    while pool.has_next():
        try:
            res = pool.get_next_unordered(timeout=0.5)
        except TimeoutError:
            progress.update(*ray.get(tally.state.remote()))
            continue
        except ray.exceptions.RayActorError:  # died more than --retries times on this job: the job fails below
            continue
        per_worker[res["worker"]] = per_worker.get(res["worker"], 0) + res.get("frames_out", 0)
        ready = min(ready or res["ready_at"], res["ready_at"])
        run = owner[res["job"]]
        run.results[res["job"]] = res
        if len(run.results) == len(run.jobs):
            run.summary = _finish_file(run)
        progress.update(*ray.get(tally.state.remote()))
    for run in runs:  # jobs whose worker kept dying
        if run.summary is None:
            for j in run.jobs:
                run.results.setdefault(j.id, {"status": "error", "frames_in": 0, "frames_out": 0,
                                              "error": f"worker died {retries + 1} times"})
            run.summary = _finish_file(run)
    return per_worker, ready


def _stop(ray, actors) -> None:
    """Kill the workers and wait until they are gone, so nothing writes after the sweep."""
    for a in actors:
        ray.kill(a, no_restart=True)
    deadline = time.monotonic() + 10
    for a in actors:
        try:
            ray.get(a.pid.options(max_task_retries=0).remote(), timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # RayActorError once it is dead (the expected end), or a timeout
            pass


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: workers stopped, temporaries removed


def run_cli(args) -> int:
    ray = require_ray()
    from ray.util import ActorPool

    src, dest = Path(args.input), Path(args.output)
    if not src.exists():
        raise ValueError(f"{src}: no such file or folder")
    pairs = list_inputs(src, dest, getattr(args, "format", None))
    if not pairs:
        raise ValueError(f"{src}: no video files in it")
    backgrounds = _check(args, pairs)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    started, actors, progress, runs = False, [], None, []
    t0, wall0 = time.perf_counter(), time.time()
    try:
        started = _connect(ray, args)
        name = f"rmbg-tally-{secrets.token_hex(4)}"
        tally = ray.remote(Tally).options(num_cpus=0, name=name).remote()
        # The actors start (a process, torch, the model: seconds) while this process probes the inputs.
        actors = _workers(ray, args, name)
        runs = _plan(args, pairs, backgrounds, secrets.token_hex(4), len(actors))
        total = sum(len(r.probe.pts) for r in runs if r.probe)
        progress = ClusterProgress(total, len(actors), args.quiet)
        per_worker, ready = _drive(ray, ActorPool(actors), runs, tally, progress, args.retries)
    finally:
        if progress is not None:
            progress.close()
        if actors:
            _stop(ray, actors)
        sweep([dest for _, dest in pairs])
        if started:
            ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    startup = round(ready - wall0, 3) if ready is not None else None
    return _report(args, src, dest, [r.summary for r in runs], per_worker, time.perf_counter() - t0, startup)


def _report(args, src: Path, dest: Path, summaries: list[Summary], per_worker: dict[int, int],
            seconds: float, startup: float | None) -> int:
    """The failures listed, the --json summary printed; the exit status (as single-process mode). `startup`:
    seconds from the command's start (Ray connected or started) until the first worker had its model loaded."""
    failures = [s for s in summaries if s.status != "ok"]
    many = len(summaries) > 1 or src.is_dir()
    if many and failures:
        print(f"failed: {len(failures)} of {len(summaries)} files:", file=sys.stderr)
        for s in failures:
            print(f"  {s.input}: {s.error}", file=sys.stderr)
    if not args.quiet:
        for s in summaries:
            if s.status == "ok":
                print(f"{s.input} -> {s.output}: {s.frames_out} frames in {s.seconds:.1f} s ({s.fps:.1f} fps)",
                      file=sys.stderr)
    if args.json:
        workers = {f"worker-{k}": v for k, v in sorted(per_worker.items())}
        if many:
            frames = sum(s.frames_out for s in summaries)
            report = {"input": str(src), "output": str(dest), "status": "error" if failures else "ok",
                      "frames_in": sum(s.frames_in for s in summaries), "frames_out": frames,
                      "seconds": round(seconds, 3), "fps": round(frames / max(seconds, 1e-9), 2),
                      "files": [asdict(s) for s in summaries],
                      "failures": [{"input": s.input, "error": s.error} for s in failures], "workers": workers,
                      "startup_s": startup}
        else:
            report = asdict(summaries[0]) | {"workers": workers, "startup_s": startup}
        print(json.dumps(report))
    if not failures:
        return 0
    return 2 if not many and failures[0].status == "invalid" else 1
