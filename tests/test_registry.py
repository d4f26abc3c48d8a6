"""The registry of published checkpoints, the model cache and `cxrtriage models`.

Downloads come from a local HTTP server on 127.0.0.1 (Range support, and
switches to misbehave); the registry's sizes and hashes are swapped for those
of small fixture files. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from cxrtriage import cli_models
from cxrtriage.config import InferenceSettings
from cxrtriage.inference import model_cache, registry
from cxrtriage.inference.model_cache import IntegrityError, ModelNotCached
from cxrtriage.inference.models import create_model, load_model
from cxrtriage.inference.presets import danilov2022, model_specs, preset_specs

FIXTURE = Path(__file__).parents[1] / "cxrtriage/inference/fixtures/published_checkpoint_keys.json"
LUNGS, DISEASE = registry.PAIRS["danilov2022"]
SMALL = "covid/PSPNet_efficientnet-b0"  # any entry; its size/hash are swapped for a fixture's


# --- a local HTTP server -------------------------------------------------------------------


class Server:
    """Serves ``files`` by URL path; can drop, truncate, corrupt, or ignore Range."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str | None]] = []
        self.drop_first_after: int | None = None  # close the 1st connection after this many body bytes
        self.ignore_range = False
        self.url = ""


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            from urllib.parse import unquote

            rng = self.headers.get("Range")
            state.requests.append({"path": self.path, "range": rng})
            body = state.files.get(unquote(self.path))
            if body is None:
                self.send_error(404)
                return
            start = 0
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if state.drop_first_after is not None and len(state.requests) == 1:
                self.wfile.write(payload[: state.drop_first_after])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees IncompleteRead
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache in tmp_path; no proxy between us and 127.0.0.1; no mirror set."""
    monkeypatch.setenv("CXRTRIAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(model_cache.BASE_URL_ENV, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return tmp_path / "cache" / "models"


def serve_as(server: Server, monkeypatch: pytest.MonkeyPatch, name: str, body: bytes, **changes: object) -> registry.RegistryEntry:
    """Put ``body`` on the server under ``name``'s path and make the registry expect exactly it."""
    entry = dataclasses.replace(
        registry.REGISTRY[name], size=len(body), sha256=hashlib.sha256(body).hexdigest(), **changes
    )
    monkeypatch.setitem(registry.REGISTRY, name, entry)
    server.files["/" + entry.path] = body
    return entry


def random_bytes(n: int, seed: int = 0) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


def leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


# --- the registry --------------------------------------------------------------------------


def test_registry_lists_the_18_published_checkpoints() -> None:
    entries = registry.REGISTRY
    assert len(entries) == 18
    assert sum(e.stage == "lungs" for e in entries.values()) == 9
    assert len({e.sha256 for e in entries.values()}) == 18
    lungs, disease = entries[LUNGS], entries[DISEASE]
    assert (lungs.arch, lungs.encoder, lungs.input_size, lungs.size) == ("DeepLabV3Plus", "efficientnet-b1", 512, 30133598)
    assert (disease.arch, disease.encoder, disease.input_size, disease.zone_threshold) == ("MAnet", "timm-regnetx_064", 544, 0.31)
    assert disease.path == "models/models_covid/MAnet_timm-regnetx_064_imagenet_050921_1102/weights.pth"
    for entry in entries.values():
        assert entry.name.startswith("lungs/" if entry.stage == "lungs" else "covid/")
        assert entry.classification_head == (entry.stage == "disease")
        assert (entry.zone_threshold is None) == (entry.stage == "lungs")
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        spec = entry.spec("/x.pth")
        assert spec.origin == "published" and spec.training_data == ("real",) and spec.weights == "/x.pth"
    assert entries["covid/Unet_dpn98"].spec(None).mean[0] == pytest.approx(124 / 255)  # DPN's own statistics
    assert entries["lungs/Unet_se_resnext101_32x4d"].input_size == 384


