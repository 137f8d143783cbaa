#!/usr/bin/env python3
"""Write the seed corpora of fuzz/corpus/<target>/ (deterministic; run from anywhere).

Seeds are valid inputs of the kinds phones and operators really send, built
with zprovd's own encoders where it has them, so that the fuzzers start deep
inside each parser.  ``python fuzz/make_corpus.py`` rewrites them.
"""

from __future__ import annotations

import shutil
import sys
from ipaddress import IPv4Address
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import targets as T  # noqa: E402


def tftp() -> dict[str, bytes]:
    from zprovd.tftp.packets import Ack, Data, Error, OptionAck, ReadRequest, WriteRequest

    seeds = {
        "rrq-mac": ReadRequest("001565123456.cfg").encode(),
        "rrq-options": ReadRequest("y000000000035.cfg", "octet",
                                   {"blksize": "1468", "tsize": "0", "timeout": "5", "windowsize": "8"}).encode(),
        "rrq-netascii-path": ReadRequest("Cisco/CP-7841-3PCC/001565123456.cfg", "NetASCII").encode(),
        "rrq-backslash": ReadRequest("firmware\\T48G-35.83.0.35.rom", "octet", {"multicast": ""}).encode(),
        "wrq": WriteRequest("001565123456.log", "octet", {"tsize": "1234"}).encode(),
        "data": Data(1, b"x" * 64).encode(),
        "ack": Ack(7).encode(),
        "error": Error(1, "File not found").encode(),
        "oack": OptionAck({"blksize": "1468", "tsize": "4096"}).encode(),
    }
    seeds["rrq-padded"] = seeds["rrq-mac"] + b"\x00\x00\x00"
    return seeds


def dhcp() -> dict[str, bytes]:
    from zprovd.dhcp.packets import (DECLINE, DISCOVER, INFORM, RELEASE, REQUEST, DHCPMessage, encode)

    ip = lambda text: IPv4Address(text).packed  # noqa: E731
    common = {55: bytes([1, 3, 6, 15, 42, 43, 66, 67, 150, 160]), 60: b"yealink", 57: b"\x05\xdc",
              61: b"\x01\x00\x15\x65\x12\x34\x56", 12: b"SIP-T46S"}
    msgs = {
        "discover": DHCPMessage(1, 0x1234, "001565123456", DISCOVER, flags=0x8000, options=dict(common)),
        "request-selecting": DHCPMessage(1, 0x1234, "001565123456", REQUEST,
                                         options={**common, 50: ip("10.0.0.100"), 54: ip("10.0.0.1")}),
        "request-renewing": DHCPMessage(1, 0x99, "001565123456", REQUEST, ciaddr=IPv4Address("10.0.0.100"),
                                        options={55: bytes([1, 3, 66])}),
        "inform": DHCPMessage(1, 0x42, "0004f2000002", INFORM, ciaddr=IPv4Address("10.0.0.50"),
                              options={55: bytes([66, 150, 160, 43]), 60: b"Polycom-VVX410"}),
        "inform-relayed": DHCPMessage(1, 0x43, "020000000003", INFORM, ciaddr=IPv4Address("10.1.0.50"),
                                      giaddr=IPv4Address("10.0.0.254"), hops=1,
                                      options={82: b"\x01\x04eth0\x02\x06\x00\x11\x22\x33\x44\x55"}),
        "release": DHCPMessage(1, 0x7, "001565123456", RELEASE, ciaddr=IPv4Address("10.0.0.100"),
                               options={54: ip("10.0.0.1")}),
        "decline": DHCPMessage(1, 0x8, "001565123456", DECLINE, options={50: ip("10.0.0.100"), 54: ip("10.0.0.1")}),
        "bootp": DHCPMessage(1, 0x9, "001565123456", None),
    }
    seeds = {name: encode(msg) for name, msg in msgs.items()}
    # Option overload (52): more options in the file and sname fields.
    overloaded = bytearray(encode(DHCPMessage(1, 0x10, "001565123456", DISCOVER, options={52: b"\x03"})))
    overloaded[108:108 + 8] = bytes([66, 4]) + b"tftp" + bytes([255, 0])  # file
    overloaded[44:44 + 7] = bytes([60, 3]) + b"abc" + bytes([255, 0])  # sname
    seeds["discover-overload"] = bytes(overloaded)
    return seeds


