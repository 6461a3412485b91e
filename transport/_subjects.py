"""Subjects and subject patterns, with the rules NATS applies to them.

A subject is a dot-separated list of non-empty tokens (``orch.step.charge``). A pattern may also
use ``*`` for exactly one token and ``>``, as its last token, for one or more tokens. Names of
queues and durables must not hold whitespace, ``.``, ``*``, ``>`` or path separators; bucket
names are stricter: letters, digits, ``-`` and ``_``.
"""

from __future__ import annotations

import re

Pattern = tuple[str, ...]
"""A compiled subject pattern: its tokens."""

_NAME = re.compile(r"[^\s.*>/\\]+")
_BUCKET = re.compile(r"[A-Za-z0-9_-]+")
_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")
_SPACE = re.compile(r"\s")


def check_name(kind: str, name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a valid queue or durable name."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: no whitespace, '.', '*', '>', '/' or '\\' allowed"
        )


def check_bucket(bucket: str) -> None:
    """Raise ``ValueError`` unless ``bucket`` is a valid key-value bucket name."""
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}: use letters, digits, '-' and '_' only")


def check_key(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` is a valid key-value key."""
    if not _KEY.fullmatch(key) or key[0] == "." or key[-1] == ".":
        raise ValueError(
            f"invalid key {key!r}: use letters, digits and '-/_=.', not starting or ending in '.'"
        )


def compile_pattern(pattern: str) -> Pattern:
    """Validate a subscription pattern and split it into tokens (``ValueError`` if invalid)."""
    tokens = tuple(pattern.split("."))
    if _SPACE.search(pattern) or "" in tokens:
        raise ValueError(f"invalid subject pattern {pattern!r}: empty token or whitespace")
    if ">" in tokens[:-1]:
        raise ValueError(f"invalid subject pattern {pattern!r}: '>' must be the last token")
    return tokens


_CHECKED: set[str] = set()
_CHECKED_MAX = 4096
"""Good subjects and keys seen lately: most are published to several times (a transaction's
event subject, its checkpoint key), and a set lookup is cheaper than the check."""


def check_subject(subject: str) -> None:
    """:func:`split_subject`'s check, without the split (``ValueError`` if invalid)."""
    if subject not in _CHECKED:
        split_subject(subject)
        _remember(subject)


def check_key_cached(key: str) -> None:
    """:func:`check_key`, remembering the keys that passed."""
    if key not in _CHECKED:
        check_key(key)
        _remember(key)


def _remember(good: str) -> None:
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED.add(good)


def split_subject(subject: str) -> list[str]:
    """Validate a subject to publish to and split it into tokens (``ValueError`` if invalid)."""
    tokens = subject.split(".")
    if _SPACE.search(subject) or "" in tokens or "*" in tokens or ">" in tokens:
        raise ValueError(f"invalid subject {subject!r}: empty token, whitespace or wildcard")
    return tokens


def matches(pattern: Pattern, tokens: list[str]) -> bool:
    """Whether a subject, split into ``tokens``, matches ``pattern``."""
    for i, want in enumerate(pattern):
        if want == ">":
            return len(tokens) > i
        if i >= len(tokens) or (want != "*" and want != tokens[i]):
            return False
    return len(tokens) == len(pattern)


def collide(a: Pattern, b: Pattern) -> bool:
    """Whether some subject matches both patterns."""
    for x, y in zip(a, b, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
    return len(a) == len(b)
