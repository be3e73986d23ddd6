import os
import signal

import pytest

# Same reason as in rmbg_stream/__init__.py; test modules may import torch before the package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Under pytest-xdist every worker shares the cores: torch's own threads per worker would multiply past them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# A shell without job control starts background commands (`.ci/run &`) with SIGINT ignored, and every process
# they start inherits that: the tests that press Ctrl-C on a subprocess would see it finish with 0. Run as from a
# terminal instead, where Ctrl-C interrupts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def onnx_cache(tmp_path_factory):
    """Checkpoints exported for --runtime onnx (or auto on the CPU) go to a folder of the test session, not ~/.cache."""
    os.environ["RMBG_ONNX_CACHE"] = str(tmp_path_factory.mktemp("onnx-cache"))
