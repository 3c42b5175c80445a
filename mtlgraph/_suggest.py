"""Near-miss suggestions for error messages ("did you mean ...?")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` when none is close.

    Examples:
        >>> did_you_mean("base_mpl", ["base_mlp", "head"])
        " (did you mean 'base_mlp'?)"
        >>> did_you_mean("zzz", ["base_mlp"])
        ''
    """
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def quoted(names: Iterable[str]) -> str:
    """Return names as a sorted, quoted, comma-separated list for messages."""
    return ", ".join(f"'{n}'" for n in sorted(names))


def first_few(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, then how many more there are.

    Example:
        >>> first_few(["'a'", "'b'", "'c'"], 2)
        "'a', 'b' and 1 more"
    """
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
