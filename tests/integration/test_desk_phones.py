"""Desk phones against the running daemon: the boot flow per vendor, with the
User-Agent each vendor sends, MACs spelled three ways, refusals and overrides."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lxml import etree

from conftest import Daemon, curl, free_config, run_cli
from zprovd.mac import format_mac

pytestmark = pytest.mark.integration

BASE_URL = "http://127.0.0.1:8080/provision/"
SIP_PASSWORD = 'p<a>s&s"w\'d-Zoë'
DISPLAY = "Zoë <Desk> & Co"

# vendor: (model id, MAC, User-Agent that model sends, key/value style or "xml")
PHONES = {
    "yealink": ("yealink-t48g", "001565aabb01", "Yealink SIP-T48G 35.83.0.35 00:15:65:aa:bb:01", "equals"),
    "yealink-boot": ("yealink-t54w", "805ec0aabb02", "Yealink SIP-T54W 96.86.0.23 80:5e:c0:aa:bb:02", "equals"),
    "cisco": ("cisco-spa504g", "001122aabb03", "Cisco/SPA504G-7.6.2 (001122AABB03)(CCQ1)", "xml"),
    "cisco-mpp": ("cisco-cp-7841-3pcc", "00562baabb04", "Cisco-CP-7841-3PCC/11.3.7 (00562baabb04)", "xml"),
    "polycom": ("polycom-vvx400", "0004f2aabb05", "FileTransport PolycomVVX-VVX_400-UA/5.9.0.9373 Type/Application", "xml"),
    "snom": ("snom-d785", "000413aabb06", "Mozilla/4.0 (compatible; snomD785-SIP 10.1.33.33 1.1.3-s 000413AABB06 SXM:0 UXM:0 UXMC:0)", "xml"),
    "grandstream": ("grandstream-gxp2170", "000b82aabb07", "Grandstream Model HW GXP2170 V1.0A SW 1.0.11.3 DevId 000b82aabb07", "xml"),
    "fanvil": ("fanvil-x4", "0c383eaabb08", "Fanvil X4 2.10.2.6887 0c383eaabb08", "fanvil"),
    "gigaset": ("gigaset-n720", "7c2f80aabb09", "Gigaset N720 DM PRO/70.089.00.000.000;7C2F80AABB09", "xml"),
    "panasonic": ("panasonic-kx-ut133", "0080f0aabb0a", "Panasonic_KX-UT133/01.133 (0080f0aabb0a)", "quoted"),  # users u3, u2
    "aastra": ("aastra-6731i", "00085daabb0b", "Aastra6731i MAC:00-08-5D-AA-BB-0B V:3.2.0.70-SIP", "colon"),
}


def parse(body: bytes, style: str) -> list[str]:
    """Every value the file carries (XML text and attributes, or key/value values)."""
    text = body.decode("utf-8")
    if style == "fanvil":  # "<<VOIP CONFIG FILE>>" with <SECTION> headers and "key :value" lines, or XML
        style = "xml" if text.lstrip().startswith("<?xml") else "fanvil"
    if style == "xml":
        root = etree.fromstring(body)
        values = []
        for element in root.iter():
            if element.text and element.text.strip():
                values.append(element.text.strip())
            values.extend(element.attrib.values())
        return values
    pattern = {
        "equals": r"^\s*([^#=\s][^=]*?)\s*=\s*(.*?)\s*$",
        "colon": r"^\s*([^#:][^:]*?)\s*:\s*(.*?)\s*$",
        "quoted": r'^\s*([A-Z0-9_]+)="(.*)"\s*$',
        "fanvil": r"^\s*([^:]*?)\s*:(.*?)\s*$",
        "include": r'^\s*(include:config)\s*"(.*)"\s*$',
    }[style]
    values = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";", "!")):
            continue
        if style == "fanvil" and line.lstrip().startswith(("<", "--")):
            continue  # section headers and separators
        m = re.match(pattern, line)
        assert m, f"unparseable line {line!r}"
        values.append(m.group(2))
    return values


def get(d: Daemon, path: str, agent: str = "") -> tuple[int, bytes]:
    r = curl("--path-as-is", "-A", agent, "-w", "\n%{http_code}", d.url("http", path))
    body, _, status = r.stdout.rpartition(b"\n")
    return int(status), body


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("desk")
    config = free_config(tmp, extra='[templates]\ndirs = ["ops-templates"]\n')
    (tmp / "ops-templates").mkdir()
    r = run_cli(config, "user", "add", "u1", "--password", "pw1", "--display-name", DISPLAY, "--sip-user", "5001",
                "--sip-auth-user", "auth5001", "--sip-password", SIP_PASSWORD, "--sip-domain", "sip.example.org")
    assert r.returncode == 0, r.stderr
    r = run_cli(config, "user", "add", "u2", "--password", "pw2", "--sip-user", "5002", "--sip-password", "second-line-pw",
                "--sip-domain", "sip.example.org")
    assert r.returncode == 0, r.stderr
    # KEY="value" (Panasonic) cannot carry a double quote: u3 is u1 without one.
    r = run_cli(config, "user", "add", "u3", "--password", "pw3", "--display-name", DISPLAY, "--sip-user", "5001",
                "--sip-auth-user", "auth5001", "--sip-password", SIP_PASSWORD.replace('"', ""), "--sip-domain", "sip.example.org")
    assert r.returncode == 0, r.stderr
    for model, mac, _, style in PHONES.values():
        first = "u3" if style == "quoted" else "u1"
        r = run_cli(config, "device", "add", format_mac(mac, "DASH"), "--model", model, "--user", first, "--user", "u2",
                    "--var", "language=es")
        assert r.returncode == 0, r.stderr
    d = Daemon(config).start()
    yield d, config
    d.stop()


def catalogue_model(config: Path, model_id: str):
    from zprovd.catalogue import bundled_templates_dir, load_catalogue

    return load_catalogue([bundled_templates_dir()]).get(model_id)


@pytest.mark.parametrize("vendor", list(PHONES))
def test_boot_flow_generic_then_per_mac(desk, vendor):
    d, config = desk
    model_id, mac, agent, style = PHONES[vendor]
    model = catalogue_model(config, model_id)
    for generic in model.generic:
        status, body = get(d, "/provision/" + generic.name, agent)
        assert status == 200, (generic.name, body)
        parse(body, "include" if generic.name.endswith(".boot") else style)
        # the generic file points the phone back at this server: as a URL, or
        # (Aastra) as host, path and port
        if BASE_URL.encode() not in body:
            assert all(part in body for part in (b"127.0.0.1", b"provision", b"8080")), body[:400]
    for per_mac in model.per_mac:
        if per_mac.pattern.endswith(".boot"):  # Yealink V81+: <mac>.boot includes <mac>.cfg
            status, body = get(d, "/provision/" + per_mac.pattern.replace("{mac}", mac), agent)
            assert status == 200 and f"{BASE_URL}{mac}.cfg".encode() in body, body
            parse(body, "include")
    pattern = next(p.pattern for p in model.per_mac if not p.pattern.endswith(".boot"))
    bodies = set()
    for spelling in (format_mac(mac, "lower"), format_mac(mac, "COLON"), format_mac(mac, "dash")):
        status, body = get(d, "/provision/" + pattern.replace("{mac}", spelling), agent)
        assert status == 200, (spelling, body)
        bodies.add(body)
    assert len(bodies) == 1
    body = bodies.pop()
    values = parse(body, style)
    joined = "\n".join(values)
    password = SIP_PASSWORD.replace('"', "") if style == "quoted" else SIP_PASSWORD
    for expected in ("5001", "auth5001", password, "sip.example.org", "5002", "second-line-pw"):
        assert expected in joined, f"{expected!r} missing from {vendor} per-MAC file"
    assert any("Zoë" in v for v in values)


@pytest.mark.parametrize("vendor", ["yealink", "cisco", "polycom", "aastra"])
def test_render_prints_the_bytes_the_daemon_serves(desk, vendor):
    d, config = desk
    model_id, mac, agent, _ = PHONES[vendor]
    name = catalogue_model(config, model_id).per_mac[0].pattern.replace("{mac}", mac)
    status, served = get(d, "/" + name, agent)
    assert status == 200
    rendered = subprocess.run([sys.executable, "-m", "zprovd", "-c", str(config), "render", "--mac", mac, "--file", name],
                              capture_output=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == served


def test_successful_fetch_is_recorded_on_the_device(desk):
    d, config = desk
    _, mac, agent, _ = PHONES["yealink"]
    assert get(d, f"/provision/{mac}.cfg", agent)[0] == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = run_cli(config, "device", "show", mac).stdout
        if f"from 127.0.0.1: {mac}.cfg" in out:
            break
        time.sleep(0.2)
    assert f"from 127.0.0.1: {mac}.cfg" in out


def test_unknown_mac_is_404_and_listed_as_seen(desk):
    d, config = desk
    agent = "Yealink SIP-T46G 28.83.0.35 00:15:65:99:88:77"
    assert get(d, "/provision/001565998877.cfg", agent)[0] == 404
    d.wait_for_log("unknown phone 001565998877")
    out = run_cli(config, "device", "seen").stdout
    line = next(l for l in out.splitlines() if l.startswith("00:15:65:99:88:77"))
    assert "yealink-t46g" in line and "127.0.0.1" in line and "001565998877.cfg" in line
    # `device add` makes it work on its next request, no restart
    assert run_cli(config, "device", "add", "001565998877", "--model", "yealink-t46g", "--user", "u2").returncode == 0
    assert get(d, "/provision/001565998877.cfg", agent)[0] == 200
    assert "00:15:65:99:88:77" not in run_cli(config, "device", "seen").stdout


def _seen_macs(config) -> list[str]:
    return [line.split()[0] for line in run_cli(config, "device", "seen").stdout.splitlines()[1:]]


def _wait_seen(config, macs: set[str]) -> list[str]:
    deadline = time.monotonic() + 10  # recorded in the background, after the answer
    while time.monotonic() < deadline:
        seen = _seen_macs(config)
        if macs <= set(seen):
            break
        time.sleep(0.2)
    return seen


def test_device_forget_removes_phones_from_the_seen_list(desk):
    d, config = desk
    for mac in ("001565112201", "001565112202", "001565112203"):
        assert get(d, f"/provision/{mac}.cfg", "Yealink SIP-T46G 28.83.0.35")[0] == 404
    three = {"00:15:65:11:22:01", "00:15:65:11:22:02", "00:15:65:11:22:03"}
    assert three <= set(_wait_seen(config, three))
    r = run_cli(config, "device", "forget", "00-15-65-11-22-01", "001565112202")
    assert r.returncode == 0 and r.stdout == "forgot 2 phone(s)\n"
    seen = _seen_macs(config)
    assert "00:15:65:11:22:03" in seen and "00:15:65:11:22:01" not in seen and "00:15:65:11:22:02" not in seen
    # One MAC not in the list: refused, nothing forgotten
    r = run_cli(config, "device", "forget", "001565112203", "001565112201")
    assert r.returncode == 1 and "not in the seen list: 00:15:65:11:22:01" in r.stderr
    assert "00:15:65:11:22:03" in _seen_macs(config)
    # A forgotten phone that asks again is back
    assert get(d, "/provision/001565112201.cfg", "Yealink SIP-T46G 28.83.0.35")[0] == 404
    assert "00:15:65:11:22:01" in _wait_seen(config, {"00:15:65:11:22:01"})
    r = run_cli(config, "device", "forget", "--all")
    assert r.returncode == 0 and r.stdout.startswith("forgot ") and _seen_macs(config) == []


def test_model_mismatch_is_404(desk):
    d, _ = desk
    _, mac, _, _ = PHONES["yealink"]  # a Yealink asked under Grandstream's name
    assert get(d, f"/cfg{mac}.xml")[0] == 404
    d.wait_for_log("whose files are not named like")


def test_known_mac_without_user_is_404_with_a_log_line(desk):
    d, config = desk
    assert run_cli(config, "device", "add", "00:15:65:00:00:99", "--model", "yealink-t48g").returncode == 0
    assert get(d, "/001565000099.cfg")[0] == 404
    d.wait_for_log("device 001565000099 (yealink-t48g) has no user")


@pytest.mark.parametrize("path,statuses", [
    ("/../../etc/passwd", {400}),
    ("/provision/%2e%2e/%2e%2e/etc/passwd", {400}),
    ("/provision/..%2f..%2fetc%2fpasswd", {400}),
    ("//etc/passwd", {404}),
    ("/etc/passwd", {404}),
    ("/provision/001565aabb01.cfg%00.txt", {400}),
    ("/provision/" + "a" * 2000 + ".cfg", {400}),
    ("/provision/..\\..\\etc\\passwd", {400}),
])
def test_hostile_paths_get_400_or_404_and_nothing_else(desk, path, statuses):
    d, _ = desk
    status, body = get(d, path)
    assert status in statuses
    assert b"root:" not in body and b"account." not in body


def test_operator_override_then_restore(desk):
    d, config = desk
    _, mac, agent, _ = PHONES["yealink"]
    ops = config.parent / "ops-templates" / "yealink"
    ops.mkdir(parents=True, exist_ok=True)
    bundled = (Path(__file__).resolve().parents[2] / "templates" / "yealink" / "mac.cfg.j2").read_text()
    (ops / "mac.cfg.j2").write_text(bundled + "# operator override for {{ mac }}\n")
    status, body = get(d, f"/{mac}.cfg", agent)
    assert status == 200 and f"# operator override for {mac}".encode() in body
    listing = run_cli(config, "templates", "list").stdout
    assert re.search(r"yealink-t48g\s+yealink/mac.cfg.j2\s+.*ops-templates/yealink/mac.cfg.j2", listing)
    diff = run_cli(config, "templates", "diff", "yealink-t48g").stdout
    assert "+# operator override for {{ mac }}" in diff
    r = run_cli(config, "templates", "restore", "yealink-t48g")
    assert r.returncode == 0 and "ops-templates/yealink/mac.cfg.j2" in r.stdout
    assert not (ops / "mac.cfg.j2").exists()
    status, body = get(d, f"/{mac}.cfg", agent)
    assert status == 200 and b"operator override" not in body


def test_broken_operator_template_is_500_and_logged(desk):
    d, config = desk
    _, mac, agent, _ = PHONES["aastra"]
    ops = config.parent / "ops-templates" / "aastra"
    ops.mkdir(parents=True, exist_ok=True)
    (ops / "mac.cfg.j2").write_text("sip line1 user name: {{ no_such_variable }}\n")
    try:
        assert get(d, f"/{mac.upper()}.cfg", agent)[0] == 500
        d.wait_for_log(f"cannot render aastra/mac.cfg.j2 for {mac.lower()}: undefined variable")
        # Over TFTP: ERROR 0 with the reason, and no traceback in the log.
        r = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(d.ports["tftp"]), "-c", "get", f"{mac}.cfg",
                            str(config.parent / "broken.cfg")], capture_output=True, text=True, timeout=30)
        assert "template error" in r.stdout + r.stderr
        assert "Traceback" not in d.log and "critical" not in d.log
    finally:
        (ops / "mac.cfg.j2").unlink()
    assert get(d, f"/{mac.upper()}.cfg", agent)[0] == 200


def test_models_lists_the_catalogue(desk):
    _, config = desk
    out = run_cli(config, "models").stdout
    for model_id, *_ in PHONES.values():
        assert re.search(rf"^{re.escape(model_id)}\s", out, re.M), model_id
