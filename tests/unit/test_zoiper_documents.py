"""The Zoiper documents: templates/zoiper/* rendered and checked against zprovd/schemas/zoiper-*.rng."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from zprovd.backends import SipAccount, User
from zprovd.catalogue import bundled_templates_dir
from zprovd.config import ProvisioningConfig
from zprovd.context import RequestInfo, zoiper_context
from zprovd.renderer import Renderer, RenderError
from zprovd.sipvars import LineError

CONFIG_114 = "zoiper/config-1.14.xml.j2"
CONFIG_10 = "zoiper/config-1.0.xml.j2"
ERROR = "zoiper/error.xml.j2"
PROVISION = "zoiper/Provision.xml.j2"

# The children of <account> in Zoiper's annotated 1.14 example, in its order.
ACCOUNT_ELEMENTS_114 = [
    "ident", "name", "username", "password", "register_on_startup", "enable_push_notifications",
    "do_not_play_ringback_tones", "voicemail_check_extension", "voicemail_transfer_extension",
    "force_rfc3264", "use_kpml", "use_overlap_dialing", "use_custom_ringtone", "custom_ringtone_location",
    "use_custom_certificate", "custom_certicate_location", "custom_certificate", "mwi_subscribe_usage",
    "use_number_rewriting", "number_rewriting_country", "number_rewriting_prefix", "use_strip_dial_chars",
    "strip_dial_chars", "token", "token_url", "balance_url", "rate_url", "quality_rating_url", "protocol",
    "reregistration_mode", "reregistration_time", "resubscription_mode", "resubscription_time", "SIP_domain",
    "SIP_use_outbound_proxy", "SIP_outbound_proxy", "SIP_transport_type", "SIP_use_auth_username",
    "SIP_auth_username", "SIP_callerId", "SIP_use_rport", "SIP_use_rport_media", "SIP_srtp_mode",
    "SIP_dtmf_style", "SIP_use_blf", "SIP_publish_presence", "SIP_subscribe_presence", "SIP_keep_alive_mode",
    "SIP_keep_alive_timeout", "SIP_use_preconditions", "SIP_use_reg_event", "stun", "IAX2_host",
    "IAX2_context", "IAX2_callerId", "IAX2_callerNumber", "IAX2_dtmf_style", "enable_file_transfer",
    "enabled_video_fmtp", "msrp", "sms", "codecs", "zrtp",
]  # fmt: skip
OPTIONS_ELEMENTS_114 = ["prov_version", "customer_sid", "prov_id", "prov_name", "accounts", "diagnostics", "breakpad"]
ACCOUNT_ELEMENTS_10 = [
    "ident", "name", "username", "password", "SIP_domain", "SIP_auth_username", "SIP_callerId",
    "SIP_transport_type", "protocol",
]  # fmt: skip

NASTY_NAME = "Zoë Ünal <boss> & \"Co\" 'Ltd'"
NASTY_PASSWORD = "пароль<>&\"'"


# --------------------------------------------------------------------------
# helpers


_RENDERER = Renderer([])  # compiled templates are cached: share one


@pytest.fixture
def renderer() -> Renderer:
    return _RENDERER


_schemas: dict[str, etree.RelaxNG] = {}


def schema(name: str) -> etree.RelaxNG:
    if name not in _schemas:
        with files("zprovd.schemas").joinpath(name).open("rb") as f:
            _schemas[name] = etree.RelaxNG(etree.parse(f))
    return _schemas[name]


def assert_valid(schema_name: str, document: bytes) -> etree._Element:
    root = etree.fromstring(document)
    rng = schema(schema_name)
    assert rng.validate(root), f"{schema_name}: {rng.error_log}\n{document.decode()}"
    return root


def is_valid(schema_name: str, document: bytes) -> bool:
    return schema(schema_name).validate(etree.fromstring(document))


def make_user(*accounts: SipAccount, display_name: str = "Alice Example", vars: dict[str, Any] | None = None) -> User:
    return User(
        login="alice",
        password_hash="not-a-real-hash",
        display_name=display_name,
        accounts=list(accounts),
        vars=dict(vars or {}),
    )


def context(user: User, version: str = "1.14", prov_vars: dict[str, Any] | None = None) -> dict[str, Any]:
    prov = ProvisioningConfig(
        server="192.0.2.10", base_url="http://192.0.2.10/", language="en", vars=dict(prov_vars or {})
    )
    return zoiper_context(prov, user, version, RequestInfo())


def render_config(renderer: Renderer, user: User, template: str = CONFIG_114, **kw: Any) -> etree._Element:
    document = renderer.render(template, context(user, **kw))
    return assert_valid("zoiper-1.14.rng" if template == CONFIG_114 else "zoiper-1.0.rng", document)


def accounts_of(root: etree._Element) -> list[etree._Element]:
    return root.findall("accounts/account")


def text(element: etree._Element, path: str) -> str:
    found = element.find(path)
    assert found is not None, f"no {path}"
    return found.text or ""


def codecs(account: etree._Element) -> list[tuple[int, int, str]]:
    return [
        (int(text(c, "codec_id")), int(text(c, "priority")), text(c, "enabled"))
        for c in account.findall("codecs/codec")
    ]


ONE = SipAccount(sip_user="1001", sip_password="s3cret", sip_domain="pbx.example.com")


# --------------------------------------------------------------------------
# 1.14 document


def test_one_account_is_valid_and_complete(renderer: Renderer) -> None:
    ctx = context(make_user(ONE))
    document = renderer.render(CONFIG_114, ctx)
    assert document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<options>')
    root = assert_valid("zoiper-1.14.rng", document)

    assert [c.tag for c in root] == OPTIONS_ELEMENTS_114
    assert text(root, "prov_version") == "1.14"
    assert text(root, "prov_id") == ctx["prov_id"]
    (account,) = accounts_of(root)
    assert [c.tag for c in account] == ACCOUNT_ELEMENTS_114
    assert text(account, "ident") == "1001@pbx.example.com"
    assert text(account, "name") == "Alice Example"
    assert text(account, "username") == "1001"
    assert text(account, "password") == "s3cret"
    assert text(account, "protocol") == "SIP"
    assert text(account, "SIP_domain") == "pbx.example.com"
    assert text(account, "SIP_transport_type") == "UDP"
    assert text(account, "SIP_use_auth_username") == "false"
    assert text(account, "SIP_auth_username") == "1001"
    assert text(account, "SIP_callerId") == "Alice Example"
    assert text(account, "strip_dial_chars") == " .-()[]{}"


def test_defaults(renderer: Renderer) -> None:
    (account,) = accounts_of(render_config(renderer, make_user(ONE)))
    # Opus wide, G.722, aLaw, uLaw, in that order; every other codec of the
    # example's list sent disabled so that the client's defaults don't add them.
    enabled = [(cid, prio) for cid, prio, on in codecs(account) if on == "true"]
    assert enabled == [(35, 1), (7, 2), (6, 3), (0, 4)]
    disabled = {cid for cid, _, on in codecs(account) if on == "false"}
    assert disabled == {34, 36, 37, 16, 1, 24, 25, 26, 27, 29, 30, 31}
    assert [p for _, p, _ in codecs(account)] == list(range(1, 17))

    assert text(account, "stun/use_stun") == "disabled"
    assert text(account, "stun/stun_host") == ""
    assert text(account, "stun/stun_port") == "3478"
    assert text(account, "SIP_srtp_mode") == "none"
    assert text(account, "SIP_use_rport") == "false"
    assert text(account, "SIP_dtmf_style") == "rfc_2833"
    assert text(account, "SIP_use_outbound_proxy") == "false"
    assert text(account, "enable_push_notifications") == "false"
    assert text(account, "reregistration_mode") == "default"
    assert text(account, "SIP_keep_alive_mode") == "default"
    assert text(account, "zrtp/enabled") == "false"


def test_no_template_copies_the_example_typo() -> None:
    for path in (bundled_templates_dir() / "zoiper").iterdir():
        assert "goolge" not in path.read_text(encoding="utf-8"), path


def test_three_accounts(renderer: Renderer) -> None:
    user = make_user(
        SipAccount("1001", "pw1", "pbx.example.com"),
        SipAccount("1002", "pw2", "pbx.example.com", sip_auth_user="auth1002", display_name="Front desk"),
        SipAccount("2001", "pw3", "other.example.net", display_name="Other PBX"),
    )
    accounts = accounts_of(render_config(renderer, user))
    assert len(accounts) == 3
    assert [text(a, "ident") for a in accounts] == [
        "1001@pbx.example.com",
        "1002@pbx.example.com",
        "2001@other.example.net",
    ]
    assert [text(a, "name") for a in accounts] == ["Alice Example", "Front desk", "Other PBX"]
    assert [text(a, "username") for a in accounts] == ["1001", "1002", "2001"]
    assert [text(a, "password") for a in accounts] == ["pw1", "pw2", "pw3"]
    assert [text(a, "SIP_domain") for a in accounts] == ["pbx.example.com", "pbx.example.com", "other.example.net"]
    assert [text(a, "SIP_use_auth_username") for a in accounts] == ["false", "true", "false"]
    assert [text(a, "SIP_auth_username") for a in accounts] == ["1001", "auth1002", "2001"]
    for account in accounts:
        assert [c.tag for c in account] == ACCOUNT_ELEMENTS_114


def test_accounts_sharing_a_label_get_distinct_names(renderer: Renderer) -> None:
    user = make_user(SipAccount("1001", "a", "pbx.example.com"), SipAccount("1002", "b", "pbx.example.com"))
    names = [text(a, "name") for a in accounts_of(render_config(renderer, user))]
    assert names == ["Alice Example (1001)", "Alice Example (1002)"]


def test_ident_does_not_depend_on_account_order(renderer: Renderer) -> None:
    a = SipAccount("1001", "a", "pbx.example.com", display_name="A")
    b = SipAccount("1002", "b", "pbx.example.com", display_name="B")
    first = {text(x, "name"): text(x, "ident") for x in accounts_of(render_config(renderer, make_user(a, b)))}
    second = {text(x, "name"): text(x, "ident") for x in accounts_of(render_config(renderer, make_user(b, a)))}
    assert first == second


@pytest.mark.parametrize("template", [CONFIG_114, CONFIG_10])
def test_markup_and_non_ascii_come_back_exactly(renderer: Renderer, template: str) -> None:
    account = SipAccount(
        sip_user="10<0>1&\"'", sip_password=NASTY_PASSWORD, sip_domain="pbx.example.com", sip_auth_user="Ünal&<x>"
    )
    root = render_config(renderer, make_user(account, display_name=NASTY_NAME), template)
    (element,) = accounts_of(root)
    assert text(element, "name") == NASTY_NAME
    assert text(element, "SIP_callerId") == NASTY_NAME
    assert text(element, "password") == NASTY_PASSWORD
    assert text(element, "username") == "10<0>1&\"'"
    assert text(element, "SIP_auth_username") == "Ünal&<x>"
    assert text(element, "ident") == "10<0>1&\"'@pbx.example.com"


@pytest.mark.parametrize("template", [CONFIG_114, CONFIG_10])
@pytest.mark.parametrize("secret", ["line1\r\nline2\r", "\ttab\nnewline ", " leading and trailing "])
def test_whitespace_comes_back_exactly(renderer: Renderer, template: str, secret: str) -> None:
    user = make_user(SipAccount("1001", secret, "pbx.example.com", display_name=secret))
    (account,) = accounts_of(render_config(renderer, user, template))
    assert text(account, "password") == secret
    assert text(account, "SIP_callerId") == secret


# Every character XML 1.0 can carry (CR included: it is sent as &#13;).
xml_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters="".join(chr(c) for c in range(32) if chr(c) not in "\t\n\r") + "\ufffe\uffff",
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(name=xml_text, password=xml_text)
def test_any_text_round_trips(name: str, password: str) -> None:
    renderer = _RENDERER
    user = make_user(SipAccount("1001", password, "pbx.example.com", display_name=name))
    for template in (CONFIG_114, CONFIG_10):
        (account,) = accounts_of(render_config(renderer, user, template))
        assert text(account, "password") == password
        assert text(account, "SIP_callerId") == (name or "Alice Example")


@pytest.mark.parametrize("template", [CONFIG_114, CONFIG_10])
def test_text_xml_cannot_carry_is_refused(renderer: Renderer, template: str) -> None:
    user = make_user(SipAccount("1001", "bad\x01password", "pbx.example.com"))
    with pytest.raises(RenderError, match="character XML cannot carry") as info:
        renderer.render(template, context(user))
    assert "password" not in str(info.value)  # a log line shows it: the line numbers only
    assert ", called from line" in str(info.value)


def test_vars_overrides(renderer: Renderer) -> None:
    root = render_config(
        renderer,
        make_user(
            ONE,
            vars={
                "customer_sid": "855",
                "prov_name": "Acme & Sons",
                "stun_host": "stun.example.org",
                "stun_port": "3479",
                "codecs": "g722, alaw",
                "sip_outbound_proxy": "proxy.example.com:5070",
                "voicemail_extension": "*97",
                "sip_register_expires": 120,
                "zoiper_SIP_use_blf": "yes",
                "zoiper_enable_push_notifications": True,
                "zoiper_mwi_subscribe_usage": "AFTER",
                "dtmf_mode": "sip_info_numeric",
            },
        ),
    )
    assert text(root, "customer_sid") == "855"
    assert text(root, "prov_name") == "Acme & Sons"
    (account,) = accounts_of(root)
    assert text(account, "stun/use_stun") == "custom"
    assert text(account, "stun/stun_host") == "stun.example.org"
    assert text(account, "stun/stun_port") == "3479"
    assert [(cid, prio) for cid, prio, on in codecs(account) if on == "true"] == [(7, 1), (6, 2)]
    assert {cid for cid, _, on in codecs(account) if on == "false"} >= {35, 0}
    assert text(account, "SIP_use_outbound_proxy") == "true"
    assert text(account, "SIP_outbound_proxy") == "proxy.example.com:5070"
    assert text(account, "voicemail_check_extension") == "*97"
    assert text(account, "reregistration_mode") == "custom"
    assert text(account, "reregistration_time") == "120"
    assert text(account, "SIP_use_blf") == "true"
    assert text(account, "enable_push_notifications") == "true"
    assert text(account, "mwi_subscribe_usage") == "after"
    assert text(account, "SIP_dtmf_style") == "SIP_info_numeric"


def test_server_vars_apply_and_user_vars_win(renderer: Renderer) -> None:
    user = make_user(ONE, vars={"customer_sid": "user"})
    root = render_config(renderer, user, prov_vars={"customer_sid": "server", "prov_name": "server"})
    assert text(root, "customer_sid") == "user"
    assert text(root, "prov_name") == "server"


def test_codecs_as_a_list_with_ids_and_duplicates(renderer: Renderer) -> None:
    (account,) = accounts_of(render_config(renderer, make_user(ONE, vars={"codecs": ["OPUS", 0, "35", "28"]})))
    assert [(cid, prio) for cid, prio, on in codecs(account) if on == "true"] == [(35, 1), (0, 2), (28, 3)]


@pytest.mark.parametrize("vars, domain", [
    ({"sip_transport": "tls"}, "pbx.example.com"),  # TLS's own port: written as no port, so SRV still works
    ({"sip_transport": "tls", "sip_port": 5061}, "pbx.example.com"),
    ({"sip_transport": "tls", "sip_port": 5062}, "pbx.example.com:5062"),
    ({"sip_transport": "tls", "sip_port": 5060}, "pbx.example.com:5060"),
    ({"sip_transport": "tls", "sip_port": 0}, "pbx.example.com"),  # 0: look it up
])
def test_tls_account(renderer: Renderer, vars: dict[str, Any], domain: str) -> None:
    user = make_user(ONE, vars=vars)
    (account,) = accounts_of(render_config(renderer, user))
    assert text(account, "SIP_transport_type") == "TLS"
    assert text(account, "SIP_domain") == domain
    assert text(account, "SIP_srtp_mode") == "SDES"
    assert text(account, "SIP_use_rport") == "true"


def test_port_on_an_ipv6_domain_is_bracketed(renderer: Renderer) -> None:
    user = make_user(SipAccount("1001", "pw", "2001:db8::1"), vars={"sip_port": 5080})
    (account,) = accounts_of(render_config(renderer, user))
    assert text(account, "SIP_domain") == "[2001:db8::1]:5080"


@pytest.mark.parametrize(
    ("vars", "message"),
    [
        ({"zoiper_SIP_use_blf": "ture"}, "zoiper_SIP_use_blf must be true or false"),
        ({"stun_port": 70000}, "stun_port must be between 1 and 65535"),
        ({"sip_register_expires": "soon"}, "sip_register_expires must be a whole number"),
        ({"srtp": "zrtp"}, "srtp must be one of none, SDES"),
        ({"codecs": "opus,g711x"}, "unknown codec g711x"),
        ({"codecs": ""}, "enables no codec"),
    ],
)
def test_bad_vars_stop_the_rendering(renderer: Renderer, vars: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=message):
        renderer.render(CONFIG_114, context(make_user(ONE, vars=vars)))


@pytest.mark.parametrize(
    ("vars", "message"),
    [
        ({"sip_transport": "sctp"}, "user alice: sip_transport must be udp, tcp or tls, not 'sctp'"),
        ({"sip_port": "5o60"}, r"user alice: sip_port must be a port number \(0-65535\), not '5o60'"),
        ({"sip_port": 70000}, r"user alice: sip_port must be a port number \(0-65535\), not 70000"),
    ],
)
def test_bad_line_vars_are_refused_before_rendering(vars: dict[str, Any], message: str) -> None:
    with pytest.raises(LineError, match=message):
        context(make_user(ONE, vars=vars))


# --------------------------------------------------------------------------
# the 1.14 schema itself

MINIMAL_114 = """\
<options>
  <prov_version>1.14</prov_version>
  <accounts>
    <account>
      <ident>1001@pbx.example.com</ident>
      <name>Alice</name>
      <username>1001</username>
      <password>secret</password>
      <register_on_startup>true</register_on_startup>
      <enable_push_notifications>false</enable_push_notifications>
      <protocol>SIP</protocol>
      <reregistration_mode>default</reregistration_mode>
      <reregistration_time>600</reregistration_time>
      <resubscription_mode>default</resubscription_mode>
      <SIP_domain>pbx.example.com</SIP_domain>
      <SIP_transport_type>UDP</SIP_transport_type>
      <SIP_use_rport>false</SIP_use_rport>
      <SIP_use_rport_media>false</SIP_use_rport_media>
      <SIP_srtp_mode>none</SIP_srtp_mode>
      <SIP_dtmf_style>rfc_2833</SIP_dtmf_style>
      <stun>
        <use_stun>disabled</use_stun>
        <stun_host></stun_host>
        <stun_port>3478</stun_port>
        <stun_refresh_period>30</stun_refresh_period>
      </stun>
      <IAX2_host/>
      <IAX2_context/>
      <IAX2_callerId/>
      <IAX2_callerNumber/>
      <IAX2_dtmf_style>outband</IAX2_dtmf_style>
      <enable_file_transfer>false</enable_file_transfer>
      <enabled_video_fmtp>true</enabled_video_fmtp>
      <msrp>
        <enabled>false</enabled>
        <force_msrp_for_chat>false</force_msrp_for_chat>
        <enable_tls>false</enable_tls>
        <enable_relay>false</enable_relay>
        <relay_uri/>
        <relay_username/>
        <relay_password/>
      </msrp>
      <sms>
        <enabled>false</enabled>
        <enable_sms_center>false</enable_sms_center>
        <sms_center_uri/>
      </sms>
      <codecs>
        <codec><codec_id>0</codec_id><priority>1</priority><enabled>true</enabled></codec>
      </codecs>
      <zrtp>
        <enabled>false</enabled>
        <hash_algorithms>
          <hash_algorithm><name>S256</name><id>0</id><priority>0</priority><selected>true</selected></hash_algorithm>
        </hash_algorithms>
        <cipher_algorithms>
          <cipher_algorithm><name>AES1</name><id>0</id><priority>0</priority><selected>true</selected></cipher_algorithm>
        </cipher_algorithms>
        <auth_tags>
          <auth_tag><name>HS80</name><id>1</id><priority>1</priority><selected>true</selected></auth_tag>
        </auth_tags>
        <key_agreement_methods>
          <key_agreement><name>DH2K</name><id>1</id><priority>0</priority><selected>true</selected></key_agreement>
        </key_agreement_methods>
        <sas_encodings>
          <sas_encoding><name>B256</name><id>1</id><priority>0</priority><selected>true</selected></sas_encoding>
        </sas_encodings>
      </zrtp>
    </account>
  </accounts>
  <diagnostics/>
  <breakpad/>
