"""Small files on the run storage, a local path or a URI (s3://, gs://, ...), through pyarrow's file systems."""

from __future__ import annotations

import contextlib


def is_uri(path: str) -> bool:
    """A URI (s3://, gs://, ...), as opposed to a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers and Tune trials run in other directories); a URI as is,
    without a trailing slash."""
    from pathlib import Path

    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def filesystem(path: str):
    """A pyarrow filesystem and path for a local path or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None if it is not there."""
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def write_bytes(path: str, data: bytes) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def read_text(path: str) -> str | None:
    data = read_bytes(path)
    return None if data is None else data.decode()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def exists(path: str) -> bool:
    import pyarrow.fs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def delete(path: str) -> None:
    """Remove a file; nothing if it is not there."""
    fs, inner = filesystem(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(inner)
