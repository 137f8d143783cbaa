"""Rendered documents, kept while the data and templates they came from are unchanged.

A phone that fetches its file again, or a Zoiper that logs in again, gets
the bytes rendered last time without a backend look-up or a render.  An
entry is valid while

* the backend's ``generation()`` is still the one read *before* the
  look-ups that the render used (so a change made meanwhile can only make
  the entry look stale, never keep a stale one), and
* none of the templates the render loaded changed, went away or got an
  operator override (``Renderer.is_current``).

The key carries everything else the document depends on: the file name or
Zoiper version, and, only when one of its templates names ``request``
(``Renderer.reads_request``), the request fields templates may read
(protocol, host, client, user agent).  The bundled templates never do, so
one copy serves HTTP, HTTPS and TFTP and every phone of a model its generic
file.  The configuration and the catalogue are not in the key: a reload
builds a new Provisioner, and with it a new cache.

Pure bookkeeping: no I/O apart from the template checks, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from zprovd.renderer import Dependencies

MAX_BYTES = 64 * 1024 * 1024
"""Bodies kept, in all; the least recently used go first."""


@dataclass(frozen=True)
class Document:
    generation: Hashable
    templates: Dependencies
    record: Any
    """The device or user it was rendered for (access checks need it on a hit)."""
    response: Any
    """The ``Response`` (status 200), handed out again as it is: read-only."""


class DocumentCache:
    def __init__(self, is_current: Callable[[Dependencies], bool] | None = None, max_bytes: int = MAX_BYTES):
        self.is_current = is_current or (lambda templates: all(t.is_up_to_date for t in templates))
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[Hashable, Document] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, generation: Hashable | None, request_key: Hashable = None) -> Document | None:
        """The document, if it is still what a render would give now: the one
        kept for ``key``, else the one kept for this ``request_key`` (see ``put``)."""
        entry = self._entries.get(key)
        if entry is None:
            key = (key, request_key)
            entry = self._entries.get(key)
        if entry is None or generation is None:
            self.misses += 1
            return None
        if entry.generation != generation or not self.is_current(entry.templates):
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, document: Document, request_key: Hashable = None) -> None:
        """Keep a document; with a ``request_key`` (its templates read the
        request) it serves only requests with that key."""
        if document.generation is None or len(document.response.body) > self.max_bytes:
            return
        if request_key is not None:
            key = (key, request_key)
        self._drop(key)
        self._entries[key] = document
        self.size += len(document.response.body)
        while self.size > self.max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self.size -= len(oldest.response.body)

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= len(entry.response.body)
