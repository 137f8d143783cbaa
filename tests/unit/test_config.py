"""Configuration errors name the file, the section, the key and the reason."""

from pathlib import Path

import pytest

from zprovd.config import ConfigError, load_config, parse_listen

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = '[provisioning]\nserver = "192.0.2.10"\n'


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "z.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_shipped_example_configs_are_valid():
    for name in ("zprovd.toml", "dev.toml"):
        load_config(ROOT / "etc" / name)


def test_minimal_config_gets_documented_defaults(tmp_path):
    path = tmp_path / "z.toml"
    path.write_text(MINIMAL)
    c = load_config(path)
    assert [str(l) for l in c.http.listen] == ["0.0.0.0:80"]
    assert [str(l) for l in c.https.listen] == ["0.0.0.0:443"]
    assert [str(l) for l in c.tftp.listen] == ["0.0.0.0:69"]
    assert c.backend.type == "sqlite"
    assert c.state_dir == Path("/var/lib/zprovd")
    assert c.provisioning.base_url == "http://192.0.2.10/"
    assert c.zoiper.paths == ["/zoiper"]
    assert c.zoiper.user_params == ["user", "username", "u"]
    assert c.zoiper.error_status == 200


def test_relative_state_dir_resolves_against_the_config_folder(tmp_path):
    path = tmp_path / "z.toml"
    path.write_text('state_dir = "state"\n' + MINIMAL)
    assert load_config(path).state_dir == tmp_path / "state"


def test_unknown_key_names_file_section_and_key(tmp_path):
    [problem] = problems_of(tmp_path, MINIMAL + "[http]\nlisen = []\n")
    assert problem == f"{tmp_path / 'z.toml'}: [http] lisen: unknown key"


@pytest.mark.parametrize("vars, reason", [
    ('{ sip_port = "abc" }', "sip_port must be a port number (0-65535), not 'abc'"),
    ("{ sip_port = 65536 }", "sip_port must be a port number (0-65535), not 65536"),
    ('{ sip_transport = "sctp" }', "sip_transport must be udp, tcp or tls, not 'sctp'"),
])
def test_unusable_sip_vars_are_refused(tmp_path, vars, reason):
    [problem] = problems_of(tmp_path, MINIMAL + f"vars = {vars}\n")
    assert problem == f"{tmp_path / 'z.toml'}: [provisioning] vars: {reason}"


def test_sip_port_0_is_kept_for_phones_that_look_it_up_in_dns(tmp_path):
    path = tmp_path / "z.toml"
    path.write_text(MINIMAL + 'vars = { sip_port = 0, sip_transport = "TLS" }\n')
    assert load_config(path).provisioning.vars["sip_port"] == 0


def test_folders_that_do_not_exist_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    found = problems_of(tmp_path, MINIMAL + '[templates]\ndirs = ["ops-typo"]\n'
                        '[tftp]\nfirmware_dir = "fw"\nupload_dir = "file"\n')
    z = tmp_path / "z.toml"
    assert found == [f"{z}: [tftp] firmware_dir: {tmp_path / 'fw'} does not exist",
                     f"{z}: [tftp] upload_dir: {tmp_path / 'file'} is not a folder",
                     f"{z}: [templates] dirs: {tmp_path / 'ops-typo'} does not exist"]


def test_a_group_needs_a_user(tmp_path):
    [problem] = problems_of(tmp_path, MINIMAL + '[server]\ngroup = "zprovd"\n')
    assert problem.startswith(f"{tmp_path / 'z.toml'}: [server] group: needs [server] user")


@pytest.mark.parametrize("listens, problem", [
    (('["127.0.0.1:8080"]', '["127.0.0.1:8080"]', "[]"), "[https] listen: 127.0.0.1:8080 is also where [http] listens"),
    (('["0.0.0.0:8080"]', "[]", '["127.0.0.1:8080"]'), "[metrics] listen: 127.0.0.1:8080 is also where [http] listens"),
])
def test_one_tcp_address_serves_one_of_http_https_and_metrics(tmp_path, listens, problem):
    http, https, metrics = listens
    [found] = problems_of(tmp_path, MINIMAL + f"[http]\nlisten = {http}\n[https]\nlisten = {https}\n"
                          f"[metrics]\nlisten = {metrics}\n")
    assert found == f"{tmp_path / 'z.toml'}: {problem}"