</options>
"""


def test_schema_accepts_a_minimal_hand_made_document() -> None:
    assert_valid("zoiper-1.14.rng", MINIMAL_114.encode())


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # a boolean that is not true/false
        ("<SIP_use_rport>false</SIP_use_rport>", "<SIP_use_rport>0</SIP_use_rport>"),
        ("<register_on_startup>true</register_on_startup>", "<register_on_startup>True</register_on_startup>"),
        # Zoiper compares without trimming: no whitespace around values
        ("<register_on_startup>true</register_on_startup>", "<register_on_startup> true</register_on_startup>"),
        ("<protocol>SIP</protocol>", "<protocol>SIP\n</protocol>"),
        ("<selected>true</selected></hash_algorithm>", "<selected>yes</selected></hash_algorithm>"),
        # a missing required element
        ("<password>secret</password>", ""),
        ("<SIP_transport_type>UDP</SIP_transport_type>", ""),
        ("<codec><codec_id>0</codec_id><priority>1</priority><enabled>true</enabled></codec>", ""),
        ("<breakpad/>", ""),
        # an unknown element, or a known one out of place
        ("<SIP_domain>", "<SIP_colour>blue</SIP_colour><SIP_domain>"),
        ("</options>", "<extra/></options>"),
        (
            "<username>1001</username>\n      <password>secret</password>",
            "<password>secret</password>\n      <username>1001</username>",
        ),
        # values outside the example's "Possible values"
        ("<protocol>SIP</protocol>", "<protocol>XMPP</protocol>"),
        ("<SIP_transport_type>UDP</SIP_transport_type>", "<SIP_transport_type>udp</SIP_transport_type>"),
        ("<SIP_dtmf_style>rfc_2833</SIP_dtmf_style>", "<SIP_dtmf_style>0</SIP_dtmf_style>"),
        ("<use_stun>disabled</use_stun>", "<use_stun>off</use_stun>"),
        ("<stun_port>3478</stun_port>", "<stun_port>-1</stun_port>"),
        ("<reregistration_time>600</reregistration_time>", "<reregistration_time>ten</reregistration_time>"),
        ("<prov_version>1.14</prov_version>", "<prov_version>1.15</prov_version>"),
        ("<ident>1001@pbx.example.com</ident>", "<ident></ident>"),
        ("<accounts>", "<accounts></accounts><accounts>"),
    ],
)
def test_schema_rejects(old: str, new: str) -> None:
    assert old in MINIMAL_114
    assert not is_valid("zoiper-1.14.rng", MINIMAL_114.replace(old, new, 1).encode())


def test_schema_rejects_an_empty_account_list() -> None:
    start = MINIMAL_114.index("<account>")
    end = MINIMAL_114.index("</account>") + len("</account>")
    assert not is_valid("zoiper-1.14.rng", (MINIMAL_114[:start] + MINIMAL_114[end:]).encode())


# --------------------------------------------------------------------------
# 1.0 document


def test_reduced_document_for_version_10(renderer: Renderer) -> None:
    user = make_user(ONE, SipAccount("1002", "pw", "pbx.example.com", sip_auth_user="a2"), vars={"sip_port": 5080})
    document = renderer.render(CONFIG_10, context(user, version="1.0"))
    root = assert_valid("zoiper-1.0.rng", document)
    assert any("reduced" in c.text for c in root.iter(etree.Comment))
    accounts = accounts_of(root)
    assert [[c.tag for c in a] for a in accounts] == [ACCOUNT_ELEMENTS_10] * 2
    assert [text(a, "SIP_domain") for a in accounts] == ["pbx.example.com:5080"] * 2
    assert [text(a, "SIP_auth_username") for a in accounts] == ["1001", "a2"]
    assert [text(a, "SIP_transport_type") for a in accounts] == ["UDP", "UDP"]
    # the 1.14 schema does not accept it, the 1.0 one does not accept a 1.14 document
    assert not is_valid("zoiper-1.14.rng", document)
    assert not is_valid("zoiper-1.0.rng", renderer.render(CONFIG_114, context(user)))


# --------------------------------------------------------------------------
# versions.toml


def _version(value: str) -> tuple[int, ...]:
    return tuple(int(part) for part in value.split("."))


def test_versions_table(renderer: Renderer) -> None:
    with open(bundled_templates_dir() / "zoiper" / "versions.toml", "rb") as f:
        rows = tomllib.load(f)["document"]
    assert {row["min_version"]: row["template"] for row in rows} == {"1.14": CONFIG_114, "1.0": CONFIG_10}
    user = make_user(ONE)
    for row in rows:
        _version(row["min_version"])  # parses
        assert_valid(row["schema"], renderer.render(row["template"], context(user, version=row["min_version"])))


# --------------------------------------------------------------------------
# error document


def test_error_document_matches_zoiper_example(renderer: Renderer) -> None:
    document = renderer.render(ERROR, {"text": "Provisioning failed. Some error occurred."})
    assert document == b'<?xml version="1.0"?>\n<error code="1">Provisioning failed. Some error occurred.</error>\n'
    assert_valid("zoiper-error.rng", document)


def test_error_document_escapes(renderer: Renderer) -> None:
    document = renderer.render(ERROR, {"text": "<script>alert('x') & \"y\"</script> Zoë"})
    assert b"<script>" not in document
    root = assert_valid("zoiper-error.rng", document)
    assert root.text == "<script>alert('x') & \"y\"</script> Zoë"
    assert root.get("code") == "1"


@pytest.mark.parametrize(
    "document",
    [
        b'<error code="0">x</error>',
        b'<error code="one">x</error>',
        b"<error>x</error>",
        b'<error code="1"><b>x</b></error>',
        b'<failure code="1">x</failure>',
    ],
)
def test_error_schema_rejects(document: bytes) -> None:
    assert not is_valid("zoiper-error.rng", document)


# --------------------------------------------------------------------------
# Provision.xml (Zoiper 3)

URL_A = "http://192.0.2.10/zoiper?user=[user]&pass=[pass]&version=1.0"
URL_B = "https://prov.example.com/zoiper?u=[user]&p=[pass]"


def test_provision_url_auth(renderer: Renderer) -> None:
    document = renderer.render(
        PROVISION, {"base_urls": [URL_A, URL_B], "auth": "url", "user": "", "password": "", "refresh_rate": 0}
    )
    assert b"?user=[user]&amp;pass=[pass]&amp;version=1.0</base_url>" in document
    assert b"?u=[user]&amp;p=[pass]</base_url>" in document
    root = assert_valid("zoiper-provision.rng", document)
    assert [c.tag for c in root] == ["base_urls", "options", "significant_sections", "addressbook", "restrictions"]
    assert [u.text for u in root.findall("base_urls/base_url")] == [URL_A, URL_B]
    assert text(root, "options/use_authentication") == "1"
    assert text(root, "options/user_input_authentication") == "1"
    assert text(root, "options/authentication_type") == "url"
    assert text(root, "options/refresh_rate") == "0"
    assert text(root, "significant_sections") == (
        "general,sip_options,iax_options,rtp_options,stun_options,accounts,codecs,restrictions"
    )
    assert text(root, "addressbook/use_addressbook") == "0"
    assert text(root, "restrictions") == "add,update,delete"


def test_provision_basic_auth_with_preset_user(renderer: Renderer) -> None:
    document = renderer.render(
        PROVISION,
        {
            "base_urls": ["https://prov.example.com/zoiper"],
            "auth": "basic",
            "user": "Zoë&<x>",
            "password": "",
            "refresh_rate": 0,
        },
    )
    root = assert_valid("zoiper-provision.rng", document)
    assert text(root, "options/authentication_type") == "basic"
    assert text(root, "options/user_input_authentication") == "0"
    assert text(root, "options/user") == "Zoë&<x>"


def test_provision_refuses_unknown_auth(renderer: Renderer) -> None:
    with pytest.raises(RenderError, match="auth must be url or basic"):
        renderer.render(
            PROVISION, {"base_urls": [URL_A], "auth": "digest", "user": "", "password": "", "refresh_rate": 0}
        )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("<use_authentication>1</use_authentication>", "<use_authentication>true</use_authentication>"),
        ("<authentication_type>url</authentication_type>", "<authentication_type>digest</authentication_type>"),
        ("<refresh_rate>0</refresh_rate>", ""),
        ("accounts,codecs", "accounts, codecs"),
        ("accounts,codecs", "accounts,phonebook"),
        ("<base_url>", "<base_url>ftp://x/</base_url><base_url>"),
    ],
)
def test_provision_schema_rejects(renderer: Renderer, old: str, new: str) -> None:
    document = renderer.render(
        PROVISION, {"base_urls": [URL_A], "auth": "url", "user": "", "password": "", "refresh_rate": 0}
    ).decode()
    assert old in document
    assert not is_valid("zoiper-provision.rng", document.replace(old, new, 1).encode())
