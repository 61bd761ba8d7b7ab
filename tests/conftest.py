"""Session setup shared by the test modules.

Without a GPU, Triton kernels run in Triton's CPU interpreter. `triton.jit` reads TRITON_INTERPRET
when a kernel is decorated, i.e. when `model.kernels.*` is first imported, so it is set here, before
any test module imports them. Nothing else reads it: torch-path tests are unaffected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
