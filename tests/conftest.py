import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
SESSION_DIR = tempfile.mkdtemp(prefix="moekit-tests-")  # removed when the session ends
for var, sub in (("XDG_CACHE_HOME", "cache"),  # tokenised data of this run only
                 ("TMPDIR", "tmp")):  # child processes' temporary files (torchrun's logs); this process keeps its own
    os.environ[var] = os.path.join(SESSION_DIR, sub)
    os.mkdir(os.environ[var])
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `interpreted` run only under TRITON_INTERPRET=1 (a child process, see test_kernels_triton.py),
    and there nothing else runs."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    keep = [item for item in items if (item.get_closest_marker("interpreted") is not None) == interpreted]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture
def one_thread():
    """One intra-op thread (tests/helpers.py: single_thread) for the test."""
    from helpers import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def donors(tmp_path_factory):
    """(base, [code, prose, math]): a tiny Llama with its tokenizer and three few-step fine-tunes of it on different
    texts, saved with transformers (tests/helpers.py: donor_checkpoints)."""
    from helpers import donor_checkpoints, single_thread

    with single_thread():
        return donor_checkpoints(tmp_path_factory.mktemp("donors"))
