"""What every test process shares."""

import os

import torch

# pytest-xdist runs test files in as many processes as there are cores: intra-op threads in
# each would take the same cores, and OpenMP's spinning then makes every forward pass many
# times slower. Processes the tests start inherit one thread too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
