"""The one renderer HTTP, HTTPS, TFTP and the CLI share.

Templates are Jinja2, looked up in the operator folders first and the bundled
folder last.  Every template runs in Jinja2's sandbox with StrictUndefined (a
missing variable is an error, never an empty string).  Templates whose name
contains ``.xml`` or ``.htm`` (``polycom/mac.xml.j2``) are autoescaped for
XML; key/value formats are not, so they should use the ``kv`` filter, which
refuses line breaks that would inject extra keys.  A template stops with a
message of its own by calling ``fail("why")``.

Compiled templates are cached and re-read when their file changes, when an
override appears in an operator folder, or when an override is removed.
``render_tracked`` also returns the templates a render loaded (the one named
and those it included or imported), so that a cache of rendered documents
can tell with ``is_current`` when one of them changed, and with
``reads_request`` whether the bytes may differ from one request to another.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from twisted.logger import Logger

from zprovd.catalogue import bundled_templates_dir
from zprovd.mac import format_mac


log = Logger(namespace="zprovd.renderer")

RECHECK_AFTER = 0.01
"""Seconds ``is_current`` trusts its last look at a template's files."""


class TemplateFailure(Exception):
    """Raised by ``fail(message)`` in a template: the value cannot be rendered."""


def _fail(message: str) -> None:
    raise TemplateFailure(message)


class RenderError(Exception):
    """A template could not be found or rendered; the message says which and why."""

    def __init__(self, template: str, reason: str):
        self.template = template
        self.reason = reason
        super().__init__(f"template {template}: {reason}")


def _autoescape(name: str | None) -> bool:
    if not name:
        return False
    return any(part in ("xml", "htm", "html", "rng") for part in Path(name).name.lower().split(".")[1:])


# Characters no configuration format can carry (XML 1.0 forbids them; in a
# key/value file they corrupt the line).  Tab, LF and CR are handled by the
# formats themselves (``kv`` refuses line breaks).
_UNCARRIABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _finalize(value: Any) -> Any:
    """Applied to every ``{{ value }}``: refuse characters no phone can parse."""
    if isinstance(value, str) and _UNCARRIABLE.search(value):
        # The value itself stays out of the message: it may be a password.
        raise ValueError("a value contains a control character no configuration file can carry")
    return value