def router() -> dict[str, bytes]:
    from zprovd import httpauth

    http, https, tftp_ = b"\x00", b"\x01", b"\x02"
    basic = httpauth.basic_header("alice", "secret").encode()
    return {
        "yealink-generic": http + b"/y000000000035.cfg\nYealink SIP-T48G 35.83.0.35 00:15:65:12:34:56\n",
        "yealink-mac": http + b"/provision/001565123456.cfg\nYealink SIP-T46S 66.86.0.15 00:15:65:12:34:56\n",
        "cisco-3pcc": https + b"/Cisco/CP-7841-3PCC/00%3A15%3A65%3AAA%3ABB%3ACC.cfg\nCisco-CP-7841-3PCC/11.3\n",
        "polycom": http + b"/prov/0004F2ABCDEF-phone.cfg\nFileTransport PolycomVVX-VVX_410-UA/6.4.3\n",
        "grandstream": http + b"/cfg00:0b:82:12:34:56.xml\nGrandstream Model HW GXP2170 SW 1.0.11\n",
        "snom": http + b"/snomD785-000413AABBCC.htm\nMozilla/4.0 (compatible; snomD785-SIP 10.1.33.33)\n",
        "zoiper-query": https + b"/zoiper?user=alice&password=hunter2secret&version=1.14\nZoiper 5\n",
        "zoiper-semicolon": http + b"/zoiper?u=alice;p=hunter2secret\nZoiper 5\n",
        "zoiper-basic": https + b"/zoiper?version=2.10\nZoiper 5\n" + basic,
        "firmware": http + b"/firmware/T48G-35.83.0.35.rom\nYealink SIP-T48G\n",
        "firmware-nested": http + b"/yealink/T46S.rom\n\n",
        "traversal": http + b"/%2e%2e/%2e%2e/etc/passwd\ncurl/8.0\n",
        "tftp-mac": tftp_ + b"001565123456.cfg\n\n",
        "tftp-backslash": tftp_ + b"Cisco\\CP-7841-3PCC\\001565123456.cfg\n\n",
        "tftp-firmware": tftp_ + b"yealink/T46S.rom\n\n",
        "long-name": http + b"/" + b"a" * 200 + b".rom\n\n",
    }


def http() -> dict[str, bytes]:
    yealink = (b"GET /001565123456.cfg HTTP/1.1\r\nHost: prov\r\n"
               b"User-Agent: Yealink SIP-T48G 35.83.0.35 00:15:65:12:34:56\r\nConnection: Keep-Alive\r\n\r\n")
    return {
        "yealink": yealink,
        "pipelined-split": yealink[:30] + b"\xff" + yealink[30:] + b"\xffHEAD /y HTTP/1.0\n\n",
        "zoiper": b"GET /zoiper?user=alice;password=secret&version=1.14 HTTP/1.1\r\nHost: p\r\n\r\n",
        "body": b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\xffGET /z HTTP/1.1\r\n\r\n",
        "absolute": b"GET http://prov:80/a/b.cfg?x=1 HTTP/1.1\r\n\r\n",
        "chunked": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "range": b"GET /fw.rom HTTP/1.1\r\nRange: bytes=10-\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
        "version": b"GET / HTTP/2.0\r\n\r\n",
    }


def httpauth() -> dict[str, bytes]:
    from zprovd import httpauth as h

    nonce = h.NonceSource(T.AUTH_KEY).make(T.AUTH_NOW)
    stale = h.NonceSource(T.AUTH_KEY).make(T.AUTH_NOW - 3600)
    uri = "/001565123456.cfg"

    def digest(algorithm: str, qop: bool, nonce: str = nonce) -> bytes:
        ha1 = h.ha1(algorithm, "alice", "secret")
        ha2 = h._h(algorithm, f"GET:{uri}")
        if qop:
            response = h._h(algorithm, f"{ha1}:{nonce}:00000001:0a4f113b:auth:{ha2}")
            extra = ', qop=auth, nc=00000001, cnonce="0a4f113b"'
        else:
            response = h._h(algorithm, f"{ha1}:{nonce}:{ha2}")
            extra = ""
        return (f'Digest username="alice", realm="{h.REALM}", nonce="{nonce}", uri="{uri}", '
                f'algorithm={algorithm}, response="{response}"{extra}').encode()

    return {
        "digest-sha256-qop": digest("SHA-256", True),
        "digest-md5": digest("MD5", False),
        "digest-stale": digest("MD5", True, stale),
        "digest-escaped": b'Digest username="al\\"ice", realm="zprovd", nonce="1.2", uri="/x", response="00"',
        "basic": h.basic_header("alice", "secret").encode(),
        "basic-mac": h.basic_header("001565123456", "p\u00e4ss:word").encode(),
        "bearer": b"Bearer abc.def",
    }


