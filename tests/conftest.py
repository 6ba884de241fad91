"""Fixtures shared by the test modules."""
from __future__ import annotations

import tempfile

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One intra-op thread, as the training subprocesses get from OMP_NUM_THREADS=1 (faster at these tiny
    sizes on a shared 2-core machine, and bit-equality between processes needs the same thread count);
    the global determinism flag a run sets is undone afterwards."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def system_temp_inside_pytest_folder(tmp_path_factory):
    """What tests and their subprocesses write to the system temp folder (torchrun's torchelastic_*,
    DataLoader workers' pymp-*) lands under pytest's base folder, which pytest removes after a passing
    run, instead of piling up in /tmp."""
    folder = tmp_path_factory.mktemp("system-temp")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(folder))
    patch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    patch.undo()
