import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture
def load_pipeline(monkeypatch):
    """load_pipeline(name): pipelines/<name>.py as a module, as it runs as a script: its folder on sys.path (a
    pipeline imports the ones beside it) and itself registered while the test runs (its dataclasses look it up)."""
    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def killed_at_epoch(monkeypatch):
    """`with killed_at_epoch(n) as epochs: train(...)`: the n-th epoch the training starts raises KeyboardInterrupt
    (a kill between epochs: the epochs before it finished), which the block expects; `epochs` lists the epochs
    started. After the block training runs as usual."""
    import dfkd.distill.train as train_module

    @contextlib.contextmanager
    def killed(n: int):
        real, started = train_module.train_one_epoch, []

        def interrupted(*args, **kwargs):
            started.append(kwargs.get("epoch", args[5] if len(args) > 5 else None))
            if len(started) == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield started
        finally:
            monkeypatch.setattr(train_module, "train_one_epoch", real)

    return killed
