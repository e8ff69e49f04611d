"""The sweep's data path: templated per-task inputs, per-task outputs, and the results
location an aggregate task reads back.

Inputs are blob references written ``<container>/<blob name>``, the blob name a
template over the task's fields (``data/samples/{sample}.csv``): the container is
literal text, never a field, and every rendered name is checked against the blob
name rules (no ``..`` or ``.`` segment, no ``//``, no leading ``/``...) through
``BuildContext.blob_ref`` before it becomes a resource file, because field values come
from messages. A name ending in ``/`` is a prefix: every blob under it is staged (a
``storageContainerUrl`` + ``blobPrefix`` resource file). A task finds an input at its
blob name (``samples/a.csv``; a prefix's blobs at their full names) in its working
directory, as Batch stages a container.

How inputs become URLs, with the per-task path kept light:

- an input with no fields is resolved once per job, with the one-blob read SAS of
  ``BuildContext.input_url``, and the same :class:`ResourceFile` goes to every task;
- a templated input signs nothing per task: one container URL per input template per
  job (``BuildContext.input_container_url``, read+list), and each task's ``httpUrl`` is
  that container URL with the blob's quoted name appended before its query, as a
  container SAS allows. Signing each blob separately costs about 50 us on Azure, so a
  million-task sweep would spend most of a minute on signatures.

Outputs are file patterns relative to the task's working directory (``result.json``,
``plots/*.png``), uploaded to ``<results>/<task id>/`` keeping their relative layout:
``result.json`` -> ``results/<job>/3/result.json``, ``plots/*.png`` ->
``results/<job>/3/plots/<name>.png``. One output container URL is signed per job.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from handlers.base import BlobRef, BuildContext, OutputFile, ResourceFile, TaskSpec, UploadCondition
from handlers.errors import ForeignStorage, InvalidParams

__all__ = [
    "DEFAULT_OUTPUT_CONTAINER",
    "Allowed",
    "InputTemplate",
    "TaskData",
    "check_container_name",
    "check_output_pattern",
    "message_input",
    "output_files",
    "parse_allowed",
    "parse_input",
    "results_prefix",
    "segment_problem",
]

#: Where sweep outputs go unless ``[handlers.sweep] output_container`` says otherwise.
DEFAULT_OUTPUT_CONTAINER = "fanout-results"
#: The folder of the results container under which each job's results live.
RESULTS_ROOT = "results"

_FORMATTER = string.Formatter()
_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")
_WILDCARDS = re.compile(r"[*?\[]")
_SHOW = 80


def _show(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= _SHOW else shown[: _SHOW - 4] + "...'"


def check_container_name(name: str, what: str) -> str:
    """Azure's container rule (3-63 lowercase letters, digits, single hyphens); raise
    ``ValueError`` naming ``what``."""
    if not _CONTAINER.match(name):
        raise ValueError(f"{what}: container {_show(name)} is not 3-63 lowercase letters, "
                         "digits and single hyphens")
    return name


def segment_problem(name: str) -> str | None:
    """What makes ``name`` unfit as a blob name or relative path, or None: a leading
    ``/``, an empty, ``.`` or ``..`` segment, a backslash or a control character.
    (The blob name rules proper are applied by ``BuildContext.blob_ref`` too.)"""
    if not name:
        return "is empty"
    if name.startswith("/"):
        return "starts with '/'"
    if "\\" in name:
        return "contains a backslash"
    for segment in name.split("/"):
        if segment == "":
            return "has an empty path segment ('//')"
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    return None


@dataclass(frozen=True, slots=True)
class InputTemplate:
    """One input: ``container`` (literal) and ``blob``, a template over task fields.

    ``prefix`` when the blob name ends with ``/`` (stage every blob under it).
    ``head`` is the literal text before the first field (all of it without fields),
    with ``{{`` and ``}}`` read as the braces they stand for.
    """

    container: str
    blob: str
    fields: tuple[str, ...]
    head: str
    prefix: bool

    def __str__(self) -> str:
        return f"{self.container}/{self.blob}"


def parse_input(text: object, what: str = "input") -> InputTemplate:
    """Parse ``"<container>/<blob template>"``; raise ``ValueError`` naming ``what``."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: an input is \"<container>/<blob name>\", not "
                         f"{type(text).__name__}")
    container, sep, blob = text.partition("/")
    if not sep or not blob:
        raise ValueError(f"{what}: {_show(text)} is not \"<container>/<blob name>\"")
    if "{" in container or "}" in container:
        raise ValueError(f"{what}: the container of {_show(text)} must be literal text, "
                         "not a template field")
    check_container_name(container, what)
    fields: list[str] = []
    head: str | None = None
    try:
        parsed = list(_FORMATTER.parse(blob))
    except ValueError as exc:
        raise ValueError(f"{what}: {_show(text)}: {exc}") from None
    literal_text = []
    for literal, name, spec, conversion in parsed:
        literal_text.append(literal)
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"{what}: template field {{{name}}} in {_show(text)} must be a "
                             "plain name (no attribute, index, format spec or conversion)")
        if head is None:
            head = "".join(literal_text)
        fields.append(name)
        literal_text.append("x")
    prefix = blob.endswith("/")
    sample = "".join(literal_text)
    problem = segment_problem(sample[:-1] if prefix else sample)
    if problem:
        raise ValueError(f"{what}: the blob name of {_show(text)} {problem}")
    return InputTemplate(container=container, blob=blob, fields=tuple(dict.fromkeys(fields)),
                         head=sample if head is None else head, prefix=prefix)


