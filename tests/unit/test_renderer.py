"""The shared renderer and the template context."""

from pathlib import Path

import pytest

from zprovd.backends import Device, SipAccount, User
from zprovd.catalogue import bundled_templates_dir, load_catalogue
from zprovd.config import ProvisioningConfig
from zprovd.context import RequestInfo, device_context
from zprovd.renderer import Renderer, RenderError

PROV = ProvisioningConfig("192.0.2.10", "http://192.0.2.10/", "en", {"sip_port": 5060})


def write(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("template", ["t/a.xml.j2", "t/a.cfg.j2"])
@pytest.mark.parametrize("bad", ["a\x0bb", "nul\x00", "esc\x1b[0m", "\ufffe"])
def test_values_no_configuration_file_can_carry_are_refused(tmp_path, template, bad):
    write(tmp_path, template, "<x>{{ value }}</x>\n")
    with pytest.raises(RenderError, match="control character"):
        Renderer([tmp_path]).render(template, {"value": bad})


@pytest.mark.parametrize("secret", ["s3cr\x01t-Xyzzy", "s3cr\nt-Xyzzy"])
def test_a_render_error_names_the_template_lines_never_the_value(tmp_path, secret):
    write(tmp_path, "t/a.cfg.j2", "first\n{% include 't/inc.j2' %}\n")
    write(tmp_path, "t/inc.j2", "x\ny = {{ secret|kv }}\n")
    with pytest.raises(RenderError) as info:
        Renderer([tmp_path]).render("t/a.cfg.j2", {"secret": secret})
    message = str(info.value)
    assert "s3cr" not in message and "Xyzzy" not in message
    assert f"(line 2 of {tmp_path / 't' / 'inc.j2'}, called from line 2 of {tmp_path / 't' / 'a.cfg.j2'})" in message


def test_tabs_and_non_ascii_are_fine(tmp_path):
    write(tmp_path, "t/a.xml.j2", "<x>{{ value }}</x>")
    assert Renderer([tmp_path]).render("t/a.xml.j2", {"value": "Zoë\tÅ"}) == "<x>Zoë\tÅ</x>".encode()


def test_xml_templates_are_escaped_and_others_not(tmp_path):
    write(tmp_path, "t/a.xml.j2", "{{ v }}")
    write(tmp_path, "t/a.cfg.j2", "{{ v }}")
    r = Renderer([tmp_path])
    assert r.render("t/a.xml.j2", {"v": "<&>"}) == b"&lt;&amp;&gt;"
    assert r.render("t/a.cfg.j2", {"v": "<&>"}) == b"<&>"


def test_kv_filter_refuses_line_breaks(tmp_path):
    write(tmp_path, "t/a.cfg.j2", "k = {{ v|kv }}")
    with pytest.raises(RenderError, match="line break"):
        Renderer([tmp_path]).render("t/a.cfg.j2", {"v": "x\nother.key = 1"})


def test_missing_variable_is_an_error_not_an_empty_string(tmp_path):
    write(tmp_path, "t/a.cfg.j2", "k = {{ nothing }}")
    with pytest.raises(RenderError, match="undefined variable"):
        Renderer([tmp_path]).render("t/a.cfg.j2", {})


def test_sandbox_refuses_unsafe_attribute_access(tmp_path):
    write(tmp_path, "t/a.cfg.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RenderError, match="sandbox|undefined"):
        Renderer([tmp_path]).render("t/a.cfg.j2", {})


def test_fail_stops_a_render_with_its_message(tmp_path):
    write(tmp_path, "t/a.cfg.j2", "{{ fail('vars.x must be a number') }}")
    with pytest.raises(RenderError, match="vars.x must be a number"):
        Renderer([tmp_path]).render("t/a.cfg.j2", {})


@pytest.mark.parametrize("template, reads", [
    ("t/plain.j2", False),
    ("t/includes_plain.j2", False),
    ("t/direct.j2", True),
    ("t/in_a_branch_not_taken.j2", True),
    ("t/includes_reader.j2", True),
    ("t/imports_a_macro_reading_it.j2", True),
    ("t/sets_a_local_of_that_name.j2", True),  # any mention counts: the check is by name, not by meaning
])
def test_reads_request_names_templates_whose_bytes_may_depend_on_the_request(tmp_path, template, reads):
    write(tmp_path, "t/plain.j2", "{{ vars.a }}")
    write(tmp_path, "t/includes_plain.j2", '{% include "t/plain.j2" %}')
    write(tmp_path, "t/direct.j2", "{{ request.user_agent }}")
    write(tmp_path, "t/in_a_branch_not_taken.j2", "{% if vars.a == 2 %}{{ request['client'] }}{% endif %}")
    write(tmp_path, "t/includes_reader.j2", '{% include "t/direct.j2" %}')
    write(tmp_path, "t/macros.j2", "{% macro who() %}{{ request.client }}{% endmacro %}{% macro other() %}x{% endmacro %}")
    write(tmp_path, "t/imports_a_macro_reading_it.j2", '{% from "t/macros.j2" import other %}{{ other() }}')
    write(tmp_path, "t/sets_a_local_of_that_name.j2", "{% set request = 1 %}{{ request }}")
    renderer = Renderer([tmp_path])
    _, dependencies = renderer.render_tracked(template, {"vars": {"a": 1}, "request": RequestInfo().context()})
    assert renderer.reads_request(dependencies) is reads
    assert renderer.reads_request(()) is False


def test_keep_last_good_serves_the_previous_version_of_a_broken_template(tmp_path):
    write(tmp_path, "t/a.cfg.j2", "version A")
    renderer = Renderer([tmp_path], keep_last_good=True)
    assert renderer.render("t/a.cfg.j2", {}) == b"version A"
    import os, time

    path = tmp_path / "t" / "a.cfg.j2"
    path.write_text("{% if %}")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert renderer.render("t/a.cfg.j2", {}) == b"version A"
    with pytest.raises(RenderError, match="syntax error"):
        Renderer([tmp_path]).render("t/a.cfg.j2", {})


def test_each_line_takes_its_own_users_port_and_transport():
    model = load_catalogue([bundled_templates_dir()]).get("yealink-t48g")
    tls_user = User("a", "x", "A", [SipAccount("100", "pw", "d")], {"sip_transport": "tls", "sip_port": 5061})
    plain_user = User("b", "x", "B", [SipAccount("200", "pw", "d")], {})
    device = Device("001565aabbcc", "yealink-t48g", ["a", "b"], {"sip_transport": "tcp"})
    lines = device_context(PROV, model, device, [tls_user, plain_user], "x", RequestInfo())["lines"]
    assert [(l["sip_user"], l["sip_transport"], l["sip_port"]) for l in lines] == [("100", "tls", 5061), ("200", "tcp", 5060)]


def test_a_tls_line_without_a_port_gets_5061():
    """RFC 3261, 19.1.2: a phone told "tls" on 5060 would not register."""
    model = load_catalogue([bundled_templates_dir()]).get("yealink-t48g")
    prov = ProvisioningConfig("192.0.2.10", "http://192.0.2.10/", "en", {})
    tls_user = User("a", "x", "A", [SipAccount("100", "pw", "d")], {"sip_transport": "TLS"})
    udp_user = User("b", "x", "B", [SipAccount("200", "pw", "d")], {})
    port_user = User("c", "x", "C", [SipAccount("300", "pw", "d")], {"sip_transport": "tls", "sip_port": "5071"})
    device = Device("001565aabbcc", "yealink-t48g", ["a", "b", "c"], {})
    ctx = device_context(prov, model, device, [tls_user, udp_user, port_user], "001565aabbcc.cfg", RequestInfo())
    assert [(l["sip_transport"], l["sip_port"]) for l in ctx["lines"]] == [("tls", 5061), ("udp", 5060), ("tls", 5071)]
    rendered = Renderer([]).render("yealink/mac.cfg.j2", ctx).decode()
    assert "account.1.sip_server.1.port = 5061" in rendered and "account.2.sip_server.1.port = 5060" in rendered
