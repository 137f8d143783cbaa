#!/usr/bin/env python3
"""zprovd benchmarks: the entry point (``make bench``).

    .venv/bin/python bench/run.py [--quick] [--only http,tftp,dhcp,storm,memory] [--no-profile]

Needs root on Linux (network namespaces, apt-get, py-spy).  Installs what
is missing first (bench/tools.py), then measures, in one run on this
machine: HTTP/HTTPS against nginx and a bare twisted.web resource, TFTP
against tftpd-hpa, atftpd and dnsmasq, DHCP against dnsmasq with perfdhcp,
a boot storm, and the daemon's memory.  A full run writes
bench/results/latest.{md,json,png} and the py-spy profiles in
bench/results/profiles/; ``--quick`` (a few minutes, reduced sizes) and
``--only`` write bench/results/tmp/{quick,partial}.* instead, so they never
replace the committed results.  Every server started is stopped and every
namespace deleted at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import CLEANUP, RESULTS, TMP, log  # noqa: E402

SECTIONS = ("http", "tftp", "dhcp", "storm", "memory")
TIME_LIMIT = {"quick": 15 * 60, "full": 90 * 60}


def source_state() -> dict[str, str]:
    """sha256 of every file of the daemon's source and bundled templates (the tree moves under the bench)."""
    import hashlib

    out = {}
    for base in ("zprovd", "templates"):
        for path in sorted((common.ROOT / base).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                out[str(path.relative_to(common.ROOT))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fingerprint(state: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(state.items())).encode()).hexdigest()[:16]


def _alarm(signum, frame):
    raise TimeoutError("the bench ran past its time limit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small version (a few minutes)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profiling runs (full runs profile)")
    ap.add_argument("--label", default="", help="machine label for the results (default: from /proc)")
    ap.add_argument("--output", default="", help="results file stem under bench/results/ (default: latest for "
                                                    "a full run of every section, tmp/quick or tmp/partial otherwise)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s): {', '.join(unknown)}")
    profile = not args.quick and not args.no_profile
    stem = args.output or ("tmp/quick" if args.quick else "latest" if only == list(SECTIONS) else "tmp/partial")

    import tools

    tools.ensure_all()
    import report
    from dhcp_bench import run_dhcp, run_storm
    from http_bench import run_http
    from memory_bench import run_memory
    from tftp_bench import run_tftp

    common.install_signal_handlers()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT["quick" if args.quick else "full"])
    TMP.mkdir(parents=True, exist_ok=True)
    common.remove_stale_namespaces()
    machine = tools.machine()
    label = args.label or f"{machine['nproc']}-core {machine['CPU']}, {machine['memory']} RAM, {machine['OS']}" + (
        f" ({machine['virtualisation']})" if machine["virtualisation"] not in ("?", "none") else "")
    started = time.monotonic()
    source_before = source_state()
    newest = max((common.ROOT / f for f in source_before), key=lambda p: p.stat().st_mtime)
    results: dict = {"meta": {
        "source": {"fingerprint": fingerprint(source_before), "files": len(source_before),
                   "newest": f"{newest.relative_to(common.ROOT)} "
                             f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(newest.stat().st_mtime))})"},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine, "versions": tools.versions(), "label": label, "sections": only,
    }}
    runners = {"http": run_http, "tftp": run_tftp, "dhcp": run_dhcp, "storm": run_storm, "memory": run_memory}
    status = 0
    try:
        for section in only:
            log(f"=== {section} ===")
            t0 = time.monotonic()
            load_before = os.getloadavg()
            try:
                results[section] = runners[section](args.quick, profile)
            except (KeyboardInterrupt, TimeoutError):
                raise
            except Exception as exc:
                status = 1
                results[section] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{section} failed: {exc}")
                traceback.print_exc()
            finally:
                CLEANUP.run_all()  # nothing of one section survives into the next
            if isinstance(results.get(section), dict):
                results[section]["loadavg"] = {"before": [round(x, 2) for x in load_before],
                                               "after": [round(x, 2) for x in os.getloadavg()],
                                               "seconds": round(time.monotonic() - t0)}
            log(f"=== {section} done in {time.monotonic() - t0:.0f} s, load average {os.getloadavg()[0]:.2f} ===")
    except (KeyboardInterrupt, TimeoutError) as exc:
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
        log(f"stopped: {exc}")
    finally:
        signal.alarm(0)
        CLEANUP.run_all()
    results["meta"]["duration_s"] = time.monotonic() - started
    source_after = source_state()
    changed = sorted(f for f in set(source_before) | set(source_after) if source_before.get(f) != source_after.get(f))
    results["meta"]["source"]["changed_during_run"] = changed
    report.write(results, stem)
    md = (RESULTS / f"{stem}.md").read_text()
    print()
    print(md)
    print("Targets:")
    print(report.terminal(results))
    print(f"\nwritten: {RESULTS / (stem + '.md')}, {RESULTS / (stem + '.png')}, {RESULTS / (stem + '.json')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
