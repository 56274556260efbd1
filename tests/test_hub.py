"""Published weights by name (vggjax.convert.hub): fetched from a loopback server standing in for
download.pytorch.org, Google Cloud Storage and the Hugging Face Hub, verified, cached, converted once.

The files are narrow nets written in the published layouts (convert_files.py). Their checksums
cannot be the published ones, so each test points the table's entry at its own file's checksum;
VGGJAX_WEIGHTS_MIRROR sends every official URL to the server. Nothing here leaves 127.0.0.1.
"""

import dataclasses
import hashlib
import http.server
import io
import os
import sys
import threading
import types
import urllib.parse

import pytest
import safetensors.numpy
from convert_files import (
    CFG,
    NARROW,
    images,
    keras_layers,
    nchw_forward,
    relative_difference,
    timm_state,
    torchvision_state,
    write_keras_h5,
    write_torch,
)
from helpers import load_config

import vggjax
from vggjax import convert, pretrained
from vggjax.convert import hub
from vggjax.errors import UserError


def test_the_table_holds_the_published_files():
    tv = hub.WEIGHTS["torchvision", "vgg16"]
    assert tv.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert (tv.algorithm, tv.checksum, tv.model) == ("sha256", "397923af", "vgg16")
    for (source, name), w in hub.WEIGHTS.items():
        if source == "torchvision":  # torch.hub checks the hex digits in the file name
            assert w.url.endswith(f"/{name}-{w.checksum}.pth")
        if source == "keras":  # keras.applications' file_hash: an MD5
            assert w.algorithm == "md5" and len(w.checksum) == 32
    assert {n for s, n in hub.WEIGHTS if s == "keras"} == {
        "vgg16",
        "vgg19",
        "vgg16_notop",
        "vgg19_notop",
    }
    assert len([1 for s, _ in hub.WEIGHTS if s == "torchvision"]) == 8
    assert hub.WEIGHTS["timm", "vgg19_bn.tv_in1k"].url == "timm/vgg19_bn.tv_in1k"


def test_torchvision_by_name_downloads_once_and_converts_once(
    tmp_path, caches, server, monkeypatch, capsys
):
    state = torchvision_state(CFG["D"], **NARROW)
    _, path = _publish(server, monkeypatch, ("torchvision", "vgg16"), _torch_file(state))
    convert.main(["--from=torchvision", "vgg16", f"--output={tmp_path / 'cli'}"])
    cached = caches.torch / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert cached.is_file() and server.gets == {path: 1}
    assert f"from {cached}" in capsys.readouterr().out

    model, variables, preprocess = vggjax.load_pretrained("torchvision:vgg16")
    rgb = images(2, 64)
    logits = model.apply(variables, preprocess(rgb))
    assert relative_difference(logits, nchw_forward(state, CFG["D"], rgb)) < 1e-5
    assert server.gets == {path: 1}  # the CLI's download is reused, verified
    assert [p.name for p in (caches.vggjax / "pretrained").iterdir()] == [
        f"torchvision-vgg16-{hub.WEIGHTS['torchvision', 'vgg16'].checksum}"
    ]

    monkeypatch.setattr(convert, "convert", lambda *a: pytest.fail("converted twice"))
    monkeypatch.setattr(hub, "fetch", lambda *a: pytest.fail("fetched again"))
    model, variables, preprocess = vggjax.load_pretrained("torchvision:vgg16")
    assert relative_difference(model.apply(variables, preprocess(rgb)), logits) == 0


def test_init_from_takes_a_published_name(tmp_path, caches, server, monkeypatch):
    """Fine-tuning from `--config.init_from=torchvision:vgg16`: the name becomes the converted
    workdir, whose net (model "") the config then describes."""
    state = torchvision_state(CFG["D"], **NARROW)
    _, path = _publish(server, monkeypatch, ("torchvision", "vgg16"), _torch_file(state))
    _, config = load_config("configs/finetune.py")
    config.init_from = "torchvision:vgg16"
    inherited = pretrained.inherit_net(config)
    assert os.path.isdir(inherited.init_from) and server.gets == {path: 1}
    assert (inherited.model, inherited.fc_width, inherited.crop_size) == ("D", 16, 64)
    assert inherited.mean_rgb == pytest.approx((123.675, 116.28, 103.53))
    assert config.init_from == "torchvision:vgg16"  # the caller's config is left as it was


