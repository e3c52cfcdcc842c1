"""Input and output the data pipeline shares: the user-facing DataError, atomic writes, the
on-disk caches (torch files loaded with weights_only), file hashes and portable run records,
text/archive reading with clear errors, and downloads (retried, never in offline mode)."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

OFFLINE_ENV = 'SEQLEARN_EP_OFFLINE'
CACHE_ENV = 'SEQLEARN_EP_CACHE'


class DataError(Exception):
    """A problem with the user's data, vectors or arguments; the message is one line for the user."""



# ----------------------------------------------------------------------------- small helpers

def progress(iterable=None, **kw):
    return tqdm(iterable, disable=None, leave=False, mininterval=0.5, dynamic_ncols=True, **kw)


def file_stat(path) -> dict:
    st = Path(path).stat()
    return {'path': str(Path(path).resolve()), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def file_sha256(path, chunk=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def portable_info(info, data_dir, hash_files=True):
    """A copy of a data `info` dict that a run folder can record and share: every absolute
    'path' becomes relative to --data-dir (base 'data-dir'), to the working directory (base
    'cwd') or just the file name (base 'elsewhere'), with the file's sha256 as its fingerprint;
    cache locations keep only their file names (mtime_ns is dropped: it is machine-local)."""
    roots = [('data-dir', Path(data_dir).expanduser().resolve()), ('cwd', Path.cwd().resolve())]

    def convert(obj, key=None):
        if isinstance(obj, dict):
            out = {k: convert(v, k) for k, v in obj.items() if k != 'mtime_ns'}
            if isinstance(obj.get('path'), str) and os.path.isabs(obj['path']):
                p = Path(obj['path'])
                base, rel = next(((b, p.relative_to(r)) for b, r in roots if p.is_relative_to(r)),
                                 ('elsewhere', Path(p.name)))
                out.update(path=rel.as_posix(), base=base)
                if hash_files and p.is_file():
                    out['sha256'] = file_sha256(p)
            return out
        if isinstance(obj, list):
            return [convert(v) for v in obj]
        if key in ('dir', 'tokens', 'prepared') and isinstance(obj, str) and os.path.isabs(obj):
            return Path(obj).name
        return obj
    return convert(info)


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path, write):
    """Write a file through write(fileobj) into a temp file beside it, fsync, then rename it into
    place: a reader (or a crash) never sees a half-written file. Permissions follow the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.' + path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp's 0600 would make shared checkpoints unreadable
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):          # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_json(obj, path):
    """JSON, indented, written atomically."""
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_torch(obj, path):
    """torch.save, written atomically (a checkpoint is whole or absent)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_cache(obj, path, log):
    try:
        write_atomic(path, lambda f: torch.save(obj, f))
        return True
    except OSError as e:
        log(f'WARNING: could not write cache {path}: {e}')
        return False


def load_cache(path, log):
    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a damaged cache file is rebuilt, never fatal
        log(f'WARNING: ignoring unreadable cache {path} ({type(e).__name__}: {e}); rebuilding')
        return None


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, '') not in ('', '0')


def open_text(path):
    """Open a possibly gzipped file as strict UTF-8 text."""
    path = str(path)
    if path.endswith('.gz'):
        return gzip.open(path, 'rt', encoding='utf-8', errors='strict', newline='')
    return open(path, encoding='utf-8', errors='strict', newline='')


@contextlib.contextmanager
def reading(path, what='file'):
    """Turn decoding and corruption errors while reading `path` into one-line DataErrors."""
    try:
        yield
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start})') from None
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f'corrupt or truncated {what} {path}: {e or type(e).__name__}') from None
    except OSError as e:
        raise DataError(f'cannot read {what} {path}: {e.strerror or e}') from None


# ----------------------------------------------------------------------------- downloads

def download(url, dest, log, attempts=3, timeout=30):
    """Fetch url to dest: resumes a partial .part file, retries, checks length and gzip/zip integrity."""
    if offline():
        raise DataError(f'download of {url} skipped ({OFFLINE_ENV} is set)')
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')
    last = None
    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                if have and getattr(r, 'status', 200) != 206:
                    have = 0                       # the server ignored the range: start over
                length = r.headers.get('Content-Length')
                total = have + int(length) if length is not None else None
                with open(part, 'ab' if have else 'wb') as f, \
                        progress(total=total, initial=have, unit='B', unit_scale=True,
                                  desc=f'download {dest.name}') as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size != total:
                raise OSError(f'incomplete download: {size} of {total} bytes')
            verify_archive(part, dest.name)
            os.replace(part, dest)
            log(f'downloaded {url} -> {dest} ({size:,} bytes)')
            return dest
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):   # no network at all: retrying will not help
                raise DataError(f'cannot download {url}: {e.reason}') from None
            last = e
        except (OSError, DataError) as e:
            last = e
            if isinstance(e, DataError):                # corrupt file: retry from scratch
                part.unlink(missing_ok=True)
        log(f'download attempt {attempt}/{attempts} of {url} failed: {last}')
        if attempt < attempts:
            time.sleep(2 ** attempt)
    raise DataError(f'cannot download {url} after {attempts} attempts: {last}')


def verify_archive(path, name):
    """Read a downloaded .gz or .zip to the end so a damaged file never replaces a good one."""
    with reading(path, 'download'):
        if name.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                while f.read(1 << 22):
                    pass
        elif name.endswith('.zip'):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    raise DataError(f'corrupt download {path}: member {bad} fails its CRC')


