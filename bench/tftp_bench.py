"""TFTP: zprovd against tftpd-hpa, atftpd and dnsmasq, then many concurrent transfers.

``bare_tftp.py`` (a server with no session logic) runs the lockstep cases
too, twice: on zprovd's reactor (``bare-twisted``: the ceiling of any TFTP
server on that reactor) and as a plain epoll loop (``bare-epoll``: the
ceiling of Python itself).

dnsmasq's TFTP server always listens on port 69, so every server runs in one
network namespace of the bench (loopback only, nothing else in it), each on
its own port, and every client runs there too: all see the same loopback
path and the same ``ip netns exec`` start-up cost.  The single transfers are
timed around the ``atftp`` process (median of several runs; a 1-byte file
measures the fixed cost of starting atftp and the request round trip).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import data
from common import (BENCH, PYTHON, TMP, Proc, Zprovd, log, make_single_ns, ns_exec, run)
from profiling import Profile
from tools import tool

MiB = 1 << 20
PORTS = {"tftpd-hpa": 6901, "atftpd": 6902, "bare-twisted": 6903, "bare-epoll": 6904, "dnsmasq": 69}
SERVERS = ("zprovd", "tftpd-hpa", "atftpd", "dnsmasq", "bare-twisted", "bare-epoll")


def start_servers(ns: str, root: Path, work: Path) -> tuple[dict[str, int], dict[str, object]]:
    procs: dict[str, object] = {}
    procs["tftpd-hpa"] = Proc("tftpd-hpa", ns_exec(ns, [str(tool("tftpd-hpa")), "-4", "-L", "-a",
                                                         f":{PORTS['tftpd-hpa']}", "-s", str(root)]),
                              log_path=work / "tftpd-hpa.log")
    procs["atftpd"] = Proc("atftpd", ns_exec(ns, [str(tool("atftpd")), "--daemon", "--no-fork", "--port",
                                                   str(PORTS["atftpd"]), "--bind-address", "127.0.0.1",
                                                   "--no-multicast", "--maxthread", "2000",
                                                   "--logfile", str(work / "atftpd-transfers.log"), str(root)]),
                           log_path=work / "atftpd.log")
    procs["bare-twisted"] = Proc("bare-twisted", ns_exec(ns, [PYTHON, str(BENCH / "bare_tftp.py"), str(root),
                                                             str(PORTS["bare-twisted"])]),
                                 log_path=work / "bare-tftp.log")
    procs["bare-epoll"] = Proc("bare-epoll", ns_exec(ns, [PYTHON, str(BENCH / "bare_tftp.py"), str(root),
                                                         str(PORTS["bare-epoll"]), "--epoll"]),
                               log_path=work / "bare-epoll.log")
    procs["dnsmasq"] = Proc("dnsmasq", ns_exec(ns, ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                                                     "--port=0", "--enable-tftp", f"--tftp-root={root}",
                                                     "--listen-address=127.0.0.1", "--bind-interfaces",
                                                     "--tftp-max=2000", "--quiet-tftp", "--user=nobody",
                                                     "--group=nogroup", f"--pid-file={work / 'dnsmasq.pid'}",
                                                     f"--log-facility={work / 'dnsmasq-log.txt'}"]),
                            log_path=work / "dnsmasq.log")
    # (tftpd-hpa: "-a 127.0.0.1:PORT" fails in a namespace that has only a loopback,
    # getaddrinfo's AI_ADDRCONFIG; the wildcard there means loopback only.)
    time.sleep(1.0)
    for name, p in procs.items():
        if not p.alive():
            raise RuntimeError(f"{name} did not start:\n{p.log_text()}")
    return dict(PORTS), procs


def set_affinity(pids: list[int], cpus: set[int]) -> None:
    """Pin every thread of these processes (and so the children they fork) to ``cpus``."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (OSError, ValueError):
                pass


def atftp(ns: str, port: int, name: str, out: Path, blksize: int | None, windowsize: int | None,
          cpu: int | None = None) -> tuple[float, bool]:
    argv = (["taskset", "-c", str(cpu)] if cpu is not None else []) + ["atftp", "--get", "-r", name, "-l", str(out)]
    if blksize and blksize != 512:
        argv += ["--option", f"blksize {blksize}"]
    if windowsize and windowsize > 1:
        argv += ["--option", f"windowsize {windowsize}"]
    argv += ["127.0.0.1", str(port)]
    if out.exists():
        out.unlink()
    started = time.monotonic()
    result = run(ns_exec(ns, argv), timeout=180, check=False)
    took = time.monotonic() - started
    return took, result.returncode == 0