def test_registry_sizes_agree_with_the_recorded_layouts() -> None:
    """Published bytes = 4 bytes per fp32 value + 0.1-1.1 % pickle/zip overhead, for all 18."""
    layouts = json.loads(FIXTURE.read_text())
    assert set(layouts) == set(registry.REGISTRY)
    for name, layout in layouts.items():
        entry = registry.REGISTRY[name]
        values = sum(torch.Size(shape).numel() for shape in layout["keys"].values())
        assert 1.0 < entry.size / (4 * values) < 1.011, name
        assert (layout["arch"], layout["encoder"], layout["input_size"]) == (entry.arch, entry.encoder, entry.input_size)


def test_unknown_name_names_the_choices() -> None:
    with pytest.raises(registry.UnknownModel, match="danilov2022"):
        registry.expand("covid/SegFormer")
    assert [e.name for e in registry.expand("danilov2022")] == [LUNGS, DISEASE]


def test_base_url_default_env_and_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = registry.REGISTRY[LUNGS]
    assert model_cache.file_url(entry) == (
        "https://media.githubusercontent.com/media/ViacheslavDanilov/covid_scoring/master/"
        "models/models_lungs/DeepLabV3+_efficientnet-b1_imagenet_240821_2250/weights.pth"
    )
    monkeypatch.setenv(model_cache.BASE_URL_ENV, "http://mirror.local/covid_scoring/")
    assert model_cache.file_url(entry).startswith("http://mirror.local/covid_scoring/models/models_lungs/")
    assert model_cache.file_url(entry, "http://other").startswith("http://other/models/")


# --- pull ----------------------------------------------------------------------------------


def _legacy_state(spec) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """A state dict as smp < 0.5 saved it for a timm-regnet encoder (keys one level up)."""
    state = create_model(spec).state_dict()
    return {("encoder." + k.removeprefix("encoder.model.") if k.startswith("encoder.model.") else k): v for k, v in state.items()}


def test_pulled_pair_is_verified_and_loads_through_the_preset(
    server: Server, monkeypatch: pytest.MonkeyPatch, cache: Path, tmp_path: Path
) -> None:
    # Stage I: the exact layout of the published DeepLabV3+/efficientnet-b1 (30 MB of zeros).
    layout = json.loads(FIXTURE.read_text())[LUNGS]["keys"]
    torch.save({k: torch.zeros(shape) if shape else torch.tensor(0) for k, shape in layout.items()}, tmp_path / "l.pth")
    # Stage II: a small stand-in with a legacy timm-regnet encoder, saved in the old key layout.
    small = dataclasses.replace(registry.REGISTRY[DISEASE], arch="FPN", encoder="timm-regnetx_002", input_size=64)
    torch.save(_legacy_state(small.spec(None)), tmp_path / "d.pth")
    serve_as(server, monkeypatch, LUNGS, (tmp_path / "l.pth").read_bytes())
    serve_as(server, monkeypatch, DISEASE, (tmp_path / "d.pth").read_bytes(), arch="FPN",
             encoder="timm-regnetx_002", input_size=64)

    with pytest.raises(ModelNotCached):
        danilov2022()
    seen: list[tuple[int, int]] = []
    for entry in registry.expand("danilov2022"):
        model_cache.pull(entry, server.url, lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1]
    assert leftovers(cache) == ["covid/MAnet_timm-regnetx_064.pth", "lungs/DeepLabV3+_efficientnet-b1.pth"]

    lungs, disease = model_specs(InferenceSettings(preset="danilov2022"))
    assert Path(lungs.weights) == cache / "lungs/DeepLabV3+_efficientnet-b1.pth"
    assert disease.origin == "published" and disease.zone_threshold == pytest.approx(0.31)
    load_model(lungs)  # strict
    model = load_model(disease)  # strict, legacy keys remapped
    with torch.inference_mode():
        seg, cls = model(torch.zeros(1, 3, 64, 64))
    assert seg.shape == (1, 1, 64, 64) and cls.shape == (1, 1)
    assert all(r["path"].endswith("/weights.pth") for r in server.requests)


