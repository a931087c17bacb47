"""Reading untrusted input: files, JSON, URLs, images, safetensors headers and hub ids.

Everything the package reads from outside (a checkpoint's files, an image path or URL, a benchmark
file) is opened here, bounded in size and time, and checked before the loaders use it. A problem
is one of the error classes below, whose message is one line naming the file, key or URL, so the
command-line tools can print it as it is instead of a traceback, a hang or a huge allocation.
The rules a config.json's values must follow are in validate.py.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import re
import stat
import struct
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .anyres import to_rgb


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, unreadable or describes something we do not run."""


class WeightsError(ValueError):
    """A checkpoint that cannot be found, fetched or loaded; the message names the file or key."""


class ImageError(ValueError):
    """A user-facing image problem (missing, unreadable, not an image, too large).

    str(e) is one line naming the file/URL and what to do."""


def show(value, limit: int = 60) -> str:
    """repr of a value from an untrusted file, one line and short enough for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- regular files ------------------------------------------------------------------------------


def check_regular(path, error: type[Exception] = ConfigError, what: str = "file"):
    """Raise `error` unless `path` is a regular file (symlinks followed), from its stat alone: a FIFO,
    device or socket would block a reader or never end, so it is refused without being opened."""
    try:
        kind = _kind(os.stat(path).st_mode)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}; check the path") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise error(f"cannot open {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if kind is not None:
        raise error(f"{what} {path}: not a regular file but {kind}")


def open_regular(path, error: type[Exception] = ConfigError, what: str = "file"):
    """`path` opened for binary reading if it is a regular file, else `error` (see check_regular).

    The descriptor is checked again and opened with O_NONBLOCK, so a FIFO swapped in after the first
    check can neither block the open nor be read."""
    path = os.fspath(path)
    check_regular(path, error, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise error(f"cannot open {what} {path}: {e.strerror or e}") from None
    kind = _kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise error(f"{what} {path}: not a regular file but {kind}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is, for the message."""
    if stat.S_ISREG(mode):
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a special file")


def read_regular(path: Path, max_bytes: int, error: type[Exception] = ConfigError) -> bytes:
    """The bytes of the regular file `path`, refused past `max_bytes` before anything is read."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, more than the {max_bytes} such a file can sensibly have")
        try:
            return f.read(max_bytes + 1)[:max_bytes]
        except OSError as e:
            raise error(f"{path}: cannot read it ({e.strerror})") from None


def parse_json(data: bytes, where: str, error: type[Exception] = ConfigError):
    """Strict JSON: UTF-8 only, and a key twice in one object is refused (Python would keep the last
    silently, so two readers of the file could disagree about what it says)."""

    def no_duplicates(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}: key {show(key)} appears twice")
            out[key] = value
        return out

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int too long, nesting too deep
        if isinstance(e, error):
            raise
        raise error(f"{where}: not valid JSON ({show(str(e), 80)[1:-1]})") from None


# --- images: files and URLs ---------------------------------------------------------------------

# Image formats PIL may read, everywhere an image is opened (files, URLs, MMBench's base64 cells).
# Plain raster formats decoded inside Pillow (libpng, libjpeg, libwebp, libtiff, its own C code):
# what benchmarks ship (COCO, GQA, TextVQA, VizWiz, MME: JPEG; ScienceQA, MM-Vet: PNG) and what a
# user may hand to `generate` ("JPEG" also opens MPO, a camera JPEG carrying a second picture).
# Anything else is refused before decoding: above all EPS/PS/PDF, which PIL renders by running
# Ghostscript (an interpreter of a programming language) on the file, and the rarely used
# plugins nobody here needs the attack surface of.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # PPM: also PGM, PBM, PNM

# Limits of one download: the whole exchange (DNS, connect, redirects, headers, body) within
# URL_DEADLINE_S seconds, and at most URL_MAX_BYTES of body. 64 MiB is 10 times a 24-megapixel
# JPEG; a server trickling bytes or sending an endless body is stopped by one or the other.
URL_DEADLINE_S = 60.0
URL_MAX_BYTES = 64 * 2**20
_CHUNK = 256 * 1024


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line, for ImageError messages."""
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


def load_image(source: str) -> Image.Image:
    """Open a local path or an http(s) URL as an upright (EXIF-rotated) RGB image.

    Every problem with the file (missing, not a regular file, not an image in IMAGE_FORMATS,
    truncated, over PIL's pixel limit) or the download is raised as ImageError, so callers can show
    the message as is.
    """
    source = os.fspath(source)
    if source.startswith(("http://", "https://")):
        return decode_image(io.BytesIO(_fetch(source)), source)
    with open_regular(source, ImageError, "image file") as f:
        return decode_image(f, source)