def test_a_corrupted_download_is_deleted_and_named(tmp_path, caches, server, monkeypatch, capsys):
    data = _torch_file(torchvision_state(CFG["D"], **NARROW))
    bad = data[:-8] + b"\0" * 8
    entry, _ = _publish(server, monkeypatch, ("torchvision", "vgg16"), data, served=bad)
    argv = ["--from=torchvision", "vgg16", f"--output={tmp_path / 'o'}"]
    line = _one_line_error(capsys, argv)
    cached = caches.torch / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert f"{cached} failed its checksum" in line and f"published {entry.checksum}" in line
    assert os.listdir(cached.parent) == []  # nothing kept, not even a partial file
    assert not (tmp_path / "o").exists()


def test_a_cut_off_download_leaves_nothing_and_a_rerun_completes(
    tmp_path, caches, server, monkeypatch, capsys
):
    _, path = _publish(
        server,
        monkeypatch,
        ("torchvision", "vgg16"),
        _torch_file(torchvision_state(CFG["D"], **NARROW)),
    )
    server.cut.add(path)
    argv = ["--from=torchvision", "vgg16", f"--output={tmp_path / 'o'}"]
    assert "was cut off after" in _one_line_error(capsys, argv)
    folder = caches.torch / "hub" / "checkpoints"
    assert os.listdir(folder) == []
    server.cut.clear()
    convert.main(argv)
    assert os.listdir(folder) == ["vgg16-397923af.pth"] and server.gets == {path: 2}


