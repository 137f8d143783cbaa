"""Generated bench data: users and desk phones as an import CSV, firmware files."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

# model -> (OUI, per-MAC file name pattern, generic file name); the mix of
# the HTTP benchmark.  Weights out of 10.
MODELS = {
    "yealink-t48g": ("001565", "{mac}.cfg", "y000000000035.cfg", 7),
    "snom-d785": ("000413", "snomD785-{mac}.htm", "snomD785.htm", 1),
    "polycom-vvx410": ("0004f2", "{mac}-phone.cfg", "000000000000.cfg", 1),
    "grandstream-gxp2170": ("000b82", "cfg{mac}.xml", "", 1),
}
HEADER = ["login", "password", "display_name", "sip_user", "sip_password", "sip_domain", "mac", "model"]


@dataclass(frozen=True)
class Phone:
    login: str
    password: str
    mac: str  # 12 lowercase hex digits
    model: str
    file: str  # per-MAC file name
    generic: str  # generic file name ("" if the model has none)


def phones(n: int, mix: bool = True, offset: int = 0) -> list[Phone]:
    weights = [(model, w) for model, (_, _, _, w) in MODELS.items()] if mix else [("yealink-t48g", 10)]
    cycle = [model for model, w in weights for _ in range(w)]
    out = []
    for i in range(offset, offset + n):
        model = cycle[i % len(cycle)]
        oui, pattern, generic, _ = MODELS[model]
        mac = f"{oui}{i + 1:06x}"
        out.append(Phone(f"u{i + 1:06d}", f"pw-{i + 1:06d}", mac, model, pattern.format(mac=mac), generic))
    return out


def write_csv(path: Path, rows: list[Phone], with_devices: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for p in rows:
            number = int(p.login[1:]) + 100000
            w.writerow([p.login, p.password, f"User {p.login}", str(number), f"sip-{p.login}", "pbx.example.com",
                        p.mac if with_devices else "", p.model if with_devices else ""])


def zoiper_users(n: int) -> list[Phone]:
    return [Phone(f"z{i + 1:05d}", f"zoiper-pw-{i + 1:05d}", "", "", "", "") for i in range(n)]


def firmware(directory: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """Random files of the given sizes (kept between runs if their size matches)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    out = {}
    for name, size in sizes.items():
        path = directory / name
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.write(os.urandom(size))
        os.chmod(path, 0o644)
        out[name] = path
    return out