def decode_image(fp, source: str) -> Image.Image:
    """Decode an image from a binary file object, reading only IMAGE_FORMATS, as an upright RGB image;
    every failure is an ImageError naming `source` (a path, URL or a phrase such as "the image of ...")."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as image:
                image.load()  # PIL is lazy: decode now so truncation is caught here
                return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"image too large: {source}: {_one_line(e)}; downscale it first "
            "(or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image, or not in a format read here: {source}; pass a PNG, JPEG, WEBP, "
                         "GIF, BMP, TIFF or PPM file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            f"cannot read image {source} ({_one_line(e)}); the file may be damaged: re-save or re-download it"
        ) from e


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib alone also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl} refused: only http(s) is followed",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, stop: threading.Event) -> bytes:
    """The body behind `url`, read in chunks; stops (OSError) past URL_MAX_BYTES or once `stop` is set."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "minillava"})
    with opener.open(request, timeout=URL_DEADLINE_S) as response:  # per socket operation; the total is _fetch's
        length = response.headers.get("Content-Length", "").strip()
        length = int(length) if length.isdigit() else None
        if length is not None and length > URL_MAX_BYTES:
            raise OSError(f"the server announces {length} bytes, more than the limit of {URL_MAX_BYTES}")
        body = bytearray()
        while not stop.is_set():
            chunk = response.read1(_CHUNK)  # read1: whatever has arrived, so a trickle still returns here
            if not chunk:
                if length is not None and len(body) != length:  # read1, unlike read, does not check this
                    raise OSError(f"the connection closed after {len(body)} of {length} bytes")
                return bytes(body)
            body += chunk
            if len(body) > URL_MAX_BYTES:
                raise OSError(f"the body is larger than the limit of {URL_MAX_BYTES} bytes")
    raise OSError("stopped")


def _fetch(url: str) -> bytes:
    """Download the bytes behind an http(s) URL within URL_DEADLINE_S and URL_MAX_BYTES; every failure,
    a malformed URL included, is an ImageError naming the URL.

    The download runs in a daemon thread that this one waits for at most URL_DEADLINE_S: a socket
    timeout bounds each read, not their sum, and name resolution has no timeout at all. A thread
    given up on stops at its next chunk (it holds at most URL_MAX_BYTES meanwhile).
    """
    hint = "check the URL and your network"
    try:
        if any(c.isspace() or not c.isprintable() for c in url):  # urllib would drop some, http.client refuse others
            raise ValueError("it contains a space or a control character")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http(s)://host/...")
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as e:
        raise ImageError(f"cannot download image {url}: malformed URL ({_one_line(e)}); {hint}") from None
    result, stop = {}, threading.Event()

    def run():
        try:
            result["data"] = _download(url, stop)
        except BaseException as e:  # handed to the waiting thread, which sorts it out
            result["error"] = e

    worker = threading.Thread(target=run, name=f"download {url}", daemon=True)
    worker.start()
    worker.join(URL_DEADLINE_S)
    if worker.is_alive():
        stop.set()
        raise ImageError(f"cannot download image {url}: no complete answer within {URL_DEADLINE_S:g} s; {hint}")
    error = result.get("error")
    if isinstance(error, (OSError, HTTPException, ValueError)):  # URLError/HTTPError and timeouts are OSErrors
        raise ImageError(f"cannot download image {url}: {_one_line(error)}; {hint}") from error
    if error is not None:
        raise error
    return result["data"]


# --- checkpoint files ---------------------------------------------------------------------------

MAX_INDEX_BYTES = 64 << 20  # model.safetensors.index.json: a 70B model's is about 100 KB


