"""The one filesystem layer: every path glipctl reads or writes is a local path or a URI.

``s3://bucket/key`` (AWS or any S3-compatible endpoint), ``gs://bucket/key``, ``file:///abs/path``
and plain local paths resolve to a ``pyarrow.fs`` filesystem; any other scheme fsspec knows
(``az://``, ``hf://``, ...) goes through fsspec. Nothing else in glipctl opens files.

Paths stay strings end to end: a local path becomes absolute (``normalize``) before it is
shipped to Ray, so a task on another node reads the same file the user named; a URI is
passed on as it is and every process resolves it itself (filesystems are cached per process).

S3 configuration is the standard environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION`` and the endpoint from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, which the AWS SDK inside pyarrow ignores, so
it is read here. ``worker_environment()`` lists these variables so that Ray workers of a
cluster the driver joins see the same storage as the driver.

Writes (``open_output``) never leave a file that looks finished: locally a temporary name,
fsync, then rename; on object stores, where there is no rename, the object becomes visible
only when its upload completes, and one whose writer failed is deleted. A crash mid-upload on
an object store may still leave an object under its final name when the failure happened
between the last byte and the delete; that is why readers trust manifests (``storage.manifest``),
which are written after the objects they name, and not listings.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from storage.atomic import atomic_write

# Environment variables that decide what a path means; Ray workers must see the same values.
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
               "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
               "AWS_EC2_METADATA_DISABLED", "AWS_CA_BUNDLE", "GOOGLE_APPLICATION_CREDENTIALS",
               "GLIPCTL_CACHE_DIR")
READ_BUFFER = 8 << 20          # sequential reads from object stores: few, large range requests
_CACHE_ENV = "GLIPCTL_CACHE_DIR"


@dataclass(frozen=True)
class Entry:
    """One item of a listing: ``path`` in the same form as the listed folder (URI or local)."""
    name: str
    path: str
    size: int
    is_dir: bool


# ----------------------------------------------------------------------------- names
def scheme_of(path: str | os.PathLike) -> str:
    """``"s3"``, ``"gs"``, ... for a URI; ``""`` for a local path (``file://`` included)."""
    text = os.fspath(path)
    if "://" not in text:
        return ""
    scheme = text.split("://", 1)[0].lower()
    return "" if scheme == "file" else scheme


def is_remote(path: str | os.PathLike) -> bool:
    return scheme_of(path) != ""


def normalize(path: str | os.PathLike) -> str:
    """The canonical string of ``path``: local -> absolute path; URI -> without a trailing slash.

    Call it on every path the user gives before it reaches Ray: a relative path means
    something else in a worker on another node (or in another working directory).
    """
    text = os.fspath(path)
    if text.lower().startswith("file://"):
        text = urlparse(text).path or "/"
    if not is_remote(text):
        return os.path.abspath(os.path.expanduser(text))
    scheme, rest = text.split("://", 1)
    rest = rest.rstrip("/")
    return f"{scheme.lower()}://{rest}"


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for local paths and URIs alike."""
    text = os.fspath(base)
    if not is_remote(text):
        return os.path.join(text, *names)
    return "/".join([text.rstrip("/"), *(n.strip("/") for n in names)])


def name_of(path: str | os.PathLike) -> str:
    """The last component (``s3://b/x/00000.tar`` -> ``00000.tar``)."""
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def parent_of(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if not is_remote(text):
        return os.path.dirname(os.path.abspath(text))
    return text.rstrip("/").rsplit("/", 1)[0]


def stem_of(path: str | os.PathLike) -> str:
    """The name up to its first dot (``00000.tar`` -> ``00000``), WebDataset's rule."""
    return name_of(path).split(".", 1)[0]


def suffix_of(path: str | os.PathLike) -> str:
    """The last extension, lower case, with its dot (``x/a.b.Parquet`` -> ``.parquet``)."""
    name = name_of(path)
    return name[name.rfind("."):].lower() if "." in name else ""


# ----------------------------------------------------------------------------- filesystems
def s3_options(env: dict[str, str] | None = None) -> dict[str, Any]:
    """``pyarrow.fs.S3FileSystem`` keyword arguments from the standard AWS environment."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        options["scheme"] = parsed.scheme or "https"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"   # S3-compatible servers ignore it; the SDK wants one
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["access_key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            options["session_token"] = env["AWS_SESSION_TOKEN"]
    return options


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, config: tuple) -> pafs.FileSystem:
    if scheme == "":
        return pafs.LocalFileSystem()
    if scheme in ("s3", "s3a"):
        return pafs.S3FileSystem(**dict(config))
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    import fsspec   # no pyarrow filesystem for this scheme
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fsspec.filesystem(scheme)))


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or URI."""
    text = normalize(path)
    scheme = scheme_of(text)
    if scheme == "":
        return _filesystem("", ()), text
    config = tuple(sorted(s3_options().items())) if scheme in ("s3", "s3a") else ()
    fs = _filesystem(scheme, config)
    rest = text.split("://", 1)[1]
    if isinstance(fs, pafs.PyFileSystem):
        return fs, text       # fsspec wants the protocol
    return fs, rest


def worker_environment() -> dict[str, str]:
    """The storage variables set in this process, for Ray workers (``runtime_env`` env_vars)."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


# ----------------------------------------------------------------------------- queries
def _info(path: str | os.PathLike) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str | os.PathLike) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def size_of(path: str | os.PathLike) -> int | None:
    """The size in bytes of the file at ``path``; None when there is no such file."""
    info = _info(path)
    return int(info.size) if info.type == pafs.FileType.File else None


def kind_of(path: str | os.PathLike) -> str | None:
    """``"file"``, ``"dir"`` or None (no such path) for a user's path.

    Raises ``InputError`` naming the path when the storage cannot be asked at all (bad
    credentials, unknown bucket, unreachable endpoint): the one check every command's path
    arguments go through before any work starts.
    """
    from storage.errors import InputError

    try:
        kind = _info(path).type
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind)


def is_file(path: str | os.PathLike) -> bool:
    return _info(path).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A folder locally; on object stores, a prefix that holds at least one object."""
    return _info(path).type == pafs.FileType.Directory


def size_of(path: str | os.PathLike) -> int:
    info = _info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file")
    return int(info.size)


def list_dir(path: str | os.PathLike, recursive: bool = False) -> list[Entry]:
    """The entries of a folder sorted by name (``recursive``: every file below, names relative).

    Raises ``FileNotFoundError`` when there is no such folder.
    """
    base = normalize(path)
    fs, inner = resolve(base)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path}: no such folder")
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive))
    prefix = inner.rstrip("/") + "/"
    out = []
    for info in infos:
        if recursive and info.type == pafs.FileType.Directory:
            continue
        rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.base_name
        out.append(Entry(rel, join(base, rel), int(info.size or 0), info.type == pafs.FileType.Directory))
    return sorted(out, key=lambda e: e.name)