def parse_allowed(text: object, what: str = "allowed_inputs") -> tuple[str, str]:
    """``"<container>"`` or ``"<container>/<name prefix>"`` as ``(container, prefix)``."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: an allowed input is \"<container>/<prefix>\", not "
                         f"{type(text).__name__}")
    container, _, prefix = text.partition("/")
    check_container_name(container, what)
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"{what}: {_show(text)} is a name prefix, not a template")
    if prefix:
        problem = segment_problem(prefix[:-1] if prefix.endswith("/") else prefix)
        if problem:
            raise ValueError(f"{what}: the prefix of {_show(text)} {problem}")
    return container, prefix


def check_output_pattern(pattern: object, what: str = "outputs") -> str:
    """An output file pattern: relative to the working directory, no ``..``."""
    if not isinstance(pattern, str):
        raise ValueError(f"{what}: a pattern is text, not {type(pattern).__name__}")
    problem = segment_problem(pattern)
    if problem:
        raise ValueError(f"{what}: the pattern {_show(pattern)} {problem}")
    return pattern


def results_prefix(job_id: str) -> str:
    """The blob prefix of a job's results: ``results/<job>/``."""
    return f"{RESULTS_ROOT}/{job_id}/"


def _output_path(pattern: str) -> str:
    """The part of a pattern its blobs keep under the task's prefix: the whole name of a
    plain file, the literal directories of a wildcard pattern (Batch uploads each match
    under ``path`` by its name relative to them)."""
    if not _WILDCARDS.search(pattern):
        return pattern
    literal = []
    for part in pattern.split("/")[:-1]:
        if _WILDCARDS.search(part):
            break
        literal.append(part)
    return "/".join(literal)


def output_files(patterns: Sequence[str], container_url: str, prefix: str,
                 condition: UploadCondition) -> list[OutputFile]:
    """The output files of one task whose results go under ``prefix`` (ends with ``/``)."""
    return _OutputPlan(patterns, container_url, condition).files(prefix)


class _OutputPlan:
    """A job's output patterns with their blob paths worked out once."""

    __slots__ = ("condition", "parts", "url")

    def __init__(self, patterns: Sequence[str], container_url: str,
                 condition: UploadCondition) -> None:
        self.parts = [(pattern, _output_path(pattern)) for pattern in patterns]
        self.url = container_url
        self.condition = condition

    def files(self, prefix: str) -> list[OutputFile]:
        url, condition = self.url, self.condition
        return [OutputFile(pattern, url, f"{prefix}{tail}" if tail else prefix.rstrip("/"),
                           condition) for pattern, tail in self.parts]


def _positional(blob: str, order: Sequence[str]) -> Callable[..., str]:
    """``blob`` as a positional format (``runs/{2}.csv``) over the fields in ``order``."""
    parts = []
    for literal, name, _spec, _conversion in _FORMATTER.parse(blob):
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            parts.append(f"{{{order.index(name)}}}")
    return "".join(parts).format


def _split_query(url: str) -> tuple[str, str]:
    base, sep, query = url.partition("?")
    return base.rstrip("/"), sep + query


