"""The [dhcp] section: parsing, option encoding and every error message."""

from __future__ import annotations

import tomllib
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from zprovd.config import ConfigError, SectionReader
from zprovd.dhcp.config import (
    DHCPConfig,
    MatchRule,
    PoolRange,
    encode_option,
    load_dhcp_config,
    parse_section,
)

FILE = Path("/etc/zprovd/test.toml")

SERVER = """
[dhcp]
enabled = true
interface = "eth1"
mode = "server"
answer = "all"
pool = ["10.1.0.100-10.1.0.149", "10.1.0.150-10.1.0.199"]
subnet_mask = "255.255.255.0"
router = "10.1.0.1"
dns = ["10.1.0.1", "10.1.0.2"]
lease_time = 600
server_address = "10.1.0.2"
rate_limit = 5
"""


def parse(text: str) -> tuple[DHCPConfig, list[str]]:
    data = tomllib.loads(text)
    problems: list[str] = []
    reader = SectionReader(problems, FILE, "dhcp", data.get("dhcp", {}), FILE.parent)
    config = parse_section(reader)
    reader.finish()
    return config, problems


def ok(text: str) -> DHCPConfig:
    config, problems = parse(text)
    assert problems == []
    return config


def errors(text: str) -> list[str]:
    _, problems = parse(text)
    assert problems, "expected problems"
    return problems


def one_error(text: str) -> str:
    problems = errors(text)
    assert len(problems) == 1, problems
    return problems[0]


# Defaults and complete sections ------------------------------------------


def test_absent_section_gives_disabled_defaults():
    config = ok("")
    assert config == DHCPConfig()
    assert (config.enabled, config.mode, config.answer, config.lease_time, config.rate_limit) == (
        False, "inform", "matching", 3600, 10,
    )
    assert config.allow_other_servers is False
    assert config.server_address is None


def test_disabled_section_needs_no_interface():
    assert ok("[dhcp]\nenabled = false\nmode = \"server\"\n").enabled is False


def test_full_server_section():
    config = ok(SERVER)
    assert config.enabled and config.mode == "server" and config.interface == "eth1"
    assert config.pool == [
        PoolRange(IPv4Address("10.1.0.100"), IPv4Address("10.1.0.149")),
        PoolRange(IPv4Address("10.1.0.150"), IPv4Address("10.1.0.199")),
    ]
    assert config.pool_size() == 100
    assert str(config.network()) == "10.1.0.0/24"
    assert config.subnet_mask == IPv4Address("255.255.255.0")
    assert config.router == IPv4Address("10.1.0.1")
    assert config.dns == [IPv4Address("10.1.0.1"), IPv4Address("10.1.0.2")]
    assert config.lease_time == 600 and config.rate_limit == 5
    assert config.server_address == IPv4Address("10.1.0.2")
    # subnet_mask, router and dns become options 1, 3 and 6.
    assert config.options == {1: bytes([255, 255, 255, 0]), 3: bytes([10, 1, 0, 1]), 6: bytes([10, 1, 0, 1, 10, 1, 0, 2])}


def test_pool_ranges_are_sorted():
    config = ok('[dhcp]\npool = ["10.0.0.50-10.0.0.60", "10.0.0.1-10.0.0.9"]\n')
    assert [str(r) for r in config.pool] == ["10.0.0.1-10.0.0.9", "10.0.0.50-10.0.0.60"]
    assert IPv4Address("10.0.0.5") in config.pool[0]
    assert IPv4Address("10.0.0.10") not in config.pool[0]


# Options -------------------------------------------------------------------