def test_the_same_port_on_other_addresses_is_fine(tmp_path):
    path = tmp_path / "z.toml"
    path.write_text(MINIMAL + '[http]\nlisten = ["127.0.0.1:8080", "[::1]:8080"]\n[https]\nlisten = ["127.0.0.2:8080", "0.0.0.0:0"]\n'
                    '[metrics]\nlisten = ["127.0.0.1:0"]\n')
    load_config(path)


def test_unknown_section_and_top_level_key(tmp_path):
    found = problems_of(tmp_path, 'stat_dir = "x"\n' + MINIMAL + "[htp]\n")
    assert f"{tmp_path / 'z.toml'}: top level stat_dir: unknown key" in found
    assert f"{tmp_path / 'z.toml'}: top level htp: unknown section" in found


def test_all_problems_are_reported_at_once(tmp_path):
    found = problems_of(
        tmp_path,
        '[http]\nlisten = ["1.2.3.4"]\n[tftp]\nmax_blksize = 70000\n[zoiper]\nerror_status = "200"\n',
    )
    text = "\n".join(found)
    assert "[http] listen: '1.2.3.4' is not \"host:port\"" in text
    assert "[tftp] max_blksize: must be between 8 and 65464, not 70000" in text
    assert "[zoiper] error_status: must be an integer, not a string" in text
    assert "[provisioning] server: must be set" in text


def test_wrong_types_are_named(tmp_path):
    found = problems_of(tmp_path, MINIMAL + "[templates]\ndirs = \"/x\"\n[log]\nformat = \"xml\"\n")
    assert any("[templates] dirs: must be a list of strings, not a string" in p for p in found)
    assert any("[log] format: must be one of 'text', 'json', not 'xml'" in p for p in found)


def test_boolean_is_not_an_integer(tmp_path):
    found = problems_of(tmp_path, MINIMAL + "[tftp]\nretries = true\n")
    assert any("[tftp] retries: must be an integer, not a boolean" in p for p in found)


def test_certificate_without_key_is_an_error(tmp_path):
    found = problems_of(tmp_path, MINIMAL + '[https]\ncertificate = "c.pem"\n')
    assert any("[https] private_key: certificate and private_key must be set together" in p for p in found)


def test_toml_syntax_error_names_the_file(tmp_path):
    [problem] = problems_of(tmp_path, "[http\n")
    assert problem.startswith(f"{tmp_path / 'z.toml'}: TOML syntax error")


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.problems == [f"{tmp_path / 'nope.toml'}: cannot read configuration: No such file or directory"]


def test_zoiper_paths_must_be_absolute(tmp_path):
    found = problems_of(tmp_path, MINIMAL + '[zoiper]\npaths = ["zoiper"]\n')
    assert any("[zoiper] paths: 'zoiper' must start with '/'" in p for p in found)


@pytest.mark.parametrize(
    "text,host,port",
    [("0.0.0.0:80", "0.0.0.0", 80), ("[::]:443", "::", 443), ("[::1]:69", "::1", 69), ("127.0.0.1:0", "127.0.0.1", 0)],
)
def test_listen_addresses(text, host, port):
    listen = parse_listen(text)
    assert (listen.host, listen.port) == (host, port)


@pytest.mark.parametrize("text", ["localhost:80", "::1:80", "1.2.3.4:99999", "1.2.3.4:", "[::1]80"])
def test_bad_listen_addresses(text):
    with pytest.raises(ValueError):
        parse_listen(text)


def test_log_level(tmp_path):
    path = tmp_path / "z.toml"
    path.write_text(MINIMAL + '[log]\nlevel = "debug"\n')
    assert load_config(path).log.level == "debug"
    path.write_text(MINIMAL)
    assert load_config(path).log.level == "info"
    found = problems_of(tmp_path, MINIMAL + '[log]\nlevel = "verbose"\n')
    assert any("[log] level: must be one of 'debug', 'info', 'warn', 'error', not 'verbose'" in p for p in found)
