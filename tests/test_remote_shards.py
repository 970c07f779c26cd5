"""`distill train --shards` from a URL (a local HTTP server started here) or a `pipe:` command: the manifest
read the same way, every streamed shard checked against its sha256 before use."""
import functools
import http.server
import shutil
import threading

import pytest

from dfkd.common.errors import UserError
from dfkd.common.remote import is_remote, join
from dfkd.common.shards import read_manifest, shard_paths
from dfkd.distill.train import TrainConfig, train
from dfkd.synth.generate import GenerateConfig, generate


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory, tiny_teacher_path):
    out = tmp_path_factory.mktemp("remote") / "shards"
    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out), method="noise",
                            num_images=60, shard_size=20, write_batch_size=20, progress=False))
    return out


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 (random port) serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _config(shards, out, **kw):
    base = dict(shards=shards, student="lenet5_half", out=str(out), epochs=1, batch_size_per_rank=10, workers=0,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_locations():
    assert is_remote("http://h/x") and is_remote("https://h/x/") and is_remote("pipe:cat x")
    assert not is_remote("shards/mnist") and not is_remote("/data/shards")
    assert join("http://h/s/", "manifest.json") == "http://h/s/manifest.json"
    assert join("pipe:aws s3 cp s3://b/s/{name} -", "shard-000000.tar") == "pipe:aws s3 cp s3://b/s/shard-000000.tar -"


def test_train_from_http_and_pipe(shard_folder, server, tmp_path):
    root, url = server
    shutil.copytree(shard_folder, root / "shards")
    manifest = read_manifest(f"{url}/shards")
    assert manifest.num_samples == 60
    assert shard_paths(f"{url}/shards/", manifest)[0] == f"{url}/shards/shard-000000.tar"
    metrics = train(_config(f"{url}/shards/", tmp_path / "http"))
    assert metrics["steps"] == 6 and metrics["skipped_shards"] == 0
    metrics = train(_config(f"pipe:cat {shard_folder}/{{name}}", tmp_path / "pipe", workers=1))
    assert metrics["steps"] == 6
    from click.testing import CliRunner

    from dfkd.distill.cli import main

    result = CliRunner().invoke(main, ["train", "--shards", f"{url}/shards/", "--student", "lenet5_half", "--out",
                                       str(tmp_path / "cli"), "--epochs", "1", "--batch-size-per-rank", "10",
                                       "--workers", "2", "--threads", "1", "--quiet"])
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1].startswith("done: "), result.output


def test_flipped_byte_in_a_streamed_shard_is_caught(shard_folder, server, tmp_path):
    root, url = server
    shutil.copytree(shard_folder, root / "shards")
    shard = root / "shards" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first sample's image bytes: the tar itself still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard-000001.tar sha256 of the streamed bytes differs"):
        train(_config(f"{url}/shards", tmp_path / "stop"))
    metrics = train(_config(f"{url}/shards", tmp_path / "skip", on_bad_shard="skip"))
    assert metrics["steps"] == 6  # the epoch is filled from the two good shards


def test_unreachable_manifest_is_a_one_line_error(server, tmp_path):
    _, url = server
    with pytest.raises(UserError, match="cannot read the manifest at .*/nothing/manifest.json"):
        train(_config(f"{url}/nothing", tmp_path / "x"))


def _closed_port() -> int:
    """A local port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_failures_name_the_url_and_the_status(shard_folder, server, tmp_path):
    """A 404, a closed port, a failing pipe: the address and what went wrong, not the internal call."""
    root, url = server
    closed = f"http://127.0.0.1:{_closed_port()}/shards/"
    for location, reason in ((f"{url}/nothing/", "HTTP 404 File not found"), (closed, "connection refused"),
                             ("pipe:exit 3 {name}", "the command exited with status 3")):
        with pytest.raises(UserError) as error:
            train(_config(location, tmp_path / "x"))
        message = error.value.message
        assert f"cannot read the manifest at {join(location, 'manifest.json')} ({reason})" in message, message
        assert "curl" not in message and "[" not in message and "bufsize" not in message, message
    shutil.copytree(shard_folder, root / "shards")
    (root / "shards" / "shard-000001.tar").unlink()   # listed in the manifest, gone from the server
    with pytest.raises(UserError) as error:
        train(_config(f"{url}/shards/", tmp_path / "y"))
    assert f"shard-000001.tar cannot be streamed from {url}/shards/shard-000001.tar (HTTP 404 File not found)" in \
        error.value.message
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_weights_download_failure_names_the_url_and_the_status(server, tmp_path, monkeypatch):
    """torchvision's pretrained weights from an address that answers 404, or from a closed port."""
    from torchvision.models._api import WeightsEnum

    from dfkd.common.models import create_model

    _, url = server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # nothing cached
    for address, reason in ((f"{url}/weights/r18.pth", "HTTP 404 File not found"),
                            (f"http://127.0.0.1:{_closed_port()}/r18.pth", "connection refused")):
        monkeypatch.setattr(WeightsEnum, "url", property(lambda self, address=address: address))
        with pytest.raises(UserError) as error:
            create_model("resnet18", weights="DEFAULT")
        assert f"could not download resnet18 weights IMAGENET1K_V1 from {address} ({reason})" in error.value.message
        assert "urlopen" not in error.value.message and "<" not in error.value.message, error.value.message


