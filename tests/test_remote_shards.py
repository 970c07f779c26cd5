"""`distill train --shards` from a URL (a local HTTP server started here) or a `pipe:` command: the manifest
read the same way, every streamed shard checked against its sha256 before use."""
import functools
import http.server
import shutil
import threading

import pytest

from common.errors import UserError
from common.remote import is_remote, join
from common.shards import read_manifest, shard_paths
from distill.train import TrainConfig, train
from synth.generate import GenerateConfig, generate


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

    from distill.cli import main

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
