"""Command templates with every substituted value shell-quoted.

A template such as ``python3 sim.py --alpha {alpha} --out {output}`` comes from the
operator's configuration; the values come from messages. Each value is passed
through :func:`shlex.quote` before it is substituted, so no value can end a word,
start a new command or expand a variable. The finished command is wrapped as
``/bin/sh -c '<command>'`` because Azure Batch runs a task's command line without
a shell; the local executor runs it the same way (``shlex.split``, no shell).
"""

from __future__ import annotations

import shlex
import string
from collections.abc import Iterable, Mapping, Sequence

from handlers.errors import InvalidParams

_FORMATTER = string.Formatter()


class CommandTemplate:
    """A parsed command template; :meth:`render` substitutes already-quoted values."""

    __slots__ = ("fields", "source", "_format")

    def __init__(self, source: str) -> None:
        self.source = source
        fields: list[str] = []
        for _literal, name, spec, conversion in _FORMATTER.parse(source):
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise ValueError(
                    f"template field {{{name}}} in {source!r} must be a plain name "
                    "(no attribute, index, format spec or conversion)"
                )
            fields.append(name)
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(fields))
        self._format = source.format_map

    def missing(self, available: Iterable[str]) -> list[str]:
        """Fields of the template that ``available`` does not supply."""
        have = set(available)
        return [name for name in self.fields if name not in have]

    def render_quoted(self, quoted: Mapping[str, str]) -> str:
        """Substitute values that the caller has already passed through ``quote``."""
        return self._format(quoted)

    def render(self, values: Mapping[str, object]) -> str:
        """Quote each value and substitute it; raise ``InvalidParams`` if one is missing."""
        lacking = self.missing(values)
        if lacking:
            raise InvalidParams(
                f"the command template needs {', '.join(lacking)} but no value was given"
            )
        return self._format({name: quote(values[name]) for name in self.fields})


def quote(value: object) -> str:
    """Render ``value`` as text (JSON-ish for bools and None) and shell-quote it."""
    return shlex.quote(as_text(value))


def as_text(value: object) -> str:
    """The text form a parameter takes in a command line and in the environment.

    Raises ``InvalidParams`` for text no command line or environment can carry: a NUL
    character, or a lone surrogate (``"\\ud800"`` is valid JSON but not Unicode text).
    """
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    text = str(value)
    if "\x00" in text:
        raise InvalidParams(f"the value {text[:40]!r} holds a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidParams(f"the value {text[:40]!r} holds a lone surrogate, "
                                "which is not Unicode text") from None
    return text


def sh(command: str) -> str:
    """Wrap a shell command so it runs the same on Batch and on the local executor."""
    return "/bin/sh -c " + shlex.quote(command)


#: How ``shlex.quote`` writes a ``'`` inside single quotes.
_QUOTED_QUOTE = "'\"'\"'"


def sh_escape(quoted: str) -> str:
    """A value already through :func:`quote`, escaped for the inside of :func:`sh_parts`'s
    ``/bin/sh -c '...'``."""
    return quoted.replace("'", _QUOTED_QUOTE)


def sh_parts(template: CommandTemplate, order: Sequence[str]) -> list[str | int] | None:
    """``sh(template.render_quoted(values))`` as its pieces, or None.

    The pieces are literal text (the ``/bin/sh -c '`` around it included) and, for each
    field, its position in ``order``; joining them with each value put through
    :func:`quote` then :func:`sh_escape` gives exactly ``sh(...)``: when the template's
    literal text needs quoting (a space is enough) ``shlex.quote`` wraps the whole line
    in ``'...'`` and escapes each ``'``, which distributes over the parts. None when the
    literal text alone would not need quoting. This spares building a million command
    lines a ``shlex.quote`` of each whole line, and lets a caller substitute the values
    that change rarely once (:func:`bind_parts`).
    """
    parts: list[str | int] = ["/bin/sh -c '"]
    needs_quoting = False
    for literal, name, _spec, _conversion in _FORMATTER.parse(template.source):
        needs_quoting = needs_quoting or (bool(literal) and shlex.quote(literal) != literal)
        parts.append(sh_escape(literal))
        if name is not None:
            parts.append(order.index(name))
    parts.append("'")
    return bind_parts(parts, {}) if needs_quoting else None


def bind_parts(parts: Sequence[str | int], values: Mapping[int, str]) -> list[str | int]:
    """``parts`` with the positions in ``values`` replaced by their (escaped) text and
    adjacent text joined: what is left alternates text and positions, and starts and
    ends with text (``[head, 2, tail]`` for a single position left)."""
    out: list[str | int] = []
    run = ""  # the text since the last position left
    for part in parts:
        text = values.get(part) if isinstance(part, int) else part
        if text is None:
            out += [run, part]
            run = ""
        else:
            run += text
    out.append(run)
    return out


def parts_format(parts: Sequence[str | int]) -> str:
    """The ``str.format`` string that joins ``parts``: ``{i}`` for position ``i``."""
    return "".join(f"{{{p}}}" if isinstance(p, int) else p.replace("{", "{{").replace("}", "}}")
                   for p in parts)