# --------------------------------------------------------------------------- a flaky object store
def _fault_server_module():
    """pipelines/fault_server.py: the local HTTP server that injects network faults (shared with
    pipelines/faults_streamed.py)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pipelines" / "fault_server.py"
    spec = importlib.util.spec_from_file_location("fault_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fault_server = _fault_server_module()


@pytest.fixture
def quick_retries(monkeypatch):
    """Waits between attempts of 10 ms instead of 1 s, 2 s, ... (the server's Retry-After still counts)."""
    from dfkd.common import remote

    monkeypatch.setattr(remote, "FIRST_WAIT", 0.01)


def _same_student(a, b) -> bool:
    import torch

    from dfkd.common.models import load_model_checkpoint

    x, y = (load_model_checkpoint(p / "student.pt")["state_dict"] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_transient_faults_are_retried_to_the_same_student(shard_folder, tmp_path, quick_retries, capfd):
    """A connection dropped mid-body, a body cut short, a 503, a stall past the read timeout, a reset:
    each shard fetched again from its start, the student bit-identical to one trained from the files."""
    faults = {"shard-000000.tar": ["drop", "503"], "shard-000001.tar": ["stall", "reset"],
              "shard-000002.tar": ["truncate"]}
    train(_config(str(shard_folder), tmp_path / "local", epochs=2))
    with fault_server.FaultServer(shard_folder, fault_server.scripted(faults), stall_s=1.0) as server:
        metrics = train(_config(server.url + "/", tmp_path / "streamed", epochs=2, shard_read_timeout=0.3))
    assert sum(server.injected.values()) == 5 and set(server.injected) == set(fault_server.TRANSIENT_KINDS)
    assert metrics["skipped_shards"] == 0 and _same_student(tmp_path / "streamed", tmp_path / "local")
    assert (tmp_path / "streamed" / "metrics.csv").read_text().count("\n") == 3
    err = capfd.readouterr().err
    assert "shard-000001.tar: attempt 1 of 6 failed (no data for 0.3 s (read timeout))" in err, err
    assert "shard-000000.tar: attempt 2 of 6 failed (HTTP 503 Service Unavailable); retrying" in err, err


def test_a_shard_that_keeps_failing_names_the_url_the_attempts_and_skip(shard_folder, tmp_path, quick_retries):
    faults = {"shard-000001.tar": ["503", "reset", "drop", "reset", "stall", "truncate"]}
    with fault_server.FaultServer(shard_folder, fault_server.scripted(faults)) as server:
        with pytest.raises(UserError) as error:
            train(_config(server.url + "/", tmp_path / "stop", shard_attempts=3))
        message = error.value.message
        assert (f"shard-000001.tar cannot be streamed from {server.url}/shard-000001.tar: 3 attempt(s) in " in message
                and "failed (last: the connection closed before the end of the body after " in message), message
        assert "pass --on-bad-shard skip to train without it" in message and "\n" not in message, message
        assert server.requests["shard-000001.tar"] == 3 and not (tmp_path / "stop").exists()
        # the time bound: no second try starts after --shard-retry-seconds
        with pytest.raises(UserError, match=r"shard-000001.tar cannot be streamed .*: 1 attempt\(s\) in 0 s failed"):
            train(_config(server.url + "/", tmp_path / "stop", shard_attempts=5, shard_retry_seconds=0))
        metrics = train(_config(server.url + "/", tmp_path / "skip", shard_attempts=1, shard_read_timeout=0.3,
                                on_bad_shard="skip"))
    assert metrics["skipped_shards"] == 0 and metrics["steps"] == 6  # the epoch is filled from the other two


def test_a_changed_shard_is_never_retried_into_success(shard_folder, tmp_path, quick_retries):
    """Bytes that arrive whole but differ from the manifest are what the store holds: not asked for again."""
    faults = {"shard-000002.tar": ["changed"] * 6}
    with fault_server.FaultServer(shard_folder, fault_server.scripted(faults)) as server:
        with pytest.raises(UserError, match=r"shard-000002.tar sha256 of the streamed bytes differs from the manifest"):
            train(_config(server.url + "/", tmp_path / "stop"))
        assert server.requests["shard-000002.tar"] == 1 and server.injected == {"changed": 1}