def read_index(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json's weight_map names, sorted, once each."""
    weight_map = parse_json(read_regular(index, MAX_INDEX_BYTES, WeightsError), str(index), WeightsError)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: weight_map must be a JSON object of tensor name -> shard file name")
    return sorted(set(weight_map.values()))


def checkpoint_paths(model_dir: Path, names: list[str], source: str) -> list[Path]:
    """`model_dir / name` for each of `names`, refused unless every one stays inside the checkpoint
    (see `inside`) and is an existing regular file. `source` says where the names came from."""
    paths = [inside(model_dir, name, source) for name in names]
    for path in paths:
        if not path.exists():
            raise WeightsError(f"{path}: {source} is missing")
        if not path.is_file():  # a FIFO or a device would hang or stream forever
            raise WeightsError(f"{path}: {source} is not a regular file")
    return paths


def inside(model_dir: Path, name: str, source: str) -> Path:
    """`model_dir / name`, refused unless it stays in the checkpoint: `name` is a plain relative path
    (not absolute, no `..`) and the file it resolves to, symlinks followed, lies in `model_dir`. A hub
    cache snapshot (`models--owner--name/snapshots/REV/`) links its files to `../../blobs/`, so there
    the repository's cache folder is the bound."""
    if not name or "\0" in name or "\\" in name or Path(name).is_absolute() or ".." in Path(name).parts:  # \\: Windows' separator
        raise WeightsError(f"{model_dir}: {source} {show(name)} is not a plain file name inside the checkpoint")
    path = model_dir / name
    try:
        root, target = model_dir.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise WeightsError(f"{path}: cannot resolve it ({e})") from None
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        root = root.parent.parent
    if not target.is_relative_to(root):
        raise WeightsError(f"{path}: {source} resolves to {target}, outside the checkpoint {root}; copy the file in")
    return path


# A hub repository id, owner/name, by huggingface_hub's rules (`validate_repo_id`): letters, digits,
# "_", "-", "."; no "--" or ".." anywhere; "-" and "." neither first nor last; at most 96 per part.
HUB_PART = r"(?!.*(?:--|\.\.))(?![-.])[\w.-]{1,96}(?<![-.])"
HUB_ID = re.compile(rf"{HUB_PART}/{HUB_PART}", re.ASCII)


def is_hub_id(name: str) -> bool:
    """Whether `name` is a well-formed hub id owner/name (so it can name a folder and a download)."""
    return HUB_ID.fullmatch(name) is not None


# --- safetensors headers ------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class Entry:
    """Where one tensor lives: file, its key there, dtype, shape, byte range (from the file start), and
    the file's size when the header was checked."""

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    file_size: int


# Cap on the JSON header, checked before a byte of it is read. safetensors allows 100 MB
# (MAX_HEADER_SIZE in safetensors/src/tensor.rs), but a hostile header that size parses into about
# 1 GB of Python objects in half a minute; real ones are far smaller (LLaVA-NeXT-34B's shards: tens
# of KB; even 90k tensors, a 671B mixture of experts in one file, would take about 14 MB).
MAX_HEADER_BYTES = 16 << 20


def read_header(path: Path) -> dict[str, Entry]:
    """The tensor table of a safetensors file: an 8-byte little-endian length n, then n bytes of JSON
    (UTF-8, an object of name -> {dtype, shape, data_offsets}), then the data.

    Nothing of the file is trusted. The rules are safetensors' own (`SafeTensors::read_metadata` and
    `Metadata::validate` in safetensors/src/tensor.rs): n capped and inside the file; the
    entries, sorted by offset, tile the data region exactly from 0 with no gap or overlap, each as long
    as its shape x dtype; the data region ends at the end of the file. Stricter than safetensors:
    the cap on n is lower (MAX_HEADER_BYTES), a key twice in the header is refused (which copy counts
    would depend on the reader), and only the dtypes we load pass. The safetensors library (0.8)
    accepts those three, and its `safe_open` blocks forever on a FIFO (which `open_regular` refuses):
    that is why this reader is ours.
    """
    with open_regular(path, WeightsError) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise WeightsError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: header length {n} is over the limit of {MAX_HEADER_BYTES} bytes (real headers are far smaller); not a checkpoint we load")
        if 8 + n > size:
            raise WeightsError(f"{path}: header length {n} is past the end of the file ({size} bytes); truncated or not safetensors")
        raw = f.read(n)
    header = parse_json(raw, f"{path}: header", WeightsError)
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header must be a JSON object, got {show(header)}")
    metadata = header.pop("__metadata__", None) or {}  # optional, null allowed (an Option in safetensors)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: __metadata__ must be an object of strings")
    entries = [header_entry(path, key, info, 8 + n, size) for key, info in header.items()]
    end = 8 + n  # the data region starts right after the header
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != end:
            raise WeightsError(f"{path.name}: {show(e.key)} starts at byte {e.start - 8 - n} of the data, expected {end - 8 - n} "
                               "(tensors must follow each other with no gap or overlap)")
        end = e.end
    if end != size:
        raise WeightsError(f"{path.name}: the tensors need {end - 8 - n} data bytes but the file has {size - 8 - n}; "
                           "truncated, or bytes no tensor accounts for")
    return {e.key: e for e in entries}


def header_entry(path: Path, key: str, info, base: int, size: int) -> Entry:
    """One header entry, its types checked and its length equal to shape x dtype size."""
    where = f"{path.name}: {show(key)}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where} must be an object with dtype, shape and data_offsets, got {show(info)}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise WeightsError(f"{where} has dtype {show(dtype)}, which we do not load ({', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise WeightsError(f"{where} has shape {show(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise WeightsError(f"{where} has data_offsets {show(offsets)}, not two non-negative integers")
    start, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end < start or end - start != nbytes:
        raise WeightsError(f"{where} has data_offsets [{start}, {end}] ({end - start} bytes) but shape {show(shape)} "
                           f"of {dtype} needs {nbytes}")
    return Entry(path, key, SAFETENSORS_DTYPES[dtype], tuple(shape), base + start, base + end, size)


def map_file(path: Path, size: int) -> mmap.mmap:
    """The whole file, mapped copy-on-write: readable and writable in memory, the file never changes.
    `size` is the length its header was checked against: a file changed since is refused."""
    with open_regular(path, WeightsError) as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if (got := len(mm)) != size:  # its length read before the close: a closed map has none
        mm.close()
        raise WeightsError(f"{path}: changed while loading ({got} bytes, its header said {size})")
    return mm
