"""qplug.patterns: config regexes are checked once and matched in linear time (issue 13, item 7)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qplug.patterns import MAX_PATTERN_LENGTH, PatternError, compile_pattern

# Patterns that take Python's backtracking `re` exponential (or high-polynomial) time on a name
# that almost matches; each must be answered at once here.
CATASTROPHIC = [r"(.|.)*Z", r"(a*)*b", r"(a|aa)*c", r"(\w+\.?)*!", r".*.*.*.*.*.*.*.*.*.*Z", r"(x+x+)+y"]


@pytest.mark.parametrize("source", CATASTROPHIC)
def test_catastrophic_patterns_take_linear_time(source):
    pattern = compile_pattern(source)
    for name in ("model.layers.0.self_attn.q_proj" * 20, "a" * 2000, "x" * 2000):
        started = time.perf_counter()
        assert not pattern.fullmatch(name)
        assert not pattern.match(name) or source.startswith(".*")
        assert time.perf_counter() - started < 2.0, source


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("(", "missing ')'"),
        ("a)", "unbalanced"),
        ("[a", "unterminated character set"),
        ("*a", "nothing to repeat"),
        ("a**", "multiple repeat"),
        ("a{3,2}", "min repeat greater"),
        ("a{101}", "repeat count over 100"),
        (r"(a)\1", "unsupported escape"),
        ("(?=a)b", "unsupported group"),
        ("(?i)lm_head", "unsupported group"),
        (r"\bx", "unsupported escape"),
        ("[z-a]", "bad character range"),
        ("((((((((((" * 11 + ")))))))))))" * 10, "nested"),
        ("(a{100}){100}", "too large"),
        ("a" * (MAX_PATTERN_LENGTH + 1), "too long"),
    ],
)
def test_invalid_or_unsupported_patterns_are_refused_with_the_reason(source, why):
    with pytest.raises(PatternError, match=re.escape(why)):
        compile_pattern(source)


def test_non_strings_are_refused():
    with pytest.raises(PatternError, match="must be a string"):
        compile_pattern(["lm_head"])  # type: ignore[arg-type]


def test_the_largest_pattern_is_still_quick():
    pattern = compile_pattern("(.|.)" * 160 + "Z")  # close to MAX_STATES, with every state live at once
    names = [f"model.layers.{i}.mlp.gate_proj" * 4 for i in range(300)]
    started = time.perf_counter()
    assert not any(pattern.fullmatch(name) for name in names)
    assert time.perf_counter() - started < 20


def test_prefix_ends_and_anchors():
    assert compile_pattern(r"model\.layers\.\d+").prefix_ends("model.layers.12.mlp") == [14, 15]
    assert compile_pattern("^lm_head$").fullmatch("lm_head")
    assert not compile_pattern("lm_head$").match("lm_head.x")
    assert compile_pattern(r"\Aa\Z").fullmatch("a")
    assert compile_pattern("x{").fullmatch("x{")  # a brace that opens no repeat count is a literal, as in re


# -- differential: the same answers as Python's re on the syntax both accept ------------------------

ALPHABET = "ab._1"
atoms = st.sampled_from(["a", "b", ".", r"\.", r"\d", r"\w", "[ab]", "[^a]", "[a-b1]", "_", "1"])


def _regexes():
    def extend(inner):
        group = inner.map(lambda r: f"({r})") | inner.map(lambda r: f"(?:{r})")
        quantified = st.tuples(group | atoms, st.sampled_from(["*", "+", "?", "{2}", "{1,2}", "{0,}", "*?"])).map(
            "".join)
        concat = st.lists(inner | quantified, min_size=2, max_size=3).map("".join)
        alternation = st.lists(inner, min_size=2, max_size=3).map("|".join)
        return group | quantified | concat | alternation

    return st.recursive(atoms, extend, max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(source=_regexes(), text=st.text(alphabet=ALPHABET, max_size=8))
def test_answers_agree_with_python_re(source, text):
    pattern = compile_pattern(source)
    assert pattern.fullmatch(text) == (re.fullmatch(source, text) is not None)
    assert pattern.match(text) == (re.match(source, text) is not None)
    ends = [end for end in range(len(text) + 1) if re.fullmatch(source, text[:end])]
    assert pattern.prefix_ends(text) == ends