#: A blob name every rule of ``BuildContext.blob_ref`` accepts, checked in one regex:
#: ASCII letters, digits and ``_.~ =+,@()-`` in non-empty segments that are not ``.``
#: or ``..``, not ending in ``.``. Anything else goes to ``blob_ref`` for the verdict.
_SEGMENT = r"(?!\.\.?(?:/|\Z))[\w.~ =+,@()-]+"
_PLAIN_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*(?<!\.)\Z", re.ASCII)
#: Names ``quote(name, safe="/~")`` leaves as they are.
_URL_SAFE = re.compile(r"[\w.~/-]*\Z", re.ASCII)


class _Templated:
    """One templated input of a job: renders, checks and builds a resource file."""

    __slots__ = ("allowed", "base", "ctx", "fmt", "query", "template", "what")

    def __init__(self, template: InputTemplate, order: Sequence[str], ctx: BuildContext,
                 allowed: tuple[str, ...] | None, what: str) -> None:
        self.template = template
        self.fmt = _positional(template.blob, order)
        self.ctx = ctx
        self.allowed = allowed
        self.what = what
        head_dir = template.head.rpartition("/")[0]
        url = ctx.input_container_url(template.container, head_dir + "/" if head_dir else "")
        self.base, self.query = _split_query(url)

    def check(self, name: str, task_id: str) -> None:
        """Refuse a rendered name that breaks the blob name rules or leaves the
        program's allowed inputs (``InvalidParams``, ``ForeignStorage``)."""
        t = self.template
        blob = name[:-1] if t.prefix else name
        if len(blob) > 1024 or _PLAIN_NAME.match(blob) is None:
            problem = segment_problem(blob)
            if problem:
                raise InvalidParams(f"{self.what} {t} of task {task_id} names "
                                    f"{_show(name)}, which {problem}")
            self.ctx.blob_ref({"container": t.container, "blob": blob})  # the full rules
        if self.allowed is not None and not name.startswith(self.allowed):
            raise ForeignStorage(f"{self.what} {t} of task {task_id} names "
                                 f"{_show(t.container + '/' + name)}, outside the program's "
                                 "allowed inputs")

    def resolve(self, point: Sequence[str], task_id: str) -> ResourceFile:
        name = self.fmt(*point)
        self.check(name, task_id)
        if self.template.prefix:
            return ResourceFile(http_url="", file_path="", blob_prefix=name,
                                storage_container_url=self.base + self.query)
        quoted = name if _URL_SAFE.match(name) else quote(name, safe="/~")
        return ResourceFile(http_url=f"{self.base}/{quoted}{self.query}", file_path=name)


def _constant(template: InputTemplate, ctx: BuildContext,
              allowed: tuple[str, ...] | None, what: str) -> ResourceFile:
    """The resource file of an input without fields (signed once, shared by tasks)."""
    name = template.head  # all of it, with ``{{`` and ``}}`` read as braces
    if allowed is not None and not name.startswith(allowed):
        raise ForeignStorage(f"{what} {template} is outside the program's allowed inputs")
    if template.prefix:
        ctx.blob_ref({"container": template.container, "blob": name[:-1]})
        url = ctx.input_container_url(template.container, name)
        return ResourceFile(http_url="", file_path="", storage_container_url=url,
                            blob_prefix=name)
    ref: BlobRef = ctx.blob_ref({"container": template.container, "blob": name})
    return ResourceFile(http_url=ctx.input_url(ref), file_path=ref.blob)


