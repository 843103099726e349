"""Test-wide settings: one torch thread (the tiny models gain nothing from more, and the CI machine
has two cores that tests running subprocesses share)."""

import torch

torch.set_num_threads(1)