# ----------------------------------------------------------------------------- reading
def open_input_stream(path: str | os.PathLike) -> IO[bytes]:
    """A sequential binary reader (large buffered range requests on object stores).

    Local files are ordinary seekable Python files; remote streams are not seekable
    (callers that skip data read past it).
    """
    text = normalize(path)
    if not is_remote(text):
        return open(text, "rb", buffering=1 << 20)
    fs, inner = resolve(text)
    return fs.open_input_stream(inner, buffer_size=READ_BUFFER)


def open_input_file(path: str | os.PathLike):
    """A random-access binary reader (Parquet footers, PIL): a ``pyarrow.NativeFile``."""
    fs, inner = resolve(path)
    return fs.open_input_file(inner)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_input_stream(path) as fh:
        return fh.read()


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


# ----------------------------------------------------------------------------- writing
@contextlib.contextmanager
def open_output(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary writer for ``path`` that never leaves a half-written file behind (module docstring)."""
    text = normalize(path)
    if not is_remote(text):
        with atomic_write(text, "wb") as fh:
            yield fh
        return
    fs, inner = resolve(text)
    stream = fs.open_output_stream(inner)
    try:
        yield stream
    except BaseException:
        # pyarrow has no abort: closing completes the upload, so take the object away again
        with contextlib.suppress(Exception):
            stream.close()
        with contextlib.suppress(Exception):
            fs.delete_file(inner)
        raise
    stream.close()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open_output(path) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def makedirs(path: str | os.PathLike) -> None:
    """Create a local folder (and parents); object stores need none."""
    text = normalize(path)
    if not is_remote(text):
        os.makedirs(text, exist_ok=True)


def delete(path: str | os.PathLike) -> None:
    """Remove a file; a missing one is not an error."""
    fs, inner = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(inner)


def delete_dir(path: str | os.PathLike) -> None:
    """Remove a folder (a prefix) and everything under it; a missing one is not an error."""
    fs, inner = resolve(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(inner)


# ----------------------------------------------------------------------------- trees
def cache_dir() -> Path:
    """Where remote models are copied to be loaded (``GLIPCTL_CACHE_DIR``, default ~/.cache/glipctl)."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "glipctl")


def local_copy(path: str | os.PathLike) -> str:
    """A local path holding ``path``'s content: itself when local, else a cached download.

    For what must be a local path to the library that reads it (torch.load, HF
    ``from_pretrained``, spaCy): a file or a whole folder is copied once per process
    machine into ``cache_dir()`` and reused while its listing (names, sizes) is unchanged.
    """
    text = normalize(path)
    if not is_remote(text):
        return text
    folder = is_dir(text)
    entries = list_dir(text, recursive=True) if folder else [Entry(name_of(text), text, size_of(text), False)]
    fingerprint = hashlib.sha256(json.dumps([text] + [[e.name, e.size] for e in entries]).encode()).hexdigest()
    target = cache_dir() / fingerprint[:24] / name_of(text)
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        dest = staging / name_of(text)
        for e in entries:
            out = dest / e.name if folder else dest
            out.parent.mkdir(parents=True, exist_ok=True)
            with open_input_stream(e.path) as src, open(out, "wb") as fh:
                shutil.copyfileobj(src, fh, READ_BUFFER)
        with contextlib.suppress(OSError):    # another process finished first: keep theirs
            os.replace(dest, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def upload_tree(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a local file or folder to ``dest`` (local path or URI), file by file through ``open_output``."""
    local = Path(local)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        target = dest if local.is_file() else join(dest, f.relative_to(local).as_posix())
        with open(f, "rb") as src, open_output(target) as out:
            shutil.copyfileobj(src, out, READ_BUFFER)
