"""A structural reader for Bicep files (no compiler is available offline).

It skips comments and strings to check that braces balance, lists the top-level
declarations (param, var, resource, module, output) with the text of their bodies,
and resolves a module's formula lines with the parameter values a caller passes.
It does not type-check anything: `az bicep build` does that (docs/deploy.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PAIRS = {"{": "}", "[": "]", "(": ")"}
DECLARATION = re.compile(
    r"^(?P<keyword>param|var|resource|module|output|targetScope|func|type|metadata)\b"
    r"\s*(?P<rest>.*)$", re.M)


@dataclass
class Declaration:
    """One top-level declaration: ``resource queue 'Type@ver' = {...}`` and the like."""

    keyword: str
    name: str
    header: str
    body: str


def blank_strings_and_comments(text: str) -> str:
    """The text with comments removed and string contents replaced by spaces."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.index("*/", i) + 2
            out.append(" " * (end - i))
            i = end
        elif text.startswith("'''", i):
            end = text.index("'''", i + 3) + 3
            out.append("'" + " " * (end - i - 2) + "'")
            i = end
        elif text[i] == "'":
            j = i + 1
            while text[j] != "'":
                j += 2 if text[j] == "\\" else 1
                if j >= len(text) or text[j - 1] == "\n":
                    raise ValueError(f"unterminated string at offset {i}")
            out.append("'" + " " * (j - i - 1) + "'")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def strip_comments(text: str) -> str:
    """The text with comments blanked and strings kept, for reading string literals
    (an apostrophe in a comment would otherwise seem to open a string)."""
    code = blank_strings_and_comments(text)  # same length; strings keep their quotes
    kept = list(text)
    in_string = False
    for offset, char in enumerate(code):
        if char == "'":
            in_string = not in_string
        elif not in_string and char == " " and not text[offset].isspace():
            kept[offset] = " "  # a comment's character
    return "".join(kept)


def unbalanced(text: str) -> list[str]:
    """Where brackets do not pair up (outside strings and comments)."""
    stack: list[tuple[str, int]] = []
    problems = []
    code = blank_strings_and_comments(text)
    for offset, char in enumerate(code):
        if char in PAIRS:
            stack.append((char, offset))
        elif char in PAIRS.values():
            if not stack or PAIRS[stack[-1][0]] != char:
                problems.append(f"unexpected {char!r} at line {code.count(chr(10), 0, offset) + 1}")
            else:
                stack.pop()
    problems += [f"unclosed {c!r} from line {code.count(chr(10), 0, o) + 1}" for c, o in stack]
    return problems


def _matching(code: str, start: int) -> int:
    depth = 0
    for offset in range(start, len(code)):
        if code[offset] in PAIRS:
            depth += 1
        elif code[offset] in PAIRS.values():
            depth -= 1
            if depth == 0:
                return offset
    raise ValueError(f"no closing bracket for offset {start}")


def declarations(text: str) -> list[Declaration]:
    """Top-level declarations, each with its header line and its body's text."""
    code = blank_strings_and_comments(text)
    found = []
    for match in DECLARATION.finditer(code):
        keyword = match.group("keyword")
        rest_start = match.start("rest")
        line_end = code.find("\n", rest_start)
        line_end = len(code) if line_end < 0 else line_end
        name = text[rest_start:line_end].split()[0] if keyword != "targetScope" else keyword
        opener = re.search(r"[{\[(]\s*$", code[rest_start:line_end])
        end = line_end
        if opener:
            start = rest_start + opener.start()
            close = _matching(code, start)
            end = code.find("\n", close)
            end = len(code) if end < 0 else end
        found.append(Declaration(keyword, name, text[match.start():line_end],
                                 text[rest_start:end]))
    return found


def by_name(decls: list[Declaration], keyword: str) -> dict[str, Declaration]:
    """Declarations of one keyword, keyed by symbol name."""
    return {d.name: d for d in decls if d.keyword == keyword}


def type_and_version(decl: Declaration) -> tuple[str, str]:
    """``('Microsoft.ServiceBus/namespaces/queues', '2021-11-01')`` of a resource."""
    match = re.search(r"'([\w.]+/[\w./]+)@([^']+)'", decl.header)
    if not match:
        raise ValueError(f"resource {decl.name} has no 'Type@apiVersion'")
    return match.group(1), match.group(2)


def param_defaults(decls: list[Declaration]) -> dict[str, str]:
    """Default values of params, as source text (quotes stripped from strings)."""
    defaults = {}
    for decl in decls:
        if decl.keyword == "param":
            match = re.search(r"=\s*(.+)$", decl.header)
            if match:
                defaults[decl.name] = match.group(1).strip().strip("'")
    return defaults


def module_params(decl: Declaration) -> dict[str, str]:
    """The ``name: value`` lines of a module's ``params`` block, as source text."""
    match = re.search(r"params:\s*\{(.*)\}", decl.body, re.S)
    assert match, f"module {decl.name} passes no params"
    values = {}
    depth = 0
    for line in match.group(1).splitlines():
        stripped = line.strip()
        item = re.match(r"(\w+):\s*(.*)$", stripped)
        if depth == 0 and item:
            values[item.group(1)] = item.group(2).strip().strip("'")
        depth += stripped.count("{") + stripped.count("[")
        depth -= stripped.count("}") + stripped.count("]")
    return values


def join_lines(body: str) -> list[str]:
    """The string items of the first ``join([...], ...)`` in a body."""
    match = re.search(r"join\(\[\n(.*?)\n\s*\],", body, re.S)
    assert match, "no join([...]) here"
    return [re.sub(r"^'(.*)'$", r"\1", line.strip()).replace("\\'", "'")
            for line in match.group(1).splitlines() if line.strip()]


def interpolate(line: str, values: dict[str, str]) -> str:
    """Replace ``${name}`` by its value; every name must be known."""
    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise KeyError(f"no value for ${{{match.group(1)}}}")
        return values[match.group(1)]

    return re.sub(r"\$\{([\w.]+)\}", value, line)


def static_values(decls: list[Declaration]) -> dict[str, str]:
    """Values known before a deployment, for ``interpolate``: each param's default, and
    ``<symbol>.name`` of each resource whose name is a param or a string literal."""
    values = param_defaults(decls)
    for decl in decls:
        if decl.keyword != "resource":
            continue
        match = re.search(r"^\s*name:\s*(\S+)\s*$", decl.body, re.M)
        if not match:
            continue
        name = match.group(1)
        if re.fullmatch(r"'[^'$]*'", name):
            values[f"{decl.name}.name"] = name.strip("'")
        elif name in values:
            values[f"{decl.name}.name"] = values[name]
    return values


def fanout_toml(text: str, runtime: dict[str, str]) -> str:
    """main.bicep's ``fanoutToml`` output as the deployment would print it, with the
    values only Azure knows (endpoints, pool names) taken from ``runtime``."""
    decls = declarations(text)
    lines = join_lines(by_name(decls, "output")["fanoutToml"].body)
    values = {**static_values(decls), **runtime}
    return "\n".join(interpolate(line, values) for line in lines) + "\n"
