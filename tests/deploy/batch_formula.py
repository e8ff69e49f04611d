"""An interpreter for the subset of Azure Batch's autoscale formula language that
fanout's pool formulas use, so tests can run a formula against simulated pool
metrics instead of only reading its text.

Supported: ``$var = expr;`` statements, ``//`` comments, numbers, the ternary
``?:``, ``|| && == != < <= > >= + - * /``, unary ``-`` and ``!``, the functions
``min max avg sum ceil floor abs``, ``TimeInterval_*`` constants, ``taskcompletion``
and friends, and on service-defined sampled variables the methods
``GetSample(count | interval[, percent])`` and ``GetSamplePercent(interval)``.
Samples are taken every 30 seconds, as the Batch service does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

SAMPLE_PERIOD = 30.0
INTERVALS = {"TimeInterval_Second": 1.0, "TimeInterval_Minute": 60.0,
             "TimeInterval_Hour": 3600.0, "TimeInterval_Day": 86400.0}
DEALLOCATION = ("requeue", "terminate", "taskcompletion", "retaineddata")


@dataclass(frozen=True)
class Interval:
    """A time span (the formula language's timeinterval type)."""

    seconds: float


@dataclass(frozen=True)
class Samples:
    """A service-defined sampled metric, newest sample last."""

    values: tuple[float, ...]


class FormulaError(Exception):
    """Raised when a formula does not parse or evaluates to an error, as Batch would."""


Value = Union[float, "list[float]", Interval, Samples, str]  # noqa: UP007
TOKEN = re.compile(r"\s*(?:(//[^\n]*)|(\d+(?:\.\d+)?)|(\$?[A-Za-z_]\w*)"
                   r"|(\|\||&&|[=!<>]=|[-+*/?:;(),.<>=!]))")


def tokenize(text: str) -> list[str]:
    """Tokens of a formula, comments dropped."""
    tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise FormulaError(f"cannot read the formula at {text[pos:pos + 20]!r}")
        pos = match.end()
        if match.group(1) is None:
            tokens.append(next(g for g in match.groups()[1:] if g is not None))
    return tokens


class Evaluator:
    """Evaluates a formula against service-defined variables; results in ``variables``."""

    def __init__(self, service: dict[str, Value]) -> None:
        self.variables: dict[str, Value] = dict(service)
        self._tokens: list[str] = []
        self._pos = 0

    def run(self, formula: str) -> dict[str, Value]:
        """Evaluate every statement in order; return all variables."""
        self._tokens, self._pos = tokenize(formula), 0
        while self._pos < len(self._tokens):
            name = self._take()
            if not name.startswith("$"):
                raise FormulaError(f"expected a $variable, found {name!r}")
            self._expect("=")
            self.variables[name] = self._ternary()
            self._expect(";")
        return self.variables

    def _peek(self) -> str | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise FormulaError("the formula ends early")
        self._pos += 1
        return token

    def _expect(self, token: str) -> None:
        got = self._take()
        if got != token:
            raise FormulaError(f"expected {token!r}, found {got!r}")

    def _ternary(self) -> Value:
        cond = self._binary(0)
        if self._peek() != "?":
            return cond
        self._take()
        yes = self._ternary()
        self._expect(":")
        no = self._ternary()
        return yes if scalar(cond) != 0 else no

    _LEVELS: Sequence[dict[str, Callable[[float, float], float]]] = (
        {"||": lambda a, b: float(bool(a) or bool(b))},
        {"&&": lambda a, b: float(bool(a) and bool(b))},
        {"==": lambda a, b: float(a == b), "!=": lambda a, b: float(a != b),
         "<": lambda a, b: float(a < b), "<=": lambda a, b: float(a <= b),
         ">": lambda a, b: float(a > b), ">=": lambda a, b: float(a >= b)},
        {"+": lambda a, b: a + b, "-": lambda a, b: a - b},
        {"*": lambda a, b: a * b, "/": lambda a, b: a / b},
    )

    def _binary(self, level: int) -> Value:
        if level == len(self._LEVELS):
            return self._unary()
        left = self._binary(level + 1)
        while self._peek() in self._LEVELS[level]:
            op = self._take()
            right = self._binary(level + 1)
            if isinstance(left, Interval) or isinstance(right, Interval):
                left = interval_math(op, left, right)
            else:
                if op == "/" and scalar(right) == 0:
                    raise FormulaError("division by zero")
                left = self._LEVELS[level][op](scalar(left), scalar(right))
        return left

    def _unary(self) -> Value:
        if self._peek() == "-":
            self._take()
            return -scalar(self._unary())
        if self._peek() == "!":
            self._take()
            return float(scalar(self._unary()) == 0)
        return self._postfix()

    def _postfix(self) -> Value:
        value = self._primary()
        while self._peek() == ".":
            self._take()
            method = self._take()
            args = self._args()
            value = sample_method(value, method, args)
        return value

    def _args(self) -> list[Value]:
        self._expect("(")
        args: list[Value] = []
        while self._peek() != ")":
            args.append(self._ternary())
            if self._peek() == ",":
                self._take()
        self._expect(")")
        return args

    def _primary(self) -> Value:
        token = self._take()
        if token == "(":
            value = self._ternary()
            self._expect(")")
            return value
        if re.fullmatch(r"\d+(\.\d+)?", token):
            return float(token)
        if token.startswith("$"):
            if token not in self.variables:
                raise FormulaError(f"{token} is used before it is set")
            return self.variables[token]
        if token in INTERVALS:
            return Interval(INTERVALS[token])
        if token in DEALLOCATION:
            return token
        if self._peek() == "(":
            return call(token, self._args())
        raise FormulaError(f"unknown name {token!r}")


def scalar(value: Value) -> float:
    """A value as a double (a one-element vector is one; anything else is an error)."""
    if isinstance(value, float | int):
        return float(value)
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    raise FormulaError(f"expected a number, got {value!r}")


def flatten(args: list[Value]) -> list[float]:
    """The numbers of a doubleVecList argument list."""
    out: list[float] = []
    for arg in args:
        out.extend(arg if isinstance(arg, list) else [scalar(arg)])
    return out


def call(name: str, args: list[Value]) -> Value:
    """A built-in function."""
    numbers = flatten(args)
    functions: dict[str, Callable[[list[float]], float]] = {
        "min": min, "max": max, "sum": sum,
        "avg": lambda xs: sum(xs) / len(xs),
        "ceil": lambda xs: float(math.ceil(xs[0])), "floor": lambda xs: float(math.floor(xs[0])),
        "abs": lambda xs: abs(xs[0]),
    }
    if name not in functions:
        raise FormulaError(f"unknown function {name}")
    if not numbers:
        raise FormulaError(f"{name}() of nothing")
    return functions[name](numbers)


def interval_math(op: str, left: Value, right: Value) -> Interval:
    """Interval times or plus a number or interval."""
    def secs(v: Value) -> float:
        return v.seconds if isinstance(v, Interval) else scalar(v)

    if op == "*":
        return Interval(secs(left) * secs(right))
    if op == "+":
        return Interval(secs(left) + secs(right))
    raise FormulaError(f"cannot apply {op} to a time interval")


def sample_method(value: Value, method: str, args: list[Value]) -> Value:
    """GetSample / GetSamplePercent on a sampled service variable."""
    if not isinstance(value, Samples):
        raise FormulaError(f".{method}() on a value that is not a sampled metric")
    samples = value.values
    if method == "GetSamplePercent":
        window = args[0]
        if not isinstance(window, Interval):
            raise FormulaError("GetSamplePercent takes a time interval")
        expected = max(1, int(window.seconds // SAMPLE_PERIOD))
        return 100.0 * min(len(samples), expected) / expected
    if method != "GetSample":
        raise FormulaError(f"unknown method {method}")
    what = args[0]
    if isinstance(what, Interval):
        expected = max(1, int(what.seconds // SAMPLE_PERIOD))
        chosen = list(samples[-expected:])
        if len(args) > 1 and 100.0 * len(chosen) / expected < scalar(args[1]):
            raise FormulaError("GetSample: too few samples in the interval")
    else:
        chosen = list(samples[-int(scalar(what)):])
    if not chosen:
        raise FormulaError("GetSample: no sample")
    return chosen