def test_a_bad_cached_file_is_fetched_again(tmp_path, caches, server, monkeypatch, capsys):
    data = _torch_file(torchvision_state(CFG["D"], **NARROW))
    _, path = _publish(server, monkeypatch, ("torchvision", "vgg16"), data)
    cached = caches.torch / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data[: len(data) // 2])  # what a cut-off copy by another tool looks like
    convert.main(["--from=torchvision", "vgg16", f"--output={tmp_path / 'o'}"])
    assert "fails its checksum; downloading it again" in capsys.readouterr().err
    assert cached.read_bytes() == data and server.gets == {path: 1}


def test_keras_notop_by_name_lands_in_keras_cache(tmp_path, caches, server, monkeypatch):
    h5 = tmp_path / "notop.h5"
    write_keras_h5(h5, keras_layers(CFG["D"], divisor=16, top=False))
    _publish(server, monkeypatch, ("keras", "vgg16_notop"), h5.read_bytes())
    model, variables, preprocess = vggjax.load_pretrained("keras:vgg16_notop")
    assert (caches.keras / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").is_file()
    assert set(variables["params"]) == {
        layer.name for layer in model.layers if layer.kind == "conv"
    }
    config = vggjax.pretrained.read_config(hub.converted("keras", "vgg16_notop"))
    assert config["mean_rgb"] == [123.68, 116.779, 103.939]
    assert config["pretrained"]["include_top"] is False


def test_unknown_names_and_bad_mirrors_are_one_line(tmp_path, caches, monkeypatch, capsys):
    out = f"--output={tmp_path / 'o'}"
    line = _one_line_error(capsys, ["--from=torchvision", "vgg17", out])
    assert "vgg17 is neither a file nor a published torchvision net (vgg11, vgg13" in line
    line = _one_line_error(capsys, ["--from=caffe", "vgg16", out])
    assert "--from=caffe has no published names" in line
    line = _one_line_error(capsys, ["--from=torchvision", "nope.pth", "--model=D", out])
    assert "cannot read nope.pth" in line  # a missing file is not taken for a name
    monkeypatch.setenv(hub.MIRROR_ENV, "127.0.0.1:8000")
    line = _one_line_error(capsys, ["--from=keras", "vgg19", out])
    assert "VGGJAX_WEIGHTS_MIRROR must be a URL like http://HOST:PORT" in line
    monkeypatch.setenv(hub.MIRROR_ENV, "http://127.0.0.1:9")  # nothing listens on the discard port
    line = _one_line_error(capsys, ["--from=keras", "vgg19", out])
    assert line.startswith("vggjax.convert: error: cannot download http://127.0.0.1:9/tensorflow/")


# timm, through huggingface_hub ---------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _serve_on_hub(server, name: str, data: bytes, etag: str) -> str:
    """The Hub's resolve URL of timm/<name>/model.safetensors, with the headers
    huggingface_hub reads: the commit, the LFS file's SHA-256 as its ETag."""
    path = f"/timm/{name}/resolve/main/{hub.TIMM_FILE}"
    server.files[path] = data
    server.headers[path] = {"X-Repo-Commit": "0" * 40, "ETag": f'"{etag}"'}
    return path


def test_timm_by_name_through_the_hub(tmp_path, caches, server, hf_cache):
    state = torchvision_state(CFG["D"], **NARROW)
    data = safetensors.numpy.save(timm_state(state, 32, 2))
    path = _serve_on_hub(server, "vgg16.tv_in1k", data, hashlib.sha256(data).hexdigest())
    model, variables, preprocess = vggjax.load_pretrained("timm:vgg16.tv_in1k")
    rgb = images(2, 64)
    logits = model.apply(variables, preprocess(rgb))
    assert relative_difference(logits, nchw_forward(state, CFG["D"], rgb)) < 1e-5
    convert.main(["--from=timm", "vgg16.tv_in1k", f"--output={tmp_path / 'o'}"])
    assert server.gets == {path: 1}  # the Hugging Face cache served the second
    assert any(hf_cache.rglob(hub.TIMM_FILE))


def test_timm_file_failing_the_hubs_checksum_is_deleted(tmp_path, caches, server, hf_cache, capsys):
    data = safetensors.numpy.save(timm_state(torchvision_state(CFG["D"], **NARROW), 32, 2))
    claimed = hashlib.sha256(b"another file").hexdigest()
    _serve_on_hub(server, "vgg16.tv_in1k", data, claimed)
    line = _one_line_error(capsys, ["--from=timm", "vgg16.tv_in1k", f"--output={tmp_path / 'o'}"])
    assert "failed its checksum" in line and f"published {claimed}" in line
    assert not list(hf_cache.rglob("blobs/*")) and not list(hf_cache.rglob(hub.TIMM_FILE))


def test_timm_without_huggingface_hub_says_what_to_install(monkeypatch, caches):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(UserError, match=r"pip install huggingface_hub"):
        hub.fetch(hub.WEIGHTS["timm", "vgg16.tv_in1k"])


def test_names_need_no_model_but_files_do(tmp_path):
    path = tmp_path / "w.pth"
    write_torch(path, torchvision_state(CFG["D"], **NARROW))
    assert hub.weight_file("torchvision", str(path), "D") == (str(path), "D")
    with pytest.raises(UserError, match="--model is required for a file"):
        hub.weight_file("torchvision", str(path), None)


# Helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def server():
    """A loopback HTTP server of `files` (URL path → bytes, extra headers in `headers`); `gets`
    counts the bodies sent; a path in `cut` sends half its body, then closes."""
    state = types.SimpleNamespace(files={}, headers={}, gets={}, cut=set())

    class Handler(http.server.BaseHTTPRequestHandler):
        def _respond(self, body: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path not in state.files:
                self.send_error(404)
                return
            data = state.files[path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            for key, value in state.headers.get(path, {}).items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                state.gets[path] = state.gets.get(path, 0) + 1
                self.wfile.write(data[: len(data) // 2] if path in state.cut else data)

        def do_GET(self):
            self._respond(body=True)

        def do_HEAD(self):
            self._respond(body=False)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_port}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def caches(tmp_path, monkeypatch, server):
    """Every cache in tmp_path, every official URL on the server."""
    paths = types.SimpleNamespace(
        torch=tmp_path / "torch", keras=tmp_path / "keras", vggjax=tmp_path / "vggjax"
    )
    monkeypatch.setenv("TORCH_HOME", str(paths.torch))
    monkeypatch.setenv("KERAS_HOME", str(paths.keras))
    monkeypatch.setenv("VGGJAX_CACHE", str(paths.vggjax))
    monkeypatch.setenv(hub.MIRROR_ENV, server.url)
    return paths


def _publish(server, monkeypatch, key, data: bytes, served: bytes | None = None):
    """Serves `served` (default `data`) at entry `key`'s URL path, the entry's checksum made
    `data`'s; returns the entry and its URL path."""
    entry = hub.WEIGHTS[key]
    digest = hashlib.new(entry.algorithm, data).hexdigest()
    entry = dataclasses.replace(entry, checksum=digest[: len(entry.checksum)])
    monkeypatch.setitem(hub.WEIGHTS, key, entry)
    path = urllib.parse.urlsplit(entry.url).path
    server.files[path] = data if served is None else served
    return entry, path


def _torch_file(state) -> bytes:
    buffer = io.BytesIO()
    write_torch(buffer, state)
    return buffer.getvalue()


def _one_line_error(capsys, argv) -> str:
    """The command's one error line, its last (a download's progress line may come before)."""
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("vggjax.convert: error: ")]
    assert e.value.code == 2 and errors == lines[-1:], lines
    assert all(line.startswith("Downloading http://127.0.0.1:") for line in lines[:-1]), lines
    return lines[-1]
