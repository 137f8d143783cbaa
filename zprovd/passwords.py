"""Provisioning passwords: stored hashed, verifiable from the plain text or its MD5.

Zoiper's URL provisioning mode can send the MD5 hex digest of the password
instead of the password itself (in either letter case), so what is stored
must verify both.  We therefore never hash the password directly: we hash
``md5(password).hexdigest()`` (the password encoded as UTF-8) with
PBKDF2-HMAC-SHA256 and a random salt, and store::

    pbkdf2-sha256$<iterations>$<salt, base64>$<hash, base64>

``verify_password(stored, given)`` accepts ``given`` if either

* ``md5(given).hexdigest()`` matches (``given`` is the plain password), or
* ``given`` is 32 hex digits and ``given.lower()`` matches (``given`` is the
  MD5 digest Zoiper sent).

Consequence, by design: the MD5 digest of a password is as good as the
password for provisioning.  A plain password that happens to be 32 hex
digits works both as itself and (trivially) as its own MD5.

Cost: ``ITERATIONS`` = 100 000 takes about 30-40 ms per hash on the
development machine (AMD EPYC, Python 3.11, hashlib/OpenSSL).  The number of
iterations is stored in each hash, so raising ``ITERATIONS`` later only
affects new hashes (``needs_rehash`` tells which ones are older).

A reprovisioning storm (every phone and softphone asking again after an
outage) must not cost one PBKDF2 per request, so successful verifications
are remembered in a small in-process LRU cache.  Its keys are
HMAC-SHA256(process-random key, stored, given): the cache never holds a
password or digest in a form usable outside this process run, a changed
stored hash (new password, new salt) naturally misses, and failures are
never cached (a wrong password always costs a full PBKDF2, which is what
slows down guessing).

Nothing in this module logs anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import threading
from collections import OrderedDict

SCHEME = "pbkdf2-sha256"

ITERATIONS = 100_000
"""PBKDF2 iterations for new hashes (~30-40 ms each here).  Tests lower it."""

SALT_BYTES = 16
MAX_ITERATIONS = 10_000_000
"""Stored hashes claiming more iterations are rejected (a corrupted or
hostile record must not make a single verification take minutes)."""

CACHE_SIZE = 10_000
"""Successful verifications remembered (32-byte keys: about 1.5 MB at most)."""

_HEX32 = re.compile(r"[0-9a-fA-F]{32}")


def md5_hex(password: str) -> str:
    """The lowercase MD5 hex digest of the UTF-8 encoded password (what Zoiper sends)."""
    return hashlib.md5(password.encode("utf-8", "surrogatepass")).hexdigest()


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(md5hex: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", md5hex.encode("ascii"), salt, iterations)


def hash_password(password: str, iterations: int | None = None) -> str:
    """Hash a plain password for storage (see the module docstring for the format).

    ``iterations`` defaults to ``ITERATIONS`` (read at call time).  A lower
    value is only appropriate where the plain password sits next to the
    hash anyway (the CSV backend keeps its hashes in memory only).
    """
    rounds = ITERATIONS if iterations is None else iterations
    if not 1 <= rounds <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be between 1 and {MAX_ITERATIONS}")
    salt = os.urandom(SALT_BYTES)
    digest = _derive(md5_hex(password), salt, rounds)
    return f"{SCHEME}${rounds}${_b64encode(salt)}${_b64encode(digest)}"


def _parse(stored: str) -> tuple[int, bytes, bytes] | None:
    """(iterations, salt, hash) of a stored string, or None if it is not ours."""
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != SCHEME or not parts[1].isascii() or not parts[1].isdigit():
        return None
    iterations = int(parts[1])
    if not 1 <= iterations <= MAX_ITERATIONS:
        return None
    try:
        salt = _b64decode(parts[2])
        expected = _b64decode(parts[3])
    except (binascii.Error, ValueError):
        return None
    if not salt or len(expected) != hashlib.sha256().digest_size:
        return None
    return iterations, salt, expected


def is_password_hash(stored: str) -> bool:
    """Whether ``stored`` is a well-formed hash from ``hash_password``."""
    return _parse(stored) is not None


def needs_rehash(stored: str) -> bool:
    """True if ``stored`` is malformed or uses fewer iterations than ``ITERATIONS``."""
    parsed = _parse(stored)
    return parsed is None or parsed[0] < ITERATIONS


class _VerifiedCache:
    """A bounded, thread-safe LRU set of HMAC keys of successful verifications."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, stored: str, given: str) -> bytes:
        a = stored.encode("utf-8", "surrogatepass")
        b = given.encode("utf-8", "surrogatepass")
        # length-prefixed: an unambiguous concatenation; one-shot C HMAC
        return hmac.digest(self._key, len(a).to_bytes(8, "big") + a + len(b).to_bytes(8, "big") + b, "sha256")

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            return False

    def add(self, key: bytes) -> None:
        with self._lock:
            self._entries[key] = None
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_cache = _VerifiedCache(CACHE_SIZE)


def clear_cache() -> None:
    """Forget every remembered successful verification."""
    _cache.clear()


def cache_size() -> int:
    """How many successful verifications are remembered (for tests and statistics)."""
    return len(_cache)


def known_good(stored: str, given: str) -> bool:
    """Whether this exact pair already verified (cache only: no hashing, no I/O)."""
    if not isinstance(stored, str) or not isinstance(given, str):
        return False
    return _cache.key(stored, given) in _cache


def verify_password(stored: str, given: str) -> bool:
    """Whether ``given`` (the password or its MD5 hex digest) matches ``stored``.

    Never raises for odd input: a malformed ``stored`` or a non-string
    simply does not verify.
    """
    if not isinstance(stored, str) or not isinstance(given, str):
        return False
    parsed = _parse(stored)
    if parsed is None:
        return False
    key = _cache.key(stored, given)
    if key in _cache:
        return True
    iterations, salt, expected = parsed
    candidates = [md5_hex(given)]
    if _HEX32.fullmatch(given):
        candidates.append(given.lower())
    ok = False
    for candidate in candidates:  # no short cut: both candidates always cost the same
        ok |= hmac.compare_digest(_derive(candidate, salt, iterations), expected)
    if ok:
        _cache.add(key)
    return ok