def message_input(value: object, ctx: BuildContext, index: int) -> InputTemplate:
    """A message's input: ``"<container>/<blob>"``, ``{"container", "blob"}`` or a blob
    URL of the configured storage (no fields in a URL)."""
    what = f"inputs[{index}]"
    if isinstance(value, Mapping):
        keys = set(value)
        if keys != {"container", "blob"}:
            raise InvalidParams(f"{what}: an input object has exactly container and blob, "
                                f"not {sorted(str(k) for k in keys)}")
        container, blob = value["container"], value["blob"]
        if not isinstance(container, str) or not isinstance(blob, str):
            raise InvalidParams(f"{what}: container and blob are strings")
        value = f"{container}/{blob}"
    elif isinstance(value, str) and "://" in value:
        if "{" in value or "}" in value:
            raise InvalidParams(f"{what}: a blob URL cannot be a template; write a "
                                "templated input as \"<container>/<blob name>\"")
        ref = ctx.blob_ref(value)
        literal = ref.blob.replace("{", "{{").replace("}", "}}")  # a URL names one blob
        value = f"{ref.container}/{literal}"
    try:
        return parse_input(value, what)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Allowed:
    """The containers and prefixes a program lets a message's inputs name."""

    prefixes: Mapping[str, tuple[str, ...]]

    @classmethod
    def of(cls, entries: Iterable[str]) -> Allowed:
        found: dict[str, list[str]] = {}
        for entry in entries:
            container, prefix = parse_allowed(entry)
            found.setdefault(container, []).append(prefix)
        return cls({c: tuple(p) for c, p in found.items()})

    def check(self, template: InputTemplate, program: str, what: str) -> tuple[str, ...] | None:
        """None when every name the template can render is allowed (its literal head
        is), else the prefixes to check each rendered name against; ``ForeignStorage``
        when none of its container is allowed."""
        prefixes = self.prefixes.get(template.container)
        if not prefixes:
            allowed = ", ".join(f"{c}/{p}" for c, ps in self.prefixes.items() for p in ps)
            raise ForeignStorage(
                f"{what} {template} is outside the inputs program {program!r} accepts from "
                f"messages (allowed_inputs: {allowed or 'none'})")
        head = template.head
        if head.startswith(prefixes):
            return None
        if not template.fields or not any(p.startswith(head) for p in prefixes):
            # no value can make the name start with an allowed prefix
            raise ForeignStorage(
                f"{what} {template} is outside the inputs program {program!r} accepts from "
                f"messages (allowed_inputs: "
                f"{', '.join(template.container + '/' + p for p in prefixes)})")
        return prefixes


class TaskData:
    """The inputs and outputs of one job's sweep tasks, attached as the tasks stream.

    ``fields`` are the template fields in the order a task's point gives them: the
    sweep's parameter fields, then ``task_index`` and ``repeat_index``, read back from
    each task's ``FANOUT_PARAM_*`` environment and id (so the sweep's own expansion is
    untouched).
    """

    def __init__(self, *, ctx: BuildContext, fields: Sequence[str],
                 inputs: Sequence[tuple[InputTemplate, tuple[str, ...] | None, str]],
                 outputs: Sequence[str], output_container: str,
                 upload_condition: UploadCondition) -> None:
        self.fields = list(fields)
        self.env_keys = [f"FANOUT_PARAM_{name.upper()}" for name in fields[:-2]]
        #: In the order given: shared resource files, and templates rendered per task.
        self.inputs: list[ResourceFile | _Templated] = [
            _Templated(template, fields, ctx, allowed, what) if template.fields
            else _constant(template, ctx, allowed, what)
            for template, allowed, what in inputs]
        self.constant = [i for i in self.inputs if isinstance(i, ResourceFile)]
        self.templated = [i for i in self.inputs if isinstance(i, _Templated)]
        self.outputs = list(outputs)
        self.prefix = results_prefix(ctx.job_id)
        self.container_url = (ctx.output_container_url(output_container, self.prefix)
                              if self.outputs else "")
        self.plan = _OutputPlan(self.outputs, self.container_url, upload_condition)

    def check(self, points: Iterable[Sequence[str]]) -> None:
        """Check every name the templated inputs render for ``points`` (each task's
        field values in ``fields`` order), so a bad value is refused before anything
        is submitted rather than halfway through the job's tasks."""
        templated = self.templated
        if not templated:
            return
        for point in points:
            for t in templated:
                t.check(t.fmt(*point), point[-2])

    def attach(self, tasks: Iterable[TaskSpec]) -> Iterator[TaskSpec]:
        """Each task with its resource and output files, as it streams past."""
        inputs, keys = self.inputs, self.env_keys
        templated = bool(self.templated)
        outputs, prefix, plan = self.outputs, self.prefix, self.plan.files
        for task in tasks:
            if templated:
                env = task.environment
                point = [env[k] for k in keys]
                point += (task.id, env["FANOUT_REPEAT_INDEX"])
                files = [i if isinstance(i, ResourceFile) else i.resolve(point, task.id)
                         for i in inputs]
            else:
                files = list(inputs)  # type: ignore[arg-type]  # constants only
            if files:
                task.resource_files = [*task.resource_files, *files]
            if outputs:
                task.output_files = [*task.output_files, *plan(f"{prefix}{task.id}/")]
            yield task