def test_options_by_name_and_number():
    config = ok(
        """
[dhcp]
[dhcp.options]
tftp-server-name = "tftp.example.com"
boot-file-name = "http://10.0.0.2/boot.cfg"
"150" = ["10.0.0.2", "10.0.0.3"]
160 = "https://prov.example.com/cfg/"
ntp-servers = "10.0.0.5, 10.0.0.6"
time-offset = -3600
domain-name = "example.com"
interface-mtu = 1400
domain-search = ["a.example", "b.example"]
"200" = "hex:01:02:ff"
"201" = ["192.0.2.1"]
"202" = "plain text"
"""
    )
    assert config.options == {
        66: b"tftp.example.com",
        67: b"http://10.0.0.2/boot.cfg",
        150: bytes([10, 0, 0, 2, 10, 0, 0, 3]),
        160: b"https://prov.example.com/cfg/",
        42: bytes([10, 0, 0, 5, 10, 0, 0, 6]),
        2: (-3600).to_bytes(4, "big", signed=True),
        15: b"example.com",
        26: (1400).to_bytes(2, "big"),
        119: b"\x01a\x07example\x00\x01b\x07example\x00",
        200: b"\x01\x02\xff",
        201: bytes([192, 0, 2, 1]),
        202: b"plain text",
    }


def test_option_43_hex_and_sub_option_table():
    assert encode_option("43", "01:04:0a:00:00:01") == (43, bytes([1, 4, 10, 0, 0, 1]))
    assert encode_option("vendor-encapsulated-options", "0104 0a000001") == (43, bytes([1, 4, 10, 0, 0, 1]))
    assert encode_option("43", {"1": "abc", "2": ["10.0.0.1"], "3": "hex:ff"}) == (
        43, b"\x01\x03abc\x02\x04\x0a\x00\x00\x01\x03\x01\xff",
    )


def test_option_66_accepts_a_name_an_address_or_a_url():
    for value in ("tftp.example.com", "10.0.0.2", "http://prov.example.com:8080/path/"):
        assert encode_option("tftp-server-name", value) == (66, value.encode())


def test_tftp_server_address_alias_is_150():
    assert encode_option("tftp-server-address", ["10.0.0.2"]) == (150, bytes([10, 0, 0, 2]))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tftp-serve-name", "x", "unknown option name"),
        ("0", "x", "option numbers go from 1 to 254"),
        ("255", "x", "option numbers go from 1 to 254"),
        ("51", 3600, "option 51 (lease time (use lease_time)) is set by the server itself"),
        ("53", "hex:01", "is set by the server itself"),
        ("54", "10.0.0.1", "is set by the server itself"),
        ("150", ["10.0.0.300"], "'10.0.0.300' is not an IPv4 address"),
        ("150", [], "must list at least one IPv4 address"),
        ("150", 5, "must be a list of IPv4 addresses, not an integer"),
        ("tftp-server-name", ["a"], "must be a string, not a list"),
        ("tftp-server-name", "", "must not be empty"),
        ("160", "x" * 300, "value is 300 bytes long; an option holds at most 255"),
        ("43", "zz:01", "is not hex bytes"),
        ("43", 7, "must be hex bytes like"),
        ("43", {"300": "x"}, "sub-option '300' must be a number from 1 to 254"),
        ("43", {"1": 5}, "sub-option 1: must be text"),
        ("43", {}, "must not be empty"),
        ("time-offset", "x", "must be an integer, not a string"),
        ("interface-mtu", 70000, "must be between 0 and 65535, not 70000"),
        ("subnet-mask", "255.255.255.0.1", "is not an IPv4 address"),
        ("domain-search", ["bad..name"], "is not a domain name"),
        ("200", "hex:", "must be followed by at least one byte"),
        ("200", 12, "must be text, \"hex:...\" bytes or a list of IPv4 addresses, not an integer"),
        ("200", True, "not a boolean"),
    ],
)
def test_option_errors(key, value, message):
    with pytest.raises(ValueError, match=None) as info:
        encode_option(key, value)
    assert message in str(info.value)


def test_option_error_names_file_section_and_key():
    problem = one_error('[dhcp]\n[dhcp.options]\n"150" = ["nope"]\n')
    assert problem == f"{FILE}: [dhcp] options.150: 'nope' is not an IPv4 address"


def test_same_option_twice_by_name_and_number():
    problem = one_error('[dhcp]\n[dhcp.options]\ntftp-server-name = "a"\n"66" = "b"\n')
    assert "options.66: option 66 is already set as 'tftp-server-name'" in problem


def test_router_key_and_routers_option_conflict():
    problem = one_error('[dhcp]\nrouter = "10.0.0.1"\n[dhcp.options]\nrouters = "10.0.0.9"\n')
    assert "[dhcp] options.routers: option 3 is already set by the key router" in problem