def test_corrupt_download_is_refused_and_nothing_is_left(server: Server, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    good = random_bytes(300_000)
    entry = serve_as(server, monkeypatch, SMALL, good)
    bad = bytearray(good)
    bad[1234] ^= 0xFF
    server.files["/" + entry.path] = bytes(bad)
    with pytest.raises(IntegrityError) as caught:
        model_cache.pull(entry, server.url)
    message = str(caught.value)
    assert entry.sha256 in message and hashlib.sha256(bad).hexdigest() in message and "expected" in message
    assert leftovers(cache) == []
    with pytest.raises(ModelNotCached):
        model_cache.resolve(entry)


def test_truncated_download_is_refused(server: Server, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    good = random_bytes(300_000)
    entry = serve_as(server, monkeypatch, SMALL, good)
    server.files["/" + entry.path] = good[:200_000]  # the server itself has a short file
    with pytest.raises(IntegrityError, match="truncated: size 200000 bytes, expected 300000"):
        model_cache.pull(entry, server.url)
    # Not in the cache; only the shorter .part, kept to resume from.
    assert leftovers(cache) == ["covid/PSPNet_efficientnet-b0.pth.part"]
    server.files["/" + entry.path] = good  # the mirror is repaired: the next pull resumes
    assert model_cache.pull(entry, server.url).read_bytes() == good
    assert server.requests[-1]["range"] == "bytes=200000-"
    assert leftovers(cache) == ["covid/PSPNet_efficientnet-b0.pth"]


def test_oversized_download_is_refused_and_deleted(server: Server, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    good = random_bytes(300_000)
    entry = serve_as(server, monkeypatch, SMALL, good)
    server.files["/" + entry.path] = good + b"extra"
    with pytest.raises(IntegrityError, match="larger than expected"):
        model_cache.pull(entry, server.url)
    assert leftovers(cache) == []


def test_interrupted_download_resumes_with_range(server: Server, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    good = random_bytes(3_000_000)
    entry = serve_as(server, monkeypatch, SMALL, good)
    server.drop_first_after = 1_000_000
    path = model_cache.pull(entry, server.url)
    assert path.read_bytes() == good
    assert [r["range"] for r in server.requests] == [None, "bytes=1000000-"]
    assert leftovers(cache) == ["covid/PSPNet_efficientnet-b0.pth"]


def test_server_ignoring_range_restarts_from_zero(server: Server, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    good = random_bytes(300_000)
    entry = serve_as(server, monkeypatch, SMALL, good)
    server.ignore_range = True
    part = cache / "covid/PSPNet_efficientnet-b0.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 100_000)  # a stale prefix: appending the full body would corrupt the file
    path = model_cache.pull(entry, server.url)
    assert server.requests[0]["range"] == "bytes=100000-"  # asked to resume, answered with 200
    assert path.read_bytes() == good
    assert leftovers(cache) == ["covid/PSPNet_efficientnet-b0.pth"]


def test_unreachable_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(model_cache.DownloadError, match="cannot download|stopped at 0"):
        model_cache.pull(registry.REGISTRY[SMALL], f"http://127.0.0.1:{port}", attempts=1)
    assert leftovers(cache) == []


# --- the preset ----------------------------------------------------------------------------


def test_paper_preset_with_an_empty_cache_names_the_commands() -> None:
    with pytest.raises(ModelNotCached) as caught:
        model_specs(InferenceSettings(preset="danilov2022"))
    message = str(caught.value)
    assert "cxrtriage models pull danilov2022" in message
    assert "cxrtriage models import FILE" in message
    assert isinstance(caught.value, FileNotFoundError)  # callers that catch missing files still do


def test_explicit_weights_need_no_cache(tmp_path: Path) -> None:
    lungs, disease = preset_specs("danilov2022", {"weights": "/models/l.pth"}, {"weights": "/models/d.pth"})
    assert lungs.weights is None and disease.weights is None  # the overrides supply them
    assert (lungs.input_size, disease.input_size) == (512, 544)
    with pytest.raises(ModelNotCached, match="covid/MAnet_timm-regnetx_064"):
        preset_specs("danilov2022", {"weights": "/models/l.pth"}, {})


# --- import and verify, through the CLI ----------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    monkeypatch.setattr(cli_models, "console", Console(width=250))  # tables on one line each
    root = typer.Typer()
    root.add_typer(cli_models.app, name="models")
    return root


def test_cli_import_accepts_the_right_file_and_refuses_others(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path
) -> None:
    runner = CliRunner()
    good = random_bytes(200_000, seed=1)
    entry = dataclasses.replace(registry.REGISTRY[SMALL], size=len(good), sha256=hashlib.sha256(good).hexdigest())
    monkeypatch.setitem(registry.REGISTRY, SMALL, entry)
    (tmp_path / "weights.pth").write_bytes(good)
    (tmp_path / "other.pth").write_bytes(good[:-1] + b"x")

    wrong = runner.invoke(cli, ["models", "import", str(tmp_path / "other.pth")])
    assert wrong.exit_code == 1 and "matches no published checkpoint" in wrong.output
    assert hashlib.sha256(good[:-1] + b"x").hexdigest() in wrong.output and "Traceback" not in wrong.output
    named = runner.invoke(cli, ["models", "import", str(tmp_path / "other.pth"), "--name", SMALL])
    assert named.exit_code == 1 and entry.sha256 in named.output and "expected" in named.output
    assert leftovers(cache) == []

    ok = runner.invoke(cli, ["models", "import", str(tmp_path / "weights.pth")])
    assert ok.exit_code == 0, ok.output
    assert (cache / entry.cache_name).read_bytes() == good
    assert model_cache.resolve(entry) == cache / entry.cache_name
    assert leftovers(cache) == [str(entry.cache_name)]

    unknown = runner.invoke(cli, ["models", "import", str(tmp_path / "weights.pth"), "--name", "covid/Nope"])
    assert unknown.exit_code == 2 and "unknown model" in unknown.output


def test_cli_verify_reports_a_corrupted_file(cli: typer.Typer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path) -> None:
    runner = CliRunner()
    good = random_bytes(200_000, seed=2)
    entry = dataclasses.replace(registry.REGISTRY[SMALL], size=len(good), sha256=hashlib.sha256(good).hexdigest())
    monkeypatch.setitem(registry.REGISTRY, SMALL, entry)
    (tmp_path / "weights.pth").write_bytes(good)
    model_cache.import_file(tmp_path / "weights.pth")
    assert runner.invoke(cli, ["models", "verify"]).exit_code == 0

    cached = cache / entry.cache_name
    cached.write_bytes(good[:-1] + b"!")  # same size, one byte changed: only the hash can tell
    statuses = {r.entry.name: r.status for r in model_cache.verify()}
    assert statuses[SMALL] == "corrupt" and statuses[LUNGS] == "missing"
    result = runner.invoke(cli, ["models", "verify"])
    assert result.exit_code == 1
    assert "corrupt" in result.output and SMALL in result.output and entry.sha256 in result.output


def test_cli_pull_and_list(cli: typer.Typer, server: Server, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    runner = CliRunner()
    body = random_bytes(150_000, seed=3)
    serve_as(server, monkeypatch, SMALL, body)
    result = runner.invoke(cli, ["models", "pull", SMALL, "--base-url", server.url])
    assert result.exit_code == 0, result.output
    assert "sha256 verified" in result.output
    listing = runner.invoke(cli, ["models", "list"])
    assert listing.exit_code == 0
    rows = [line for line in listing.output.splitlines() if line.startswith("│ ") and "/" in line]
    assert len(rows) == 18
    assert [line for line in rows if SMALL in line][0].rstrip(" │").endswith("yes")
    assert all(line.rstrip(" │").endswith("no") for line in rows if SMALL not in line)

    monkeypatch.setenv(model_cache.BASE_URL_ENV, server.url)  # a hospital mirror, by environment
    server.files.clear()
    failed = runner.invoke(cli, ["models", "pull", LUNGS])
    assert failed.exit_code == 1 and "HTTP 404" in failed.output and "Traceback" not in failed.output
    unknown = runner.invoke(cli, ["models", "pull", "nope"])
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.output


def test_node_with_the_paper_preset_and_no_files_names_the_command(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("inference:\n  preset: danilov2022\n")
    env = {**os.environ, "CXRTRIAGE_CACHE": str(tmp_path / "empty-cache")}
    proc = subprocess.run([sys.executable, "-m", "cxrtriage", "serve", "-c", str(config)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "cxrtriage models pull danilov2022" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "cxrtriage-data").exists()  # stopped before the database or the archive was made
