"""Cleaning and tokenising texts (docs/method.md §4): the same rule for every dataset, plus a
dataset's own step from the registry (`registry.Dataset.clean`)."""
import re

import registry
from data_io import DataError

# ----------------------------------------------------------------------------- cleaning

_BR = re.compile(r'<br\s*/?>', re.IGNORECASE)
_BRACKETS = re.compile(r'\[[^\]]*\]')
_NOT_KEPT = re.compile(r'[^\w\s.!?,]|_')      # keep letters, digits, . ! ? , and whitespace
_toktok = None


def dataset_name(dataset) -> str:
    """The registered name of `dataset` (any case); DataError naming the choices."""
    try:
        return registry.get(dataset).name
    except ValueError as e:
        raise DataError(str(e)) from None


def clean_text(text, dataset) -> str:
    """docs/method.md §4 cleaning: strip HTML, drop [...] spans, keep letters/digits/.!?,/whitespace,
    then the dataset's own step (SNLI: . ? ! as tokens), lowercase."""
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
    return (text if extra is None else extra(text)).lower()


def tokenize(text, dataset) -> list:
    """Clean a text (clean_text) and split it with NLTK's ToktokTokenizer."""
    global _toktok
    if _toktok is None:
        from nltk.tokenize import ToktokTokenizer
        _toktok = ToktokTokenizer()
    return _toktok.tokenize(clean_text(text, dataset))


