"""MAC addresses: parse any usual spelling, print the spellings vendors use.

Phones and operators write the same address as ``001565AABBCC``,
``00:15:65:aa:bb:cc``, ``00-15-65-AA-BB-CC`` or ``0015.65aa.bbcc``.  Inside
zprovd a MAC is always the canonical form: 12 lowercase hex digits.
"""

from __future__ import annotations

import re

_HEX12 = re.compile(r"[0-9a-fA-F]{12}")
_SEPARATED = re.compile(
    r"(?P<a>[0-9a-fA-F]{2})(?P<s>[:-])[0-9a-fA-F]{2}(?:(?P=s)[0-9a-fA-F]{2}){4}"
)
_CISCO_DOTTED = re.compile(r"[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}")

# A regular expression fragment matching one MAC in any accepted spelling.
MAC_PATTERN = (
    r"(?:[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}"
    r"|[0-9a-fA-F]{2}(?:-[0-9a-fA-F]{2}){5}"
    r"|[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4})"
)


class InvalidMAC(ValueError):
    """The text is not a MAC address in any accepted spelling."""


def normalize_mac(text: str) -> str:
    """Return the canonical form (12 lowercase hex digits) or raise InvalidMAC."""
    candidate = text.strip()
    if _HEX12.fullmatch(candidate):
        return candidate.lower()
    if (
        _HEX12.fullmatch(candidate)
        or _SEPARATED.fullmatch(candidate)
        or _CISCO_DOTTED.fullmatch(candidate)
    ):
        return re.sub(r"[:.\-]", "", candidate).lower()
    raise InvalidMAC(
        f"{text!r} is not a MAC address (expected 12 hex digits, optionally "
        "separated by ':' or '-', e.g. 00:15:65:aa:bb:cc)"
    )


def is_mac(text: str) -> bool:
    try:
        normalize_mac(text)
    except InvalidMAC:
        return False
    return True


def format_mac(mac: str, style: str = "lower") -> str:
    """Spell a canonical MAC the way a vendor wants it.

    Styles: ``lower`` (001565aabbcc), ``upper`` (001565AABBCC),
    ``colon`` (00:15:65:aa:bb:cc), ``COLON``, ``dash`` (00-15-65-aa-bb-cc),
    ``DASH``.
    """
    mac = normalize_mac(mac)
    pairs = [mac[i : i + 2] for i in range(0, 12, 2)]
    spellings = {
        "lower": mac,
        "upper": mac.upper(),
        "colon": ":".join(pairs),
        "COLON": ":".join(pairs).upper(),
        "dash": "-".join(pairs),
        "DASH": "-".join(pairs).upper(),
    }
    try:
        return spellings[style]
    except KeyError:
        raise ValueError(
            f"unknown MAC style {style!r}; one of {', '.join(spellings)}"
        ) from None


def oui(mac: str) -> str:
    """The vendor prefix, as ``00:15:65``."""
    return format_mac(mac, "colon")[:8]
