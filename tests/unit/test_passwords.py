"""zprovd.passwords: hashes that verify the password and its MD5 hex digest."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zprovd import passwords
from zprovd.passwords import hash_password, verify_password


@pytest.fixture
def fast_hashing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Few PBKDF2 iterations, and an empty verification cache."""
    monkeypatch.setattr(passwords, "ITERATIONS", 10)
    passwords.clear_cache()
    yield
    passwords.clear_cache()


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def test_format(fast_hashing: None) -> None:
    stored = hash_password("s3cret")
    scheme, iterations, salt, digest = stored.split("$")
    assert scheme == "pbkdf2-sha256"
    assert iterations == "10"
    assert salt and digest
    assert passwords.is_password_hash(stored)


def test_default_iterations_are_used_at_call_time() -> None:
    assert passwords.ITERATIONS >= 100_000
    assert hash_password("x", iterations=3).split("$")[1] == "3"


def test_real_cost_verifies() -> None:
    """One hash at the real iteration count (~35 ms), to prove the default works."""
    passwords.clear_cache()
    stored = hash_password("correct horse")
    assert verify_password(stored, "correct horse")
    assert verify_password(stored, md5("correct horse").upper())
    assert not verify_password(stored, "wrong horse")


def test_plain_and_md5_verify(fast_hashing: None) -> None:
    stored = hash_password("s3cret")
    assert verify_password(stored, "s3cret")
    passwords.clear_cache()
    assert verify_password(stored, md5("s3cret"))
    passwords.clear_cache()
    assert verify_password(stored, md5("s3cret").upper())


def test_wrong_fails(fast_hashing: None) -> None:
    stored = hash_password("s3cret")
    for wrong in ("S3cret", "s3cret ", "", md5("other"), md5("s3cret")[:-1], "s3cre"):
        assert not verify_password(stored, wrong), wrong


def test_md5_of_the_md5_is_not_the_password(fast_hashing: None) -> None:
    stored = hash_password("s3cret")
    assert not verify_password(stored, md5(md5("s3cret")))


def test_password_that_looks_like_md5(fast_hashing: None) -> None:
    password = "0123456789abcdef0123456789ABCDEF"
    stored = hash_password(password)
    assert verify_password(stored, password)  # as itself (its md5 is compared)
    passwords.clear_cache()
    assert verify_password(stored, md5(password))  # as its digest
    passwords.clear_cache()
    assert verify_password(stored, md5(password).upper())
    passwords.clear_cache()
    assert not verify_password(stored, password.lower())  # case matters in the password


def test_stored_text_has_no_plain_text(fast_hashing: None) -> None:
    password = "VeryDistinctivePassword"
    stored = hash_password(password)
    assert password not in stored
    assert md5(password) not in stored.lower()
    assert hash_password(password) != stored  # salted


def test_malformed_stored_never_verifies(fast_hashing: None) -> None:
    for stored in ("", "s3cret", "pbkdf2-sha256$x$a$b", "pbkdf2-sha256$0$AAAA$AAAA",
                   "pbkdf2-sha256$10$!!$AAAA", "md5$" + md5("s3cret"),
                   "pbkdf2-sha256$999999999999$AAAA$" + "A" * 43):
        assert not verify_password(stored, "s3cret")
        assert passwords.needs_rehash(stored)
    assert not verify_password(None, "x")  # type: ignore[arg-type]


def test_needs_rehash(fast_hashing: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = hash_password("x")
    assert not passwords.needs_rehash(stored)
    monkeypatch.setattr(passwords, "ITERATIONS", 20)
    assert passwords.needs_rehash(stored)


def test_cache_remembers_success_only(fast_hashing: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = hash_password("s3cret")
    calls = []
    real = passwords._derive
    monkeypatch.setattr(passwords, "_derive", lambda *a: calls.append(a) or real(*a))
    assert verify_password(stored, "s3cret")
    assert len(calls) == 1
    assert verify_password(stored, "s3cret")
    assert len(calls) == 1  # from the cache
    assert not verify_password(stored, "wrong")
    assert not verify_password(stored, "wrong")
    assert len(calls) == 3  # failures are never cached
    assert passwords.cache_size() == 1


def test_changed_hash_misses_cache(fast_hashing: None) -> None:
    old = hash_password("old")
    assert verify_password(old, "old")
    new = hash_password("new")
    assert not verify_password(new, "old")
    assert verify_password(new, "new")


def test_cache_is_bounded(fast_hashing: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passwords._cache, "size", 3)
    stored = [hash_password(str(i)) for i in range(5)]
    for i, s in enumerate(stored):
        assert verify_password(s, str(i))
    assert passwords.cache_size() == 3


def test_cache_key_is_unambiguous() -> None:
    cache = passwords._VerifiedCache(10)
    assert cache.key("ab", "c") != cache.key("a", "bc")


def test_thread_safe_verification(fast_hashing: None) -> None:
    stored = hash_password("s3cret")
    results: list[bool] = []

    def work() -> None:
        for _ in range(50):
            results.append(verify_password(stored, "s3cret"))
            results.append(not verify_password(stored, "nope"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 400 and all(results)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=st.text(max_size=40), other=st.text(max_size=40))
def test_any_text_password(fast_hashing: None, password: str, other: str) -> None:
    stored = hash_password(password)
    assert verify_password(stored, password)
    digest = passwords.md5_hex(password)
    assert verify_password(stored, digest)
    assert verify_password(stored, digest.upper())
    if other != password and other.lower() != digest:
        assert not verify_password(stored, other)