def _failure(exc: Exception) -> str:
    """Why a render failed, in words."""
    if isinstance(exc, jinja2.UndefinedError):
        return f"undefined variable: {exc.message}"
    if isinstance(exc, TemplateFailure):
        return str(exc)
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return f"refused by the sandbox: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _where(exc: BaseException, folders: list[str]) -> str:
    """`` (line N of FILE, called from line M of FILE)``: where in the templates a render failed, or "".

    Jinja rewrites a render's traceback so that its frames name the template
    files and lines: the innermost is where it failed, the others (a macro's
    caller, the template that included it) say which value it was.  Error
    messages name lines, never the value, which may be a password."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith(tuple(folders)):
            frames.append(f"line {tb.tb_lineno} of {filename}")
        tb = tb.tb_next
    return f" ({', called from '.join(reversed(frames))})" if frames else ""


def _kv(value: Any) -> str:
    text = "" if value is None else str(value)
    if "\n" in text or "\r" in text:
        raise ValueError("a value for a key/value file contains a line break")
    return text


def _quoted(value: Any) -> str:
    """For ``KEY="value"`` formats: refuse line breaks and double quotes."""
    text = _kv(value)
    if '"' in text:
        raise ValueError('a value for a KEY="value" file contains a double quote')
    return text


class _OverridableLoader(jinja2.FileSystemLoader):
    """A FileSystemLoader whose cached templates also go stale when a file of
    the same name appears in a folder searched earlier (an operator override
    added while the daemon runs), or when the file they came from goes away."""

    def get_source(self, environment, template):
        source, filename, uptodate = super().get_source(environment, template)
        earlier = []
        for folder in self.searchpath:
            candidate = os.path.join(folder, *template.split("/"))
            if os.path.normpath(candidate) == os.path.normpath(filename):
                break
            earlier.append(candidate)

        def still_current() -> bool:
            return uptodate() and not any(os.path.isfile(p) for p in earlier)

        return source, filename, still_current


class _TrackingEnvironment(SandboxedEnvironment):
    """Records every template loaded while ``loaded`` is a list (includes and
    imports too: they all go through ``_load_template``), and, for each
    template file as last compiled, whether its source names ``request``."""

    loaded: list[jinja2.Template] | None = None

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.names_request: dict[tuple[str | None, str | None], bool] = {}

    def _parse(self, source, name, filename):
        # Every compile parses here, so the flag always describes the source
        # of the template object Jinja caches under (name, filename).  Any
        # mention counts, read or not, in any branch or macro: a render can
        # only depend on the request through this name.
        tree = super()._parse(source, name, filename)
        self.names_request[(name, filename)] = any(node.name == "request" for node in tree.find_all(jinja2.nodes.Name))
        return tree

    def _load_template(self, name, globals):
        template = super()._load_template(name, globals)
        if self.loaded is not None:
            self.loaded.append(template)
        return template


class _Stale:
    """Stands for a template that must be rendered again every time."""

    is_up_to_date = False


_STALE = _Stale()

Dependencies = tuple[Any, ...]
"""Templates (or ``_STALE``) with an ``is_up_to_date`` property."""


class Renderer:
    """Renders templates by name.

    With ``keep_last_good`` (the daemon), a template whose file is edited into
    a syntax error keeps being served in its last version that compiled, and
    the error is logged once; the CLI (``check``, ``render``) reports it.
    """

    def __init__(self, operator_dirs: list[Path], bundled_dir: Path | None = None, keep_last_good: bool = False):
        self.keep_last_good = keep_last_good
        self.recheck_after = RECHECK_AFTER
        self._checked: dict[Any, float] = {}
        self._last_good: dict[str, jinja2.Template] = {}
        self._reported: set[tuple[str, str, int | None]] = set()
        self.dirs = [Path(d) for d in operator_dirs] + [bundled_dir or bundled_templates_dir()]
        self.env = _TrackingEnvironment(
            loader=_OverridableLoader([str(d) for d in self.dirs]),
            undefined=jinja2.StrictUndefined,
            autoescape=_autoescape,
            auto_reload=True,
            keep_trailing_newline=True,
            cache_size=1000,
            finalize=_finalize,
        )
        self.env.filters["mac"] = format_mac
        self.env.filters["kv"] = _kv
        self.env.filters["quoted"] = _quoted
        self.env.globals["fail"] = _fail

    def _compiled(self, template: str) -> jinja2.Template:
        try:
            compiled = self.env.get_template(template)
        except jinja2.TemplateSyntaxError as exc:
            previous = self._last_good.get(template) if self.keep_last_good else None
            if previous is None:
                raise
            key = (template, str(exc.filename), exc.lineno)
            if key not in self._reported:
                self._reported.add(key)
                log.error(
                    "template {template}: syntax error line {line} of {file}: {message}; still serving its previous version",
                    template=template, line=exc.lineno, file=exc.filename, message=exc.message,
                )
            return previous
        if self.keep_last_good:
            self._last_good[template] = compiled
        return compiled

    def render(self, template: str, context: dict[str, Any]) -> bytes:
        return self.render_tracked(template, context)[0]

    def render_tracked(self, template: str, context: dict[str, Any]) -> tuple[bytes, Dependencies]:
        """The rendered bytes, and the templates the render loaded (for ``is_current``)."""
        self.env.loaded = loaded = []
        try:
            compiled = self._compiled(template)
            body = compiled.render(context).encode("utf-8")
            # A template kept from before a syntax error is not in Jinja's
            # cache: is_up_to_date is False for it, so nothing is cached.
            if compiled not in loaded:
                loaded.append(_STALE)
            return body, tuple(loaded)
        except jinja2.TemplateNotFound:
            raise RenderError(template, "not found in " + ", ".join(map(str, self.dirs))) from None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(template, f"syntax error line {exc.lineno}: {exc.message}") from None
        except Exception as exc:  # a missing variable, fail(), a filter raising, a bad operator template
            raise RenderError(template, _failure(exc) + _where(exc, self.env.loader.searchpath)) from None
        finally:
            self.env.loaded = None

    def is_current(self, dependencies: Dependencies) -> bool:
        """Whether none of these templates changed, went away or got an override
        since ``render_tracked`` returned them.  A template's files are looked
        at (a stat each) at most every ``recheck_after`` seconds."""
        now = time.monotonic()
        checked = self._checked
        for template in dependencies:
            at = checked.get(template)
            if at is not None and now - at < self.recheck_after:
                continue
            if not template.is_up_to_date:
                checked.pop(template, None)
                return False
            checked[template] = now
        return True

    def reads_request(self, dependencies: Dependencies) -> bool:
        """Whether any of these templates (from ``render_tracked``) names
        ``request``: if none does, the render gave the same bytes whatever the
        protocol, host, client or user agent, and one copy serves them all."""
        names_request = self.env.names_request
        return any(names_request.get((getattr(t, "name", None), getattr(t, "filename", None)), True) for t in dependencies)

    def is_xml(self, template: str) -> bool:
        """Whether the template renders an XML format (and so is autoescaped)."""
        return _autoescape(template)

    def check(self, template: str) -> str | None:
        """Compile a template; return the problem, or None if it compiles."""
        try:
            self.env.get_template(template)
        except jinja2.TemplateNotFound:
            return f"template {template}: not found"
        except jinja2.TemplateSyntaxError as exc:
            return f"template {template}: syntax error line {exc.lineno}: {exc.message}"
        return None

    def source_of(self, template: str) -> Path | None:
        """The file that wins for this template name, or None."""
        for d in self.dirs:
            candidate = d / template
            if candidate.is_file():
                return candidate
        return None
