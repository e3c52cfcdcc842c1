"""The dataset registry: everything the tool knows about a dataset, in one entry.

Every module asks here: the model (how many inputs a sample has, which of them each Hopfield
projection layer attends from and to, γ), the command line (choices, class names, the paper's
hyperparameters), the data pipeline (default sequence length, the cleaning step, where the
files are and how to read them) and the benchmark (its default shape).

Adding a dataset is one `register(Dataset(...))` plus a reader: a function that locates the
files and returns a `sources.Source`, whose `read(builder, log)` calls
`builder.add(split, sort_key, label, texts)` once per sample (splits "train", "test" and
optionally "dev"; `texts` has one string per field). tests/test_registry.py adds a small
synthetic sequence task this way and trains on it through main.py.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple            # class names; a label is the index of its class
    fields: tuple             # the texts of one sample, e.g. ("review",) or ("premise", "hypothesis")
    projections: tuple        # (query field, key/value field) of each Hopfield projection layer
    seq_len: int              # default tokens per field (--seqLen)
    paper: dict               # the paper's hyperparameters: fc_layers, seqLen, lrs, T, K, betas, batch_size
    find_source: Callable     # (data_dir: Path, cache_dir: Path, options: dict, log, splits) -> sources.Source
    gamma: Optional[float] = None   # attention scale γ; None: 1/sqrt(D)
    clean: Optional[Callable] = None  # extra cleaning step after the common rule (text.clean_text)
    benchmark: dict = field(default_factory=dict)  # benchmark.py's default shape, if not the paper's

    @property
    def n_classes(self):
        return len(self.classes)

    @property
    def n_fields(self):
        return len(self.fields)


REGISTRY = {}


def register(ds):
    """Add (or replace) a dataset; returns it."""
    REGISTRY[ds.name] = ds
    return ds


def get(name):
    """The registered dataset `name` (case-insensitive); ValueError naming the choices."""
    ds = REGISTRY.get(str(name).upper()) or REGISTRY.get(str(name))
    if ds is None:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(names())}")
    return ds


def names():
    return list(REGISTRY)


# ----------------------------------------------------------------------------- the paper's two
def _find_imdb(data_dir, cache_dir, options, log, splits=None):
    import sources
    return sources.find_imdb(data_dir, cache_dir, options.get("imdb_source") or "auto", log)


def _find_snli(data_dir, cache_dir, options, log, splits=None):
    import sources
    return sources.find_snli(data_dir, cache_dir, log, splits)


def _split_sentence_punctuation(text):
    """SNLI: '.', '?' and '!' become tokens of their own."""
    import re
    return re.sub(r"([.?!])", r" \1 ", text)


register(Dataset(
    name="IMDB", classes=("negative", "positive"), fields=("review",), projections=((0, 0),),
    seq_len=600, find_source=_find_imdb,
    paper={"fc_layers": [1000, 40, 2], "seqLen": 600, "lrs": [1e-4, 5e-5, 5e-5, 5e-5],
           "T": 50, "K": 25, "betas": [0.0, 0.1], "batch_size": 100},
    benchmark={"seqLen": 100, "fc_layers": [1000, 40, 2], "T": 50, "K": 25, "batch_size": 100,
               "betas": [0.0, 0.1]}))

# s1: premise over hypothesis, s2: hypothesis over premise, s3: premise over premise, s4: hypothesis over hypothesis
register(Dataset(
    name="SNLI", classes=("neutral", "contradiction", "entailment"), fields=("premise", "hypothesis"),
    projections=((0, 1), (1, 0), (0, 0), (1, 1)), seq_len=25, gamma=0.16, find_source=_find_snli,
    clean=_split_sentence_punctuation,
    paper={"fc_layers": [400, 3], "seqLen": 25, "lrs": [5e-4] * 4 + [2e-4] * 2,
           "T": 60, "K": 30, "betas": [0.0, 0.5], "batch_size": 200}))
