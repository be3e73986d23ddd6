import os

import pytest

# Same reason as in rmbg_stream/__init__.py; test modules may import torch before the package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True, scope="session")
def onnx_cache(tmp_path_factory):
    """Checkpoints exported for --runtime onnx (or auto on the CPU) go to a folder of the test session, not ~/.cache."""
    os.environ["RMBG_ONNX_CACHE"] = str(tmp_path_factory.mktemp("onnx-cache"))
