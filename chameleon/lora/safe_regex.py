"""Bounded-time matching of the regexes an adapter config brings (target_modules, exclude_modules,
rank/alpha_pattern keys, layers_pattern).

Two layers of defence, so a hostile `adapter_config.json` can never freeze the process:
1. `check_pattern` refuses, before anything is compiled, a pattern that is longer than
   `MAX_PATTERN_CHARS`, nests groups deeper than `MAX_NESTING`, uses a backreference or a
   conditional group, repeats a counted group more than `MAX_REPEAT_COUNT` times, or nests a repeat
   inside a repeat (`(a+)+`, `(.*a){20}`): the shapes of catastrophic backtracking.
2. `fullmatch` / `match` run on the `regex` package with `timeout=MATCH_TIMEOUT_S` and
   `concurrent=True` (the GIL is released while matching), so whatever the guard lets through (e.g.
   overlapping alternatives, `(.|.)*x`) is cut off in bounded time. Inside `with deadline(s):` all
   matches together get at most `s` seconds (one adapter load matches a pattern against hundreds of
   module names; each just under the per-match timeout must not add up to minutes).
Both raise `UnsafeAdapterPatternError`. Syntax and semantics stay those of `re` (what PEFT uses):
`re.compile` decides validity, and `regex` in its default V0 mode matches like `re`.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import re._constants as _c  # type: ignore[import-not-found]
import re._parser as _p  # type: ignore[import-not-found]
import time
from collections.abc import Iterator
from typing import Any

import regex

from chameleon.errors import AdapterLoadError, UnsafeAdapterPatternError

MAX_PATTERN_CHARS = 1024
MAX_NESTING = 32
MAX_REPEAT_COUNT = 100
MATCH_TIMEOUT_S = 0.1
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("chameleon_regex_deadline", default=None)
_REPEATS = frozenset({_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)})
_BACKREFS = frozenset({_c.GROUPREF, _c.GROUPREF_EXISTS, getattr(_c, "GROUPREF_IGNORE", _c.GROUPREF)})


def check_pattern(pattern: str, what: str, who: str) -> None:
    """Refuse (typed) a pattern that is invalid (`AdapterLoadError`, as a bad config is) or that could
    backtrack catastrophically (`UnsafeAdapterPatternError`). Cheap: linear in the pattern's length."""
    if not isinstance(pattern, str):
        raise AdapterLoadError(f"{who}: {what} must be a string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafeAdapterPatternError(f"{who}: {what} is {len(pattern)} characters, above {MAX_PATTERN_CHARS}")
    if _paren_depth(pattern) > MAX_NESTING:
        raise UnsafeAdapterPatternError(f"{who}: {what} nests groups deeper than {MAX_NESTING}")
    try:
        re.compile(pattern)
        tree = _p.parse(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise AdapterLoadError(f"{who}: {what} is not a valid regex: {e}") from e
    problem = _complexity_problem(list(tree), inside_repeat=False)
    if problem:
        raise UnsafeAdapterPatternError(f"{who}: {what} {pattern!r} is refused: {problem}")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Every match inside the block shares one budget of `seconds` (module docstring)."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def fullmatch(pattern: str, string: str) -> bool:
    """`re.fullmatch(pattern, string) is not None`, in bounded time."""
    return _run(regex.fullmatch, pattern, string) is not None


def match(pattern: str, string: str) -> Any:
    """`re.match(pattern, string)` (a match object or None), in bounded time."""
    return _run(regex.match, pattern, string)


def _run(fn: Any, pattern: str, string: str) -> Any:
    end = _DEADLINE.get()
    timeout = MATCH_TIMEOUT_S if end is None else min(MATCH_TIMEOUT_S, end - time.monotonic())
    if timeout <= 0:
        raise UnsafeAdapterPatternError(f"matching the config's patterns took too long (at {pattern!r})")
    try:
        return fn(pattern, string, timeout=timeout, concurrent=True)
    except TimeoutError as e:
        raise UnsafeAdapterPatternError(f"pattern {pattern!r} timed out after {MATCH_TIMEOUT_S}s on {string!r}") from e
    except regex.error as e:
        raise UnsafeAdapterPatternError(f"pattern {pattern!r} cannot be matched: {e}") from e


def _paren_depth(pattern: str) -> int:
    depth = deepest = 0
    escaped = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth = max(0, depth - 1)
    return deepest


def _complexity_problem(items: list[tuple[Any, Any]], *, inside_repeat: bool) -> str | None:
    """The first catastrophic-backtracking shape in a parsed pattern, or None."""
    for op, av in items:
        problem = _node_problem(op, av, inside_repeat)
        if problem:
            return problem
    return None


def _node_problem(op: Any, av: Any, inside_repeat: bool) -> str | None:
    if op in _BACKREFS:
        return "backreferences and conditional groups are not allowed"
    if op in _REPEATS:
        low, high, body = av
        bounded_high = high if high != _c.MAXREPEAT else low
        if max(low, bounded_high) > MAX_REPEAT_COUNT:
            return f"a repeat count above {MAX_REPEAT_COUNT}"
        many = high > 1
        if many and inside_repeat:
            return "a repeat nested inside a repeat (catastrophic backtracking)"
        return _complexity_problem(list(body), inside_repeat=inside_repeat or many)
    return _children_problem(op, av, inside_repeat)


def _children_problem(op: Any, av: Any, inside_repeat: bool) -> str | None:
    if op == _c.SUBPATTERN:
        return _complexity_problem(list(av[-1]), inside_repeat=inside_repeat)
    if op == _c.BRANCH:
        for alt in av[1]:
            problem = _complexity_problem(list(alt), inside_repeat=inside_repeat)
            if problem:
                return problem
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return _complexity_problem(list(av[1]), inside_repeat=inside_repeat)
    if op == getattr(_c, "ATOMIC_GROUP", None):
        return _complexity_problem(list(av), inside_repeat=inside_repeat)
    return None
