"""Regular expressions from configs, checked once and matched in time linear in the name's length.

Configs come from strangers: skip lists (``"re:..."`` entries), GPTQModel's ``dynamic`` keys and
bitsandbytes' skip keys (which transformers reads as regular expressions) carry patterns that are
matched against every module name of a model. Python's :mod:`re` backtracks, so a pattern such as
``(.|.)*Z`` takes exponential time. qplug instead compiles each pattern into a small automaton and
runs it as a lazily built DFA: every name is read once, character by character, whatever the pattern.

The syntax is the part of Python's (and RE2's) that names need:

* literal characters and escaped punctuation (``\\.``), ``.`` (any character but a newline);
* the classes ``\\d \\D \\w \\W \\s \\S`` and sets ``[abc]``, ``[a-z0-9_]``, ``[^.]``;
* groups ``(...)``, ``(?:...)``, ``(?P<name>...)``, and alternation ``a|b``;
* the quantifiers ``* + ?`` and ``{m}``, ``{m,}``, ``{m,n}`` (at most 100), greedy or lazy (``*?``);
* the anchors ``^`` (start of the name) and ``$`` (end of the name), ``\\A`` and ``\\Z``.

Backreferences, lookaround, inline flags and other extensions are refused with a message saying
so: a pattern either compiles here or is a :class:`PatternError` at config validation. A pattern
is at most :data:`MAX_PATTERN_LENGTH` characters and :data:`MAX_STATES` automaton states, which
bounds the work per character of a name (and the memory of the transitions cached per pattern).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from qplug.errors import QPlugError

__all__ = ["MAX_PATTERN_LENGTH", "MAX_STATES", "Pattern", "PatternError", "compile_pattern"]

#: The longest pattern accepted, in characters.
MAX_PATTERN_LENGTH = 1000
#: The most automaton states a pattern may compile to (counted repetitions are expanded).
MAX_STATES = 1000
_MAX_REPEAT = 100
_MAX_DEPTH = 100
# State-set members kept in a pattern's transition cache before it starts over (bounds memory).
_MAX_CACHED = 1_000_000


class PatternError(QPlugError, ValueError):
    """A pattern is not a regular expression qplug accepts; the message says where and why."""


# --------------------------------------------------------------------------------------------
# Character predicates
# --------------------------------------------------------------------------------------------

CharTest = Callable[[str], bool]


def _is_digit(c: str) -> bool:
    return c.isdecimal()


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _is_space(c: str) -> bool:
    return c.isspace()


_CLASSES: dict[str, CharTest] = {
    "d": _is_digit,
    "D": lambda c: not _is_digit(c),
    "w": _is_word,
    "W": lambda c: not _is_word(c),
    "s": _is_space,
    "S": lambda c: not _is_space(c),
}
_CONTROL = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}


# --------------------------------------------------------------------------------------------
# Parsing: pattern text → syntax tree
#   ("char", test) | ("empty",) | ("bol",) | ("eol",) | ("cat", [nodes]) | ("alt", [nodes])
#   | ("repeat", node, low, high-or-None)
# --------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def fail(self, why: str, at: int | None = None) -> PatternError:
        where = self.pos if at is None else at
        return PatternError(f"{why} at position {where} of {self.text!r}")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def parse(self) -> tuple:
        node = self.alternation()
        if self.pos < len(self.text):
            raise self.fail("unbalanced ')'")
        return node

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self) -> tuple:
        items: list[tuple] = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.quantified(self.atom()))
        return ("cat", items) if items else ("empty",)

    def quantified(self, node: tuple) -> tuple:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and self._counted() is not None:
            low, high, self.pos = self._counted()  # type: ignore[misc]
        else:
            return node
        if node[0] in ("bol", "eol", "empty"):
            raise self.fail("nothing to repeat", self.pos - 1)
        if self.peek() == "?":  # lazy: the same set of matches
            self.pos += 1
        if self.peek() in ("*", "+", "?", "{") and (self.peek() != "{" or self._counted() is not None):
            raise self.fail("multiple repeat (possessive and nested quantifiers are not supported)")
        return ("repeat", node, low, high)

    def _counted(self) -> tuple[int, int | None, int] | None:
        # Python reads "{" that does not start a valid {m}, {m,}, {m,n} (or {,n}) as a literal.
        end = self.text.find("}", self.pos)
        if end < 0:
            return None
        body = self.text[self.pos + 1 : end]
        low_text, comma, high_text = body.partition(",")
        if not (low_text.isdigit() or (comma and not low_text)) or (high_text and not high_text.isdigit()):
            return None
        if not low_text.isascii() or not high_text.isascii():
            return None
        low = int(low_text) if low_text else 0
        high = (int(high_text) if high_text else None) if comma else low
        if low > _MAX_REPEAT or (high is not None and high > _MAX_REPEAT):
            raise self.fail(f"repeat count over {_MAX_REPEAT}")
        if high is not None and high < low:
            raise self.fail("min repeat greater than max repeat")
        return low, high, end + 1

    def atom(self) -> tuple:
        c = self.text[self.pos]
        start = self.pos
        self.pos += 1
        if c == "(":
            return self.group(start)
        if c == "[":
            return ("char", self.char_set(start))
        if c == "\\":
            return self.escape(in_set=False)
        if c == ".":
            return ("char", lambda ch: ch != "\n")
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c in "*+?":
            raise self.fail("nothing to repeat", start)
        if c == "{" and self._counted_at(start):
            raise self.fail("nothing to repeat", start)
        return ("char", _literal(c))

    def _counted_at(self, start: int) -> bool:
        saved, self.pos = self.pos, start
        try:
            return self._counted() is not None
        finally:
            self.pos = saved

    def group(self, start: int) -> tuple:
        if self.text.startswith("?:", self.pos):
            self.pos += 2
        elif self.text.startswith("?P<", self.pos):
            end = self.text.find(">", self.pos)
            name = self.text[self.pos + 3 : end] if end >= 0 else ""
            if end < 0 or not name.isidentifier():
                raise self.fail("bad group name", start)
            self.pos = end + 1
        elif self.peek() == "?":
            raise self.fail("unsupported group syntax '(?...' (lookaround, flags and backreferences are refused)",
                            start)
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"groups nested more than {_MAX_DEPTH} deep", start)
        node = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            raise self.fail("missing ')', unterminated subpattern", start)
        self.pos += 1
        return node

    def escape(self, *, in_set: bool) -> tuple:
        if self.pos >= len(self.text):
            raise self.fail("bad escape (end of pattern)")
        c = self.text[self.pos]
        self.pos += 1
        if c in _CLASSES:
            return ("char", _CLASSES[c])
        if c in _CONTROL:
            return ("char", _literal(_CONTROL[c]))
        if not in_set and c == "A":
            return ("bol",)
        if not in_set and c in "Zz":
            return ("eol",)
        if c.isascii() and c.isalnum():
            raise self.fail(f"unsupported escape '\\{c}'", self.pos - 2)
        return ("char", _literal(c))

    def char_set(self, start: int) -> CharTest:
        negate = self.peek() == "^"
        if negate:
            self.pos += 1
        singles: set[str] = set()
        ranges: list[tuple[str, str]] = []
        tests: list[CharTest] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("unterminated character set", start)
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            low = self._set_item(tests)
            if low is None:
                continue
            if self.peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.pos += 1
                high = self._set_item(tests)
                if high is None:
                    raise self.fail("bad character range", start)
                if high < low:
                    raise self.fail(f"bad character range {low}-{high}", start)
                ranges.append((low, high))
            else:
                singles.add(low)
        frozen = frozenset(singles)

        def test(ch: str) -> bool:
            hit = ch in frozen or any(lo <= ch <= hi for lo, hi in ranges) or any(t(ch) for t in tests)
            return hit != negate

        return test

    def _set_item(self, tests: list[CharTest]) -> str | None:
        """One member of a ``[...]`` set: a character (returned) or a class (added to ``tests``)."""
        c = self.text[self.pos]
        self.pos += 1
        if c == "[" and self.peek() in (":", "=", "."):
            raise self.fail("POSIX classes such as [:alpha:] are not supported", self.pos - 1)
        if c != "\\":
            return c
        node = self.escape(in_set=True)
        escaped = self.text[self.pos - 1]
        if escaped in _CLASSES:
            tests.append(node[1])
            return None
        return _CONTROL.get(escaped, escaped)


def _literal(c: str) -> CharTest:
    return c.__eq__


# --------------------------------------------------------------------------------------------
# Compiling: syntax tree → automaton (Thompson's construction)
# --------------------------------------------------------------------------------------------

# State kinds. Each state is [kind, test-or-None, out1, out2].
_CHAR, _SPLIT, _BOL, _EOL, _MATCH = range(5)


class _Builder:
    def __init__(self, source: str) -> None:
        self.states: list[list] = []
        self.source = source

    def new(self, kind: int, test: CharTest | None = None) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"pattern {self.source!r} is too large (over {MAX_STATES} states once expanded)")
        self.states.append([kind, test, None, None])
        return len(self.states) - 1

    def build(self, node: tuple) -> tuple[int, list[tuple[int, int]]]:
        """A fragment: its start state and the dangling exits (state, slot) to patch."""
        kind = node[0]
        if kind == "char":
            s = self.new(_CHAR, node[1])
            return s, [(s, 2)]
        if kind in ("bol", "eol", "empty"):
            s = self.new({"bol": _BOL, "eol": _EOL, "empty": _SPLIT}[kind])
            return s, [(s, 2)]
        if kind == "cat":
            start, exits = self.build(node[1][0])
            for item in node[1][1:]:
                nxt, nxt_exits = self.build(item)
                self.patch(exits, nxt)
                exits = nxt_exits
            return start, exits
        if kind == "alt":
            first, exits = self.build(node[1][0])
            for item in node[1][1:]:
                other, other_exits = self.build(item)
                split = self.new(_SPLIT)
                self.states[split][2], self.states[split][3] = first, other
                first, exits = split, exits + other_exits
            return first, exits
        _, inner, low, high = node
        pieces: list[tuple[int, list[tuple[int, int]]]] = [self.build(inner) for _ in range(low)]
        if high is None:  # then a loop: split → inner → back to split
            split = self.new(_SPLIT)
            body, body_exits = self.build(inner)
            self.states[split][2] = body
            self.patch(body_exits, split)
            pieces.append((split, [(split, 3)]))
        else:
            for _ in range(high - low):
                split = self.new(_SPLIT)
                body, body_exits = self.build(inner)
                self.states[split][2] = body
                pieces.append((split, [(split, 3), *body_exits]))
        if not pieces:
            s = self.new(_SPLIT)
            return s, [(s, 2)]
        start, exits = pieces[0]
        for nxt, nxt_exits in pieces[1:]:
            self.patch(exits, nxt)
            exits = nxt_exits
        return start, exits

    def patch(self, exits: list[tuple[int, int]], target: int) -> None:
        for state, slot in exits:
            self.states[state][slot] = target


class Pattern:
    """A compiled pattern. Matching reads the text once; transitions are cached as they are met.

    :param source: the pattern text, as given.
    """

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise PatternError(f"a pattern must be a string, not {type(source).__name__}")
        if len(source) > MAX_PATTERN_LENGTH:
            raise PatternError(f"pattern of {len(source)} characters is too long (at most {MAX_PATTERN_LENGTH})")
        self.source = source
        builder = _Builder(source)
        start, exits = builder.build(_Parser(source).parse())
        accept = builder.new(_MATCH)
        builder.patch(exits, accept)
        self._states = builder.states
        self._start = start
        self._moves: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._cached = 0
        self._begin: frozenset[int] | None = None

    def __repr__(self) -> str:
        return f"Pattern({self.source!r})"

    # -- automaton ---------------------------------------------------------------------------

    def _closure(self, seeds, *, at_start: bool, at_end: bool) -> frozenset[int]:
        states = self._states
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            s = stack.pop()
            if s is None or s in seen:
                continue
            seen.add(s)
            kind = states[s][0]
            if kind == _SPLIT:
                stack.append(states[s][2])
                stack.append(states[s][3])
            elif (kind == _BOL and at_start) or (kind == _EOL and at_end):
                stack.append(states[s][2])
        return frozenset(seen)

    def _begin_set(self) -> frozenset[int]:
        if self._begin is None:
            self._begin = self._closure([self._start], at_start=True, at_end=False)
        return self._begin

    def _step(self, current: frozenset[int], ch: str) -> frozenset[int]:
        key = (current, ch)
        nxt = self._moves.get(key)
        if nxt is None:
            states = self._states
            seeds = [states[s][2] for s in current if states[s][0] == _CHAR and states[s][1](ch)]
            nxt = self._closure(seeds, at_start=False, at_end=False)
            if self._cached >= _MAX_CACHED:
                self._moves.clear()
                self._cached = 0
            self._moves[key] = nxt
            self._cached += len(current) + len(nxt)
        return nxt

    def _accepts(self, current: frozenset[int], *, at_start: bool, at_end: bool) -> bool:
        if at_end or at_start:
            current = self._closure(current, at_start=at_start, at_end=at_end)
        return any(self._states[s][0] == _MATCH for s in current)

    def _run(self, text: str, stop_early: bool):
        """Yield every end position ``e`` such that ``text[:e]`` matches (in increasing order)."""
        current = self._begin_set()
        n = len(text)
        for i in range(n + 1):
            if not current:
                return
            if self._accepts(current, at_start=i == 0, at_end=i == n):
                yield i
                if stop_early:
                    return
            if i < n:
                current = self._step(current, text[i])

    # -- matching ----------------------------------------------------------------------------

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (:func:`re.fullmatch`)."""
        return any(end == len(text) for end in self._run(text, stop_early=False))

    def match(self, text: str) -> bool:
        """Whether a prefix of ``text`` matches (:func:`re.match`)."""
        return any(True for _ in self._run(text, stop_early=True))

    def prefix_ends(self, text: str) -> list[int]:
        """Every ``e`` such that ``text[:e]`` matches, in increasing order."""
        return list(self._run(text, stop_early=False))


def compile_pattern(source: str) -> Pattern:
    """The compiled :class:`Pattern` for ``source`` (cached: configs compile their patterns once).

    :raises PatternError: the syntax is wrong, unsupported, or the pattern is too large.
    """
    if not isinstance(source, str):
        raise PatternError(f"a pattern must be a string, not {type(source).__name__}")
    return _compile(source)


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> Pattern:
    return Pattern(source)
