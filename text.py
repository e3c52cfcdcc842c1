"""Cleaning and tokenising texts (docs/method.md §4): the same rule for every dataset, plus a
dataset's own step from the registry (`registry.Dataset.clean`)."""
import re

import registry
from data_io import DataError

# ----------------------------------------------------------------------------- cleaning

_BR = re.compile(r'<br\s*/?>', re.IGNORECASE)
_BRACKETS = re.compile(r'\[[^\]]*\]')
_NOT_KEPT = re.compile(r'[^\w\s.!?,]|_')      # keep letters, digits, . ! ? , and whitespace
_SENTENCE_PUNCT = re.compile(r'([.?!])')
_toktok = None


def dataset_name(dataset) -> str:
    """The registered name of `dataset` (any case); DataError naming the choices."""
    try:
        return registry.get(dataset).name
    except ValueError as e:
        raise DataError(str(e)) from None


RULES = ("paper", "split-punctuation")  # --tokenize


def clean_text(text, dataset, rule="paper") -> str:
    """docs/method.md §4 cleaning: strip HTML, drop [...] spans, keep letters/digits/.!?,/whitespace,
    then the dataset's own step (SNLI: . ? ! as tokens), lowercase. rule="split-punctuation"
    makes . ? ! tokens of their own for every dataset: ToktokTokenizer splits only a text's last
    period, so the paper's rule keeps 'movie.' inside an IMDB review as one word, which vectors
    trained elsewhere (GloVe) do not have."""
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
    extra = registry.get(dataset_name(dataset)).clean
    if extra is not None:
        text = extra(text)
    if rule == "split-punctuation":
        text = _SENTENCE_PUNCT.sub(r" \1 ", text)
    elif rule != "paper":
        raise DataError(f"unknown tokenisation rule {rule!r}; choose from {', '.join(RULES)}")
    return text.lower()


def tokenize(text, dataset, rule="paper") -> list:
    """Clean a text (clean_text with `rule`) and split it with NLTK's ToktokTokenizer."""
    global _toktok
    if _toktok is None:
        from nltk.tokenize import ToktokTokenizer
        _toktok = ToktokTokenizer()
    return _toktok.tokenize(clean_text(text, dataset, rule))


