"""The peer programs of the bench, installed when missing, and their versions.

* Clients and tools without a service go in with ``apt-get install``:
  wrk, atftp, perfdhcp (Debian 12 ships it in ``kea-admin``), dnsmasq
  (``dnsmasq-base``: the binary without the system service), openssl,
  iproute2.
* Servers that a Debian package would start as a system service (nginx on
  port 80, tftpd-hpa and atftpd on port 69) are unpacked instead with
  ``apt-get download`` + ``dpkg -x`` into ``bench/.tools/<package>/``, so
  that nothing but the bench's own instances ever runs.  This is also how
  tftpd-hpa and atftpd coexist: the packages conflict (tftpd-hpa
  ``Conflicts: atftpd``; atftpd ``Conflicts: tftpd``).  Their missing
  library dependencies (``lib*`` in Depends) are installed with apt-get.
* Python packages (matplotlib, py-spy) from ``bench/requirements.txt`` into
  the project's venv.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BENCH, PYTHON, ROOT, TOOLS, log, run

APT_COMMANDS = {  # command -> Debian package
    "wrk": "wrk",
    "atftp": "atftp",
    "perfdhcp": "kea-admin",
    "dnsmasq": "dnsmasq-base",
    "openssl": "openssl",
    "ip": "iproute2",
}
UNPACKED = {  # package -> binary inside the unpacked tree
    "nginx": "usr/sbin/nginx",
    "tftpd-hpa": "usr/sbin/in.tftpd",
    "atftpd": "usr/sbin/atftpd",
}
_apt_updated = False


def _which(command: str) -> str | None:
    return shutil.which(command) or next(
        (str(p) for p in (Path("/usr/sbin") / command, Path("/sbin") / command) if p.exists()), None)


def _apt(*args: str) -> None:
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    argv = [*prefix, "apt-get", *args]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0 and not _apt_updated:
        _apt_updated = True
        subprocess.run([*prefix, "apt-get", "update", "-qq"], capture_output=True, env=env, timeout=900)
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"apt-get {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def _installed(package: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True, text=True)
    return out.returncode == 0 and "install ok installed" in out.stdout


def tool(package: str) -> Path:
    return TOOLS / package / UNPACKED[package]


def ensure_debian() -> None:
    missing = sorted({pkg for cmd, pkg in APT_COMMANDS.items() if _which(cmd) is None})
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        _apt("install", "-y", "-qq", "--no-install-recommends", *missing)
    TOOLS.mkdir(parents=True, exist_ok=True)
    for package, binary in UNPACKED.items():
        if (TOOLS / package / binary).exists():
            continue
        log(f"unpacking {package} into {TOOLS / package} (apt-get download + dpkg -x)")
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o777)  # apt's _apt user writes the download here
            subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, timeout=600)
            debs = list(Path(tmp).glob(f"{package}_*.deb"))
            if not debs:
                _apt("update", "-qq")
                run(["apt-get", "download", package], cwd=tmp, timeout=600)
                debs = list(Path(tmp).glob(f"{package}_*.deb"))
            deb = debs[0]
            depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
            libs = [d.split()[0].split(":")[0] for alt in depends.split(",") for d in [alt.split("|")[0].strip()]
                    if d.startswith("lib")]
            need = [lib for lib in libs if not _installed(lib)]
            if need:
                log(f"installing libraries for {package}: {' '.join(need)}")
                _apt("install", "-y", "-qq", "--no-install-recommends", *need)
            target = TOOLS / package
            shutil.rmtree(target, ignore_errors=True)
            run(["dpkg", "-x", str(deb), str(target)])
            (target / "VERSION").write_text(run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip() + "\n")


def ensure_python() -> None:
    requirements = BENCH / "requirements.txt"
    wanted = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    wanted = [w for w in wanted if w]
    probe = "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)"
    modules = [re.split(r"[<>=!~ ;\[]", w)[0].replace("-", "_") for w in wanted]
    have_spy = Path(PYTHON).with_name("py-spy").exists()
    modules = [m for m in modules if m != "py_spy"]
    if subprocess.run([PYTHON, "-c", probe, *modules]).returncode == 0 and have_spy:
        return
    log(f"installing {requirements.name} into the venv")
    run([PYTHON, "-m", "pip", "install", "--quiet", "-r", str(requirements)], timeout=900)


def ensure_all() -> None:
    if sys.platform != "linux":
        raise SystemExit("the bench needs Linux")
    if os.geteuid() != 0:
        raise SystemExit("the bench needs root (network namespaces, apt-get, py-spy)")
    ensure_python()
    ensure_debian()


def _first_line(argv: list[str], pattern: str = r"(\d+[\w.+~:-]*)") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = out.stdout + out.stderr
    m = re.search(pattern, text)
    return m.group(1) if m else text.strip().splitlines()[0] if text.strip() else "?"


def _dpkg_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or "?"


NGINX_RE = r"nginx/([\d.]+)"
HPA_RE = r"tftp-hpa ([\d.]+)"
DNSMASQ_RE = r"version ([\d.]+)"
NUMBER_RE = r"([\d.]+)"


def versions() -> dict[str, str]:
    def unpacked(package: str) -> str:
        f = TOOLS / package / "VERSION"
        return f.read_text().strip() if f.exists() else "?"

    zprovd = subprocess.run([PYTHON, "-m", "zprovd", "--version"], capture_output=True, text=True, cwd=ROOT)
    twisted = subprocess.run([PYTHON, "-c", "import twisted; print(twisted.__version__)"],
                             capture_output=True, text=True)
    nginx_v = _first_line([str(tool("nginx")), "-v"], NGINX_RE)
    hpa_v = _first_line([str(tool("tftpd-hpa")), "-V"], HPA_RE)
    dnsmasq_v = _first_line(["dnsmasq", "--version"], DNSMASQ_RE)
    perf_v = _first_line(["perfdhcp", "-v"], NUMBER_RE)
    return {
        "zprovd": (zprovd.stdout + zprovd.stderr).strip().split()[-1] if zprovd.returncode == 0 else "?",
        "Python": subprocess.run([PYTHON, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True).stdout.strip(),
        "Twisted": twisted.stdout.strip(),
        "nginx": f"{nginx_v} (Debian {unpacked('nginx')})",
        "tftpd-hpa": f"{hpa_v} (Debian {unpacked('tftpd-hpa')})",
        "atftpd": f"Debian {unpacked('atftpd')}",
        "atftp (client)": f"Debian {_dpkg_version('atftp')}",
        "dnsmasq": f"{dnsmasq_v} (Debian {_dpkg_version('dnsmasq-base')})",
        "perfdhcp": f"{perf_v} (Debian kea-admin {_dpkg_version('kea-admin')})",
        "wrk": f"Debian {_dpkg_version('wrk')}",
        "kernel": platform.release(),
    }


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    os_name = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("systemd-detect-virt") else ""
    return {
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "CPU": cpu,
        "OS": os_name,
        "virtualisation": virt or "?",
        "hostname": platform.node(),
    }
