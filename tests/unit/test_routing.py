"""Routing: path prefixes, MAC spellings, generic-before-per-MAC, hostile paths."""

import base64

import pytest
from hypothesis import given, strategies as st

from zprovd.catalogue import load_catalogue
from zprovd.config import ZoiperConfig
from zprovd.routing import (
    BadRequest, FirmwareRoute, GenericRoute, NotFound, PerMacRoute, Request, Router, ZoiperRoute,
    basic_credentials, split_path,
)

CATALOGUE = """
label = "Acme"
oui = ["00:15:65"]
[defaults]
per_mac = [{ pattern = "{mac}.cfg", template = "acme/mac.cfg.j2" }]
[models.a1]
label = "Acme A1"
generic = [{ name = "acme-a1.cfg", template = "acme/generic.cfg.j2" }, { name = "000000000000.cfg", template = "acme/master.j2" }]
user_agent = 'Acme-A1\\b'
[models.a2]
label = "Acme A2"
generic = [{ name = "000000000000.cfg", template = "acme/master.j2" }]
per_mac = [{ pattern = "{mac}.cfg", template = "acme/mac.cfg.j2" }, { pattern = "Acme/A2/{mac}.cfg", template = "acme/mac.cfg.j2" }]
user_agent = 'Acme-A2\\b'
"""

ZOIPER = ZoiperConfig(
    paths=["/zoiper", "/prov/zoiper.php"], user_params=["user", "u"], password_params=["password", "p"],
    version_params=["version"], error_text="x", error_status=200, unavailable_text="y",
    max_failures=10, failure_window=300, lockout=300,
)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    (root / "acme").mkdir()
    (root / "acme" / "models.toml").write_text(CATALOGUE)
    catalogue = load_catalogue([root])
    assert catalogue.problems == []
    firmware = {"T48G-35.83.0.35.rom", "fw/other.bin"}
    return Router(catalogue, ZOIPER, lambda name: name if name in firmware else None)


def http(path, **kw):
    return Request(protocol="http", path=path, **kw)


@pytest.mark.parametrize("prefix", ["/", "/provision/", "/a/b/c/", "//"])
@pytest.mark.parametrize("spelling", ["001565aabbcc", "00:15:65:AA:BB:CC", "00-15-65-aa-bb-cc", "00%3A15%3A65%3Aaa%3Abb%3Acc"])
def test_per_mac_under_any_prefix_and_spelling(router, prefix, spelling):
    route = router.route(http(prefix + spelling + ".cfg"))
    assert isinstance(route, PerMacRoute)
    assert route.mac == "001565aabbcc"
    assert {m.id for m, _ in route.candidates} == {"acme-a1", "acme-a2"}


def test_routes_of_different_phones_share_the_catalogue_pairs(router):
    # Routes are memoised per path: for 10,000 phones, a tuple of (model,
    # file) pairs each would be 10,000 more containers for the cycle
    # collector to walk on every full pass (a pause for every request).
    first, second = (router.route(http(f"/{mac}.cfg")) for mac in ("001565000001", "001565000002"))
    assert first.mac != second.mac
    assert first.candidates is second.candidates


def test_generic_name_wins_over_a_mac_looking_name(router):
    route = router.route(http("/provision/000000000000.cfg"))
    assert isinstance(route, GenericRoute)


def test_shared_generic_file_is_picked_by_user_agent(router):
    assert router.route(http("/000000000000.cfg", user_agent="Acme-A2 1.0")).model.id == "acme-a2"
    assert router.route(http("/000000000000.cfg", user_agent="Acme-A1 1.0")).model.id == "acme-a1"
    assert router.route(http("/000000000000.cfg")).model.id == "acme-a1"


def test_generic_names_match_case_insensitively(router):
    route = router.route(http("/ACME-A1.CFG"))
    assert isinstance(route, GenericRoute) and route.model.id == "acme-a1"


def test_longest_suffix_with_folders_matches_first(router):
    route = router.route(http("/prov/Acme/A2/001565aabbcc.cfg"))
    assert isinstance(route, PerMacRoute)
    assert route.name == "Acme/A2/001565aabbcc.cfg"
    assert [m.id for m, _ in route.candidates] == ["acme-a2"]


