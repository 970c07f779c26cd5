import os

import pytest
import torch

# Tests run one per core (pipelines/test.sh: pytest-xdist): one thread each is faster than oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (CI does: .ci/run)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teacher_path(tmp_path_factory):
    """A lenet5 teacher with random weights and non-trivial BN running statistics, saved as a checkpoint."""
    from dfkd.common.models import create_model, save_model_checkpoint

    torch.manual_seed(0)
    model = create_model("lenet5")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28) * 0.8 - 0.2)
    path = tmp_path_factory.mktemp("teacher") / "lenet5.pt"
    save_model_checkpoint(path, model.eval())
    return path
