"""Okapi BM25 over a handful of short documents (search results, page passages): enough to put
the results that match the query best first. Deterministic: ties keep the input order."""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def bm25_scores(query: str, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """One score per document (higher: more relevant to ``query``)."""
    terms = list(dict.fromkeys(tokenize(query)))
    toks = [tokenize(d) for d in docs]
    n = len(toks)
    if not n or not terms:
        return [0.0] * n
    avg = sum(len(t) for t in toks) / n or 1.0
    df = Counter(term for t in toks for term in set(t))
    scores = []
    for t in toks:
        tf = Counter(t)
        score = 0.0
        for term in terms:
            if not tf[term]:
                continue
            # the +1 keeps the idf positive for terms that appear in most documents
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            score += idf * tf[term] * (k1 + 1) / (tf[term] + k1 * (1 - b + b * len(t) / avg))
        scores.append(score)
    return scores


def rank(query: str, docs: Sequence[str]) -> list[int]:
    """Indices of ``docs``, best first (stable: equal scores keep their order)."""
    scores = bm25_scores(query, docs)
    return sorted(range(len(docs)), key=lambda i: -scores[i])
