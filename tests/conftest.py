import os

# Same reason as in rmbg_stream/__init__.py; test modules may import torch before the package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
