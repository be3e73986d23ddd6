#!/usr/bin/env bash
# One command for the day a GPU is there (issue 13 item 5): the CUDA tests under the stream sanitizer, conformance
# in fp32/fp16/bf16, bench_model for Swin-L at 1024 per runtime and precision, bench_engine, bench_live (4 sessions,
# random:swin_v1_t at 512), the engine under set_sync_debug_mode("error") and on cuda:1 where there is one.
# Prints one JSON object: {step: {"rc": ..., "seconds": ..., "result": last JSON line or null, "tail": ...}}.
#   scripts/gpu_check.sh            # on a CUDA machine, ~8 minutes on one H100/H200
#   scripts/gpu_check.sh --cpu      # dry run: the same steps on the CPU at tiny sizes, to know it starts
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" - "$@" <<'PYEOF'
import json, subprocess, sys, time

cpu = "--cpu" in sys.argv[1:]
steps = {}


def run(name, cmd, timeout, env=None):
    import os
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    result = None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except ValueError:
                pass
    steps[name] = {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "result": result, "tail": out[-600:]}
    return rc, out


py = sys.executable
if cpu:
    run("tests_sim", [py, "-m", "pytest", "-q", "tests/test_cuda_sim.py"], 120)
    run("bench_model_eager_fp32", [py, "scripts/bench_model.py", "--backbone", "swin_v1_t", "--size", "64",
                                   "--device", "cpu", "--precision", "fp32", "--warmup", "0", "--iters", "1",
                                   "--runtime", "eager"], 120)
    if "unrecognized arguments: --runtime" in steps["bench_model_eager_fp32"]["tail"]:
        run("bench_model_eager_fp32", [py, "scripts/bench_model.py", "--backbone", "swin_v1_t", "--size", "64",
                                       "--device", "cpu", "--precision", "fp32", "--warmup", "0", "--iters", "1"], 120)
    run("bench_engine", [py, "scripts/bench_engine.py", "--backbone", "swin_v1_t", "--size", "64", "--batch", "2",
                         "--device", "cpu", "--frames", "2", "--frame-size", "96x64", "--warmup", "0", "--rounds", "1"],
        180)
    run("bench_live", [py, "scripts/bench_live.py", "--sessions", "1", "--seconds", "2", "--warmup", "1",
                       "--model", "chroma", "--device", "cpu", "--size", "320x240"], 120)
else:
    run("tests_cuda_sanitizer", [py, "-m", "pytest", "-q", "-m", "cuda", "tests"], 150, {"TORCH_CUDA_SANITIZER": "1"})
    run("tests_sim", [py, "-m", "pytest", "-q", "tests/test_cuda_sim.py"], 60)
    run("conformance_fp32_fp16_bf16", [py, "-m", "pytest", "-q", "tests/test_birefnet.py", "-k", "cuda"], 60)
    for rt in ("eager", "compile", "onnx"):
        for prec in ("fp32", "fp16", "bf16"):
            rc, out = run(f"bench_model_{rt}_{prec}", [py, "scripts/bench_model.py", "--backbone", "swin_v1_l",
                                                       "--size", "1024", "--precision", prec, "--iters", "10",
                                                       "--runtime", rt], 90)
            if "unrecognized arguments: --runtime" in out:
                steps.pop(f"bench_model_{rt}_{prec}")
                if rt == "eager":
                    run(f"bench_model_{rt}_{prec}", [py, "scripts/bench_model.py", "--backbone", "swin_v1_l",
                                                     "--size", "1024", "--precision", prec, "--iters", "10"], 90)
    run("bench_engine", [py, "scripts/bench_engine.py", "--frames", "60", "--rounds", "2"], 120)
    run("bench_live", [py, "scripts/bench_live.py", "--sessions", "4", "--seconds", "15", "--model",
                       "random:swin_v1_t", "--device", "cuda", "--server-arg=--resolution", "--server-arg=512"], 120)
    probe = """
import json, sys, threading, numpy as np, torch
from rmbg_stream.engine.backends import create_backend
from rmbg_stream.engine.engine import Engine
out = {}
for dev in ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else []):
    b = create_backend("random:swin_v1_t", torch.device(dev), resolution=(256, 256))
    with Engine(b, max_batch=2) as e:
        s = e.open_stream(live=False)
        f = np.random.default_rng(0).integers(0, 256, (181, 243, 3), dtype=np.uint8)
        s.submit(f); s.get(timeout=120)  # warm-up batch, outside the debug mode
        torch.cuda.set_sync_debug_mode("error")
        try:
            s.submit(f); r = s.get(timeout=120)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out[dev] = {"ok": r.image is not None, "gpu0_mb": torch.cuda.memory_allocated(0) >> 20}
print(json.dumps(out))
"""
    run("engine_sync_debug_and_cuda1", [py, "-c", probe], 120)

print(json.dumps({"mode": "cpu-dry-run" if cpu else "cuda", "ok": all(s["rc"] == 0 for s in steps.values()),
                  "steps": steps}))
PYEOF