def test_options_must_be_a_table():
    assert "options: must be a table, not a string" in one_error('[dhcp]\noptions = "x"\n')


# Scalar keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ('mode = "dhcp"', "mode: must be one of 'inform', 'proxy', 'server', not 'dhcp'"),
        ('answer = "some"', "answer: must be one of 'matching', 'all', not 'some'"),
        ("enabled = 1", "enabled: must be true or false, not an integer"),
        ("lease_time = 5", "lease_time: must be between 10 and 31536000, not 5"),
        ("rate_limit = -1", "rate_limit: must be between 0 and 10000, not -1"),
        ('subnet_mask = "255.0.255.0"', "subnet_mask: '255.0.255.0' is not a subnet mask"),
        ('router = "router.local"', "router: 'router.local' is not an IPv4 address"),
        ('server_address = "::1"', "server_address: '::1' is not an IPv4 address"),
        ('dns = ["10.0.0.1", "x"]', "dns: 'x' is not an IPv4 address"),
        ('interface = "eth 0"', "interface: 'eth 0' is not a network interface name"),
        ('interface = "averyveryverylongname"', "is not a network interface name"),
        ('pool = ["10.0.0.1"]', "pool: '10.0.0.1' is not a range \"first-last\""),
        ('pool = ["10.0.0.9-10.0.0.1"]', "pool: '10.0.0.9-10.0.0.1': the last address is before the first"),
        ('pool = ["10.0.0.1-10.0.0.x"]', "pool: '10.0.0.x' is not an IPv4 address"),
        ('pool = ["10.0.0.1-10.0.0.9", "10.0.0.5-10.0.0.20"]',
         "pool: ranges 10.0.0.1-10.0.0.9 and 10.0.0.5-10.0.0.20 overlap"),
        ('pool = ["10.0.0.0-10.1.0.0"]', "pool: holds more than 65536 addresses"),
        ("allow_other_servers = \"yes\"", "allow_other_servers: must be true or false, not a string"),
        ("colour = 1", "colour: unknown key"),
        ('match = "x"', "match: must be an array of tables ([[dhcp.match]])"),
    ],
)
def test_key_errors(line, message):
    problem = one_error(f"[dhcp]\n{line}\n")
    assert problem.startswith(f"{FILE}: [dhcp] ")
    assert message in problem


def test_all_problems_are_reported_at_once():
    problems = errors('[dhcp]\nmode = "x"\nrouter = "y"\nlease_time = 1\nwhat = 2\n')
    assert len(problems) == 4


# Requirements when enabled -------------------------------------------------


def test_enabled_needs_an_interface():
    problem = one_error('[dhcp]\nenabled = true\nanswer = "all"\n')
    assert problem == f"{FILE}: [dhcp] interface: must name the network interface to serve (enabled = true)"


def test_enabled_matching_without_match_tables():
    problem = one_error('[dhcp]\nenabled = true\ninterface = "eth1"\n')
    assert "answer: is \"matching\" but there is no [[dhcp.match]]" in problem


def test_server_mode_needs_pool_and_subnet_mask():
    problems = errors('[dhcp]\nenabled = true\ninterface = "eth1"\nmode = "server"\nanswer = "all"\n')
    assert any("pool: must list at least one address range in server mode" in p for p in problems)
    assert any("subnet_mask: must be set in server mode" in p for p in problems)


def test_server_mode_consistency_of_addresses():
    text = SERVER.replace('router = "10.1.0.1"', 'router = "10.1.0.120"').replace(
        'server_address = "10.1.0.2"', 'server_address = "10.9.0.2"'
    ).replace('"10.1.0.150-10.1.0.199"', '"10.1.0.150-10.1.1.10"')
    problems = errors(text)
    assert any("pool: range 10.1.0.150-10.1.1.10 is not inside the subnet 10.1.0.0/24" in p for p in problems)
    assert any("router: 10.1.0.120 is inside the pool" in p for p in problems)
    assert any("server_address: 10.9.0.2 is not inside the pool's subnet 10.1.0.0/24" in p for p in problems)


def test_proxy_mode_needs_no_pool():
    config = ok('[dhcp]\nenabled = true\ninterface = "eth1"\nmode = "proxy"\nanswer = "all"\n')
    assert config.mode == "proxy" and config.pool == []