def run_tftp(quick: bool, profile: bool) -> dict:
    work = TMP / "tftp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = TMP / "tftp-root"
    files = data.firmware(root, {"fw1m.bin": MiB, "fw16m.bin": 16 * MiB, "tiny.bin": 1})
    ns, remove_ns = make_single_ns("tftp")
    ports, procs = start_servers(ns, root, work)
    z = Zprovd("zprovd-tftp", work / "zprovd", http=False, https=False, tftp=True, firmware_dir=root, ns=ns)
    z.start(expect=("tftp",))
    ports["zprovd"] = z.ports["tftp"]
    res: dict = {"single": [], "concurrent": [], "overhead_ms": {}}
    out = work / "out.bin"
    reps = {"fw1m.bin": 3 if quick else 7, "fw16m.bin": 1 if quick else 5}
    try:
        for server in SERVERS:
            times = [atftp(ns, ports[server], "tiny.bin", out, None, None)[0] for _ in range(5)]
            res["overhead_ms"][server] = round(1000 * statistics.median(times), 1)
        cases = [(s, b, None) for s in SERVERS for b in (512, 1468)]
        cases += [("zprovd", 1468, w) for w in (8, 16, 32)] + [("atftpd", 1468, 16)]
        # Lockstep TFTP is a ping-pong: on an idle VM its speed is mostly the time CPUs take to wake
        # up, and it moves with whatever else runs.  Every case is therefore measured twice: with free
        # scheduling, and with the server and the client pinned to the same CPU (the per-packet cost).
        server_pids = [p.pid for p in procs.values()] + [z.pid]
        all_cpus = os.sched_getaffinity(0)
        pin_cpu = max(all_cpus)
        for pinned in (False, True):
            set_affinity(server_pids, {pin_cpu} if pinned else all_cpus)
            for fname in ("fw1m.bin", "fw16m.bin"):
                size = files[fname].stat().st_size
                took: dict = {c: [] for c in cases}
                fails: dict = {c: 0 for c in cases}
                # Rounds over every case, so that a burst of load elsewhere on the machine
                # hits all servers alike; the median of the rounds is reported.
                for _ in range(reps[fname]):
                    for case in cases:
                        server, blksize, window = case
                        t, ok = atftp(ns, ports[server], fname, out, blksize, window, pin_cpu if pinned else None)
                        if ok and out.exists() and out.stat().st_size == size:
                            took[case].append(t)
                        else:
                            fails[case] += 1
                for case in cases:
                    server, blksize, window = case
                    med = statistics.median(took[case]) if took[case] else None
                    row = {"file": fname, "server": server, "blksize": blksize, "windowsize": window or 1,
                           "pinned": pinned, "seconds": round(med, 4) if med else None,
                           "MBps": round(size / med / 1e6, 2) if med else None,
                           "best_MBps": round(size / min(took[case]) / 1e6, 2) if took[case] else None,
                           "worst_MBps": round(size / max(took[case]) / 1e6, 2) if took[case] else None,
                           "failures": fails[case], "runs": reps[fname]}
                    res["single"].append(row)
                    log(f"TFTP {'1 CPU' if pinned else 'free '} {fname:<9} {server:<9} blksize {blksize:<4} "
                        f"window {window or 1:<2} {row['MBps'] or 0:7.2f} MB/s median, {row['best_MBps'] or 0:7.2f} "
                        f"best ({fails[case]} failed)")
        set_affinity(server_pids, all_cpus)
        counts = [100, 200] if quick else [100, 500, 1000]
        for server in ("zprovd", "tftpd-hpa"):
            for n in (counts if server == "zprovd" or not quick else counts[:1]):
                r = concurrent(ns, ports[server], n, MiB)
                r.update(server=server)
                res["concurrent"].append(r)
                log(f"TFTP concurrent {server:<9} N={n:<5} {r['ok']} ok, {r['failed']} failed, "
                    f"{r['elapsed_s']:.1f}s, {r['MBps']} MB/s {r['reasons'] or ''}")
        res["zprovd_hwm_kib"] = z.status().get("VmHWM")
        if profile:
            p = Profile(z.pid, "tftp-1468", "zprovd serving fw16m.bin to atftp, blksize 1468, lockstep")
            for _ in range(3):
                atftp(ns, ports["zprovd"], "fw16m.bin", out, 1468, None)
            res.setdefault("profiles", {})["tftp-1468"] = p.stop()
            p = Profile(z.pid, "tftp-512", "zprovd serving fw16m.bin to atftp, blksize 512, lockstep")
            atftp(ns, ports["zprovd"], "fw16m.bin", out, 512, None)
            res["profiles"]["tftp-512"] = p.stop()
            p = Profile(z.pid, "tftp-concurrent", f"zprovd, {counts[-1]} concurrent 1 MiB transfers")
            concurrent(ns, ports["zprovd"], counts[-1], MiB)
            res["profiles"]["tftp-concurrent"] = p.stop()
    finally:
        z.stop()
        for p in procs.values():
            p.stop()
        remove_ns()
    return res


def concurrent(ns: str, port: int, n: int, size: int, blksize: int = 1468) -> dict:
    argv = [PYTHON, str(BENCH / "tftp_client.py"), "--port", str(port), "--file", "fw1m.bin", "--size", str(size),
            "--count", str(n), "--blksize", str(blksize), "--deadline", "240"]
    result = run(ns_exec(ns, argv), timeout=300)
    r = json.loads(result.stdout.strip().splitlines()[-1])
    r["blksize"] = blksize
    return r