def test_tftp_names_are_not_percent_decoded(router):
    assert isinstance(router.route(Request("tftp", "00%3A15%3A65%3Aaa%3Abb%3Acc.cfg")), NotFound)
    assert isinstance(router.route(Request("tftp", "001565aabbcc.cfg")), PerMacRoute)


def test_windows_separators_are_normalised(router):
    assert isinstance(router.route(Request("tftp", "\\prov\\001565aabbcc.cfg")), PerMacRoute)


@pytest.mark.parametrize(
    "path",
    ["/../etc/passwd", "/a/../001565aabbcc.cfg", "/%2e%2e/etc/passwd", "/%2E%2E%2Fetc/passwd", "/a%00.cfg", "/..%5c..%5cetc",
     "/" + "a" * 300, "/" + "a/" * 600, "/%ff%fe.cfg", "/a%0ab.cfg"],
)
def test_hostile_paths_are_refused(router, path):
    assert isinstance(router.route(http(path)), BadRequest)


@pytest.mark.parametrize("path", ["/etc/passwd", "//etc/passwd", "/", "/nothing.cfg", "/001565aabbc.cfg"])
def test_unknown_names_are_not_found(router, path):
    assert isinstance(router.route(http(path)), NotFound)


def test_firmware_at_root_and_under_firmware(router):
    assert router.route(http("/T48G-35.83.0.35.rom")) == FirmwareRoute("T48G-35.83.0.35.rom")
    assert router.route(http("/firmware/T48G-35.83.0.35.rom")) == FirmwareRoute("T48G-35.83.0.35.rom")
    assert router.route(Request("tftp", "T48G-35.83.0.35.rom")) == FirmwareRoute("T48G-35.83.0.35.rom")
    assert isinstance(router.route(Request("tftp", "firmware/T48G-35.83.0.35.rom")), NotFound)


def test_zoiper_query_parameters(router):
    route = router.route(http("/zoiper", query={"u": ["alice"], "p": ["pw"], "version": ["1.14"]}))
    assert route == ZoiperRoute("alice", "pw", "1.14", "query")
    route = router.route(http("/prov/zoiper.php/", query={"user": ["bob"]}))
    assert route == ZoiperRoute("bob", None, None, "query")


def test_zoiper_basic_authentication(router):
    header = "Basic " + base64.b64encode("alice:pä:ss".encode()).decode()
    assert router.route(http("/zoiper", authorization=header)) == ZoiperRoute("alice", "pä:ss", None, "basic")
    assert router.route(http("/zoiper")) == ZoiperRoute(None, None, None, "none")


def test_zoiper_path_is_not_served_over_tftp(router):
    assert isinstance(router.route(Request("tftp", "zoiper")), NotFound)


@pytest.mark.parametrize("header", ["", "Basic", "Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"nocolon").decode(), "Basic " + base64.b64encode(b"\xff:\xfe").decode()])
def test_malformed_basic_headers_give_no_credentials(header):
    assert basic_credentials(header) is None


@given(st.text(max_size=300))
def test_split_path_never_returns_unsafe_segments(path):
    result = split_path(path, percent_encoded=True)
    if isinstance(result, BadRequest):
        return
    for segment in result:
        assert segment not in ("", ".", "..")
        assert "/" not in segment and "\\" not in segment and "\x00" not in segment


@given(st.text(max_size=200), st.text(max_size=100))
def test_router_never_raises(router, path, agent):
    router.route(http(path, user_agent=agent))
    router.route(Request("tftp", path, user_agent=agent))


def test_remembered_routes_are_bounded_in_bytes_too(router, monkeypatch):
    """A different long User-Agent on every request cannot make the route memory grow without bound."""
    import zprovd.routing as routing

    monkeypatch.setattr(routing, "KNOWN_ROUTE_BYTES", 100_000)
    router = Router(router.catalogue, ZOIPER)
    for i in range(100):
        route = router.route(http("/acme-a1.cfg", user_agent=f"Acme-A1 {i:05d} " + "x" * 8000))
        assert isinstance(route, GenericRoute)
        assert router._known_size <= 100_000 and len(router._known) <= 13