# [[dhcp.match]] ----------------------------------------------------------


MATCHES = """
[dhcp]
[[dhcp.match]]
vendor_class = "Yealink"
options = { tftp-server-name = "y.example", "150" = ["10.0.0.2"] }
[[dhcp.match]]
oui = "00-04-F2"
options = { "160" = "http://poly/" }
[[dhcp.match]]
mac = "0015.65aa.bbcc"
"""


def test_match_tables():
    config = ok(MATCHES)
    yealink, polycom, one = config.matches
    assert yealink == MatchRule(options={66: b"y.example", 150: bytes([10, 0, 0, 2])}, vendor_class="Yealink")
    assert polycom == MatchRule(options={160: b"http://poly/"}, oui="0004f2")
    assert one == MatchRule(options={}, mac="001565aabbcc")


def test_match_semantics():
    yealink, polycom, one = ok(MATCHES).matches
    assert yealink.matches("001122334455", "yealink SIP-T46S")  # case-insensitive substring
    assert not yealink.matches("001122334455", "Polycom")
    assert not yealink.matches("001122334455", None)
    assert polycom.matches("0004f2123456", None)
    assert not polycom.matches("0004f3123456", "Yealink")
    assert one.matches("001565aabbcc", None)
    assert not one.matches("001565aabbcd", None)
    assert yealink.describe() == "vendor_class 'Yealink'"
    assert polycom.describe() == "oui 0004f2"


@pytest.mark.parametrize(
    "body, message",
    [
        ('options = {}', "match[1]: needs exactly one of vendor_class, oui or mac"),
        ('vendor_class = "a"\nmac = "001565aabbcc"', "match[1]: needs exactly one of vendor_class, oui or mac (has vendor_class, mac)"),
        ('oui = "0015"', "match[1].oui: '0015' is not an OUI"),
        ('mac = "00:15"', "match[1].mac: '00:15' is not a MAC address"),
        ('vendor_class = ""', "match[1].vendor_class: must be a non-empty string"),
        ('vendor_class = 3', "match[1].vendor_class: must be a non-empty string"),
        ('vendor_class = "a"\nopts = {}', "match[1].opts: unknown key"),
        ('vendor_class = "a"\noptions = { "150" = "x" }', "match[1].options.150: 'x' is not an IPv4 address"),
        ('vendor_class = "a"\noptions = 3', "match[1].options: must be a table of options, not an integer"),
    ],
)
def test_match_errors(body, message):
    problems = errors(f"[dhcp]\n[[dhcp.match]]\n{body}\n")
    assert any(message in p for p in problems), problems


def test_second_match_is_numbered():
    problems = errors('[dhcp]\n[[dhcp.match]]\nmac = "001565aabbcc"\n[[dhcp.match]]\noui = "x"\n')
    assert problems == [f"{FILE}: [dhcp] match[2].oui: 'x' is not an OUI (3 bytes, e.g. \"00:15:65\")"]


# Files ---------------------------------------------------------------------


def test_load_dhcp_config_reads_only_dhcp_and_state_dir(tmp_path):
    path = tmp_path / "zprovd.toml"
    path.write_text('state_dir = "state"\n[http]\nwhatever = 1\n' + SERVER)
    config, state_dir = load_dhcp_config(path)
    assert config.mode == "server"
    assert state_dir == tmp_path / "state"


def test_load_dhcp_config_reports_problems(tmp_path):
    path = tmp_path / "zprovd.toml"
    path.write_text('[dhcp]\nmode = "x"\nwho = 1\n')
    with pytest.raises(ConfigError) as info:
        load_dhcp_config(path)
    assert info.value.problems == [
        f"{path}: [dhcp] mode: must be one of 'inform', 'proxy', 'server', not 'x'",
        f"{path}: [dhcp] who: unknown key",
    ]


def test_load_dhcp_config_syntax_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[dhcp\n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_dhcp_config(path)


def test_registered_with_the_main_configuration():
    from zprovd.config import SECTION_PARSERS, _register_builtin_subsystems

    _register_builtin_subsystems()
    assert SECTION_PARSERS["dhcp"] is parse_section
