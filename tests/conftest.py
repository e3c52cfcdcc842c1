"""Shared fixtures: a tiny IMDB-layout dataset and word vectors written by the tests."""
import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported by any test
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def real_data_dir():
    """Where the real datasets are: ./data (the README's place) or ../shared/data (development
    machines); the first that holds imdb/ or snli/. Tests that need them skip when neither does."""
    for d in (ROOT / "data", ROOT / ".." / "shared" / "data"):
        if (d / "imdb").is_dir() or (d / "snli").is_dir():
            return d
    return ROOT / "data"


REAL_DATA = real_data_dir()

POS = ["good", "great", "excellent", "wonderful"]
NEG = ["bad", "awful", "terrible", "boring"]
FILLER = ["the", "movie", "film", "was", "plot", "actor", "story", "and", "a", "it"]


def write_tiny_imdb(root, n_per_class=80, seed=0):
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt with sentiment words among filler."""
    rng = random.Random(seed)
    for split in ("train", "test"):
        for label, words, rating in (("pos", POS, 9), ("neg", NEG, 2)):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                toks = [rng.choice(FILLER) for _ in range(6)] + [rng.choice(words) for _ in range(2)]
                rng.shuffle(toks)
                (folder / f"{i}_{rating}.txt").write_text(" ".join(toks).capitalize() + ". <br />")
    return root


def write_vectors(path, words, dim=6, seed=0, header=True):
    rng = random.Random(seed)
    lines = [f"{len(words)} {dim}"] if header else []
    for w in words:
        lines.append(w + " " + " ".join(f"{rng.gauss(0, 1):.5f}" for _ in range(dim)))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_model(dataset, hidden=(7,), act="my_sigmoid", dtype=None, B=3, L=4, D=5, seed=0, scale=1.0):
    """A tiny model of a registered dataset (L tokens, D-d vectors, FC `hidden` then the classes),
    its weights scaled by `scale`, with a random batch x (B samples) and labels y: the one
    fixture behind the engine's numerical tests. dtype: torch.float64 unless given."""
    import torch
    import model_utils as mu
    import registry
    dtype = dtype or torch.float64
    torch.manual_seed(seed)
    spec = registry.get(dataset)
    model = mu.EPNet(dataset, L, D, list(hidden) + [spec.n_classes], act).to(dtype)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.params():
                p.mul_(scale)
    shape = (B, L, D) if spec.n_fields == 1 else (B, spec.n_fields, L, D)
    x = torch.randn(*shape, dtype=dtype)
    return model, x, torch.randint(0, model.n_classes, (B,))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine"))]


@pytest.fixture(params=DEVICES)
def device(request):
    """The math checks run on the CPU and, where there is one, on CUDA."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long real-data tests (run with SEQLEARN_EP_SLOW=1)")


@pytest.fixture
def tiny_imdb(tmp_path):
    data = write_tiny_imdb(tmp_path / "data")
    vec = write_vectors(tmp_path / "vectors.txt", POS + NEG + FILLER)
    return {"data": data, "vectors": vec, "cache": tmp_path / "cache", "tmp": tmp_path}
