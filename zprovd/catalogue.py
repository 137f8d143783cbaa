"""The model catalogue: which files each phone model asks for, as data.

Each vendor folder of a template directory may hold catalogue files
(``<vendor>/*.models.toml`` or ``<vendor>/models.toml``)::

    label = "Yealink"                    # vendor name shown by `zprovd models`
    oui = ["00:15:65", "80:5e:c0"]       # MAC prefixes, to guess the vendor

    [defaults]                           # merged into every model of the file
    per_mac = [{ pattern = "{mac}.cfg", template = "yealink/mac.cfg.j2" }]

    [models.t48g]                        # model id: "yealink-t48g"
    label = "Yealink SIP-T48G"
    generic = [{ name = "y000000000035.cfg", template = "yealink/generic.cfg.j2" }]
    user_agent = 'SIP-T48G\\b'          # regular expression, searched, case-insensitive
    vars = { model_code = "35" }         # template variables for this model

``{mac}`` in a per-MAC pattern matches a MAC in any spelling.  Names and
patterns match case-insensitively.  A file in an operator folder replaces
the bundled file with the same relative path; models defined in operator
folders win over bundled models with the same id.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from zprovd.mac import MAC_PATTERN, normalize_mac, oui as mac_oui

def bundled_templates_dir() -> Path:
    """The templates shipped with zprovd.

    Installed from a wheel they are the package data ``zprovd/bundled/``; in a
    source tree (or an editable install) they are ``templates/`` beside the
    package.
    """
    here = Path(__file__).resolve().parent
    installed = here / "bundled"
    return installed if installed.is_dir() else here.parent / "templates"


class CatalogueError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class GenericFile:
    name: str
    template: str


@dataclass(frozen=True)
class PerMacFile:
    pattern: str
    template: str
    regex: re.Pattern = field(compare=False, repr=False)

    def match(self, name: str) -> str | None:
        """The canonical MAC if ``name`` fits this pattern, else None."""
        m = self.regex.fullmatch(name)
        return normalize_mac(m.group("mac")) if m else None


@dataclass
class Model:
    id: str
    vendor: str
    vendor_label: str
    label: str
    generic: list[GenericFile]
    per_mac: list[PerMacFile]
    user_agent: re.Pattern | None
    oui: list[str]
    vars: dict[str, Any]
    source: Path

    def context(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vendor": self.vendor,
            "vendor_label": self.vendor_label,
            "label": self.label,
            "vars": dict(self.vars),
        }


def compile_pattern(pattern: str) -> re.Pattern:
    if pattern.count("{mac}") != 1:
        raise ValueError(f"pattern {pattern!r} must contain {{mac}} exactly once")
    before, after = pattern.split("{mac}")
    return re.compile(
        re.escape(before) + f"(?P<mac>{MAC_PATTERN})" + re.escape(after), re.IGNORECASE
    )


@dataclass
class Catalogue:
    models: dict[str, Model]
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._generic: dict[str, list[tuple[Model, GenericFile]]] = {}
        # Many models share a pattern ("{mac}.cfg"): one regex per distinct
        # pattern, so routing a name costs a match per pattern, not per model.
        per_mac: dict[str, tuple[re.Pattern, list[tuple[Model, PerMacFile]]]] = {}
        for model in self.models.values():
            for g in model.generic:
                self._generic.setdefault(g.name.lower(), []).append((model, g))
            for p in model.per_mac:
                entry = per_mac.setdefault(p.pattern.lower(), (p.regex, []))
                entry[1].append((model, p))
        self._per_mac = [(regex, tuple(pairs)) for regex, pairs in per_mac.values()]

    def get(self, model_id: str) -> Model | None:
        return self.models.get(model_id.lower())

    def generic_candidates(self, name: str) -> list[tuple[Model, GenericFile]]:
        return self._generic.get(name.lower(), [])

    def per_mac_files(self, name: str) -> list[tuple[str, tuple[tuple[Model, PerMacFile], ...]]]:
        """For every per-MAC pattern the name fits: the canonical MAC it
        carries, and the (model, file) pairs of that pattern.  The pairs are
        the catalogue's own, shared by every route to the pattern: with
        10,000 phones' routes memoised, that is 10,000 fewer tuples of 40
        pairs for the cycle collector to walk."""
        found = []
        for regex, pairs in self._per_mac:
            m = regex.fullmatch(name)
            if m is not None:
                found.append((normalize_mac(m.group("mac")), pairs))
        return found

    def match_user_agent(self, user_agent: str, among: Iterable[Model] | None = None) -> Model | None:
        if not user_agent:
            return None
        for model in among if among is not None else self.models.values():
            if model.user_agent is not None and model.user_agent.search(user_agent):
                return model
        return None

    def guess_model(self, name: str, user_agent: str, mac: str | None) -> str:
        """Best guess of a model id for an unknown phone (for ``device seen``)."""
        candidates = [m for _, pairs in self.per_mac_files(name) for m, _ in pairs]
        by_ua = self.match_user_agent(user_agent, candidates or None) or self.match_user_agent(user_agent)
        if by_ua is not None:
            return by_ua.id
        if mac:
            prefix = mac_oui(mac)
            vendors = {m.vendor for m in (candidates or self.models.values()) if prefix in m.oui}
            if len(vendors) == 1:
                return f"{vendors.pop()}-?"
        vendors = {m.vendor for m in candidates}
        if len(vendors) == 1:
            return f"{vendors.pop()}-?"
        return "?"


def _catalogue_files(dirs: list[Path]) -> list[tuple[Path, Path, int]]:
    """(relative path, absolute path, level) of winning catalogue files; level 0 = first dir."""
    winners: dict[Path, tuple[Path, int]] = {}
    for level, root in enumerate(dirs):
        if not root.is_dir():
            continue
        for path in sorted(root.glob("*/*.toml")):
            if path.name == "models.toml" or path.name.endswith(".models.toml"):
                rel = path.relative_to(root)
                winners.setdefault(rel, (path, level))
    return [(rel, p, lvl) for rel, (p, lvl) in sorted(winners.items())]


_MODEL_KEYS = {"label", "generic", "per_mac", "user_agent", "oui", "vars"}
_FILE_KEYS = {"label", "oui", "defaults", "models"}


def load_catalogue(dirs: list[Path]) -> Catalogue:
    """Load every catalogue file; ``dirs`` in search order (operator dirs first)."""
    problems: list[str] = []
    models: dict[str, tuple[Model, int]] = {}
    for rel, path, level in _catalogue_files(dirs):
        vendor = rel.parts[0].lower()
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        for key in set(data) - _FILE_KEYS:
            problems.append(f"{path}: unknown key {key!r}")
        defaults = data.get("defaults", {})
        for key in set(defaults) - _MODEL_KEYS:
            problems.append(f"{path}: [defaults] unknown key {key!r}")
        file_oui = [str(o).lower() for o in data.get("oui", [])]
        for name, raw in data.get("models", {}).items():
            spec = {**defaults, **raw}
            model_id = f"{vendor}-{name}".lower()
            where = f"{path}: [models.{name}]"
            for key in set(raw) - _MODEL_KEYS:
                problems.append(f"{where} unknown key {key!r}")
            try:
                model = _build_model(model_id, vendor, data.get("label", vendor), spec, file_oui, path)
            except (ValueError, TypeError, KeyError, re.error) as exc:
                problems.append(f"{where} {exc}")
                continue
            previous = models.get(model_id)
            if previous is not None:
                if previous[1] == level:
                    problems.append(f"{where} model {model_id!r} is also defined in {previous[0].source}")
                continue  # a lower level (operator folder) already won
            models[model_id] = (model, level)
    return Catalogue({mid: m for mid, (m, _) in sorted(models.items())}, problems)


def _build_model(model_id: str, vendor: str, vendor_label: str, spec: dict, file_oui: list[str], source: Path) -> Model:
    generic = [GenericFile(str(g["name"]), str(g["template"])) for g in spec.get("generic", [])]
    per_mac = []
    for p in spec.get("per_mac", []):
        pattern = str(p["pattern"])
        per_mac.append(PerMacFile(pattern, str(p["template"]), compile_pattern(pattern)))
    if not generic and not per_mac:
        raise ValueError("has neither generic nor per_mac files")
    ua = spec.get("user_agent")
    vars_ = spec.get("vars", {})
    if not isinstance(vars_, dict):
        raise TypeError("vars must be a table")
    return Model(
        id=model_id,
        vendor=vendor,
        vendor_label=str(vendor_label),
        label=str(spec.get("label", model_id)),
        generic=generic,
        per_mac=per_mac,
        user_agent=re.compile(ua, re.IGNORECASE) if ua else None,
        oui=[str(o).lower() for o in spec.get("oui", file_oui)],
        vars=dict(vars_),
        source=source,
    )