def csv() -> dict[str, bytes]:
    example = (
        "login,password,display_name,sip_user,sip_password,sip_domain,mac,model,department\n"
        "alice,s3cret,Alice Liddell,201,,pbx.example.com,00:15:65:aa:bb:cc,yealink-t54w,sales\n"
        "alice,,,202,,pbx.example.com,00:15:65:aa:bb:cc,yealink-t54w,\n"
        "bob,hunter2,Bob,,,,,,support\n"
    )
    return {
        "example": example.encode(),
        "semicolon-bom": ("\ufeff" + example.replace(",", ";")).encode(),
        "quoted": b'login,password,mac,model,note\r\n"carol","pa,ss","0015.65aa.bbcc",snom-d785,"a ""b"""\r\n',
        "tab": b"login\tpassword\tsip_auth_user\ndave\tpw\tauth1\n",
    }


def config() -> dict[str, bytes]:
    dhcp = b"""
[dhcp]
enabled = true
interface = "eth1"
mode = "server"
answer = "all"
pool = ["10.1.0.100-10.1.0.199"]
subnet_mask = "255.255.255.0"
router = "10.1.0.1"
dns = ["10.1.0.1"]
lease_time = 3600
rate_limit = 10

[dhcp.options]
tftp-server-name = "10.1.0.2"
"150" = ["10.1.0.2"]
domain-search = ["example.com"]
vendor-encapsulated-options = { "1" = "hex:0a000001", "2" = ["10.0.0.1"] }
"224" = "hex:01:02"

[[dhcp.match]]
vendor_class = "Yealink"
options = { boot-file-name = "y000000000000.boot" }

[[dhcp.match]]
oui = "00:04:f2"
options = { provisioning-url = "http://prov/" }
"""
    full = b"""
state_dir = "state"
[http]
listen = ["127.0.0.1:8080", "[::1]:8080"]
[https]
listen = ["0.0.0.0:443"]
certificate = "tls/cert.pem"
private_key = "tls/key.pem"
[tftp]
listen = ["0.0.0.0:69"]
firmware_dir = "firmware"
max_blksize = 1468
upload_dir = ""
[backend]
type = "csv"
path = "users.csv"
[provisioning]
server = "prov.example.com"
language = "de"
vars = { ntp = "pool.ntp.org", vlan = 12 }
[templates]
dirs = ["templates"]
[zoiper]
paths = ["/zoiper", "/prov/zoiper.php"]
password_params = ["password", "p"]
error_status = 403
[log]
format = "json"
[server]
user = "zprovd"
shutdown_timeout = 5
[metrics]
listen = []
"""
    return {
        "dev": (ROOT / "etc" / "dev.toml").read_bytes(),
        "full": full,
        "dhcp": b'[provisioning]\nserver = "10.1.0.2"\n' + dhcp,
        "home": b'state_dir = "~/zprovd"\n[provisioning]\nserver = "p"\n',
    }


def catalogue() -> dict[str, bytes]:
    return {
        "plain": b"{mac}.cfg\n001565aabbcc.cfg",
        "cisco": b"Cisco/CP-7841-3PCC/{mac}.cfg\nCisco/CP-7841-3PCC/00:15:65:AA:BB:CC.cfg",
        "snom": b"snomD785-{mac}.htm\nsnomD785-000413AABBCC.htm",
        "grandstream": b"cfg{mac}.xml\ncfg000b.8212.3456.xml",
        "polycom": b"{mac}-phone.cfg\n0004F2ABCDEF-phone.cfg",
        "dashes": b"Config{mac}.cfg\nConfig00-80-f0-12-34-56.cfg",
    }


BUILDERS = {"tftp": tftp, "dhcp": dhcp, "router": router, "http": http, "httpauth": httpauth, "csv": csv,
            "config": config, "catalogue": catalogue}


def main() -> None:
    for name, build in BUILDERS.items():
        folder = HERE / "corpus" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for seed, data in build().items():
            (folder / seed).write_bytes(data)
        print(f"{folder.relative_to(ROOT)}: {len(list(folder.iterdir()))} seeds")


if __name__ == "__main__":
    main()
