"""Daemon memory: RSS idle (empty database) and with 100,000 devices in SQLite."""

from __future__ import annotations

import shutil
import time

import data
from common import TMP, Zprovd, bulk_import, log
from http_bench import wrk


def _settle(z: Zprovd, seconds: float = 2.0) -> dict:
    time.sleep(seconds)
    s = z.status()
    return {"rss_kib": s.get("VmRSS"), "hwm_kib": s.get("VmHWM")}


def run_memory(quick: bool, profile: bool) -> dict:
    work = TMP / "memory"
    shutil.rmtree(work, ignore_errors=True)
    n = 10000 if quick else 100000
    res: dict = {"devices": n}
    empty = Zprovd("zprovd-idle", work / "idle")
    empty.start(expect=("http", "https", "tftp"))
    try:
        res["idle_empty"] = _settle(empty)
    finally:
        empty.stop()
    log(f"MEMORY idle, empty database: {res['idle_empty']['rss_kib'] / 1024:.1f} MiB")

    phones = data.phones(n, mix=True, offset=1000000)
    csv_path = work / "devices.csv"
    data.write_csv(csv_path, phones)
    z = Zprovd("zprovd-100k", work / "big")
    res["import_s"] = round(bulk_import(z.config, csv_path, 1), 1)  # bench data: 1 PBKDF2 iteration
    res["db_mib"] = round((z.state / "zprovd.sqlite3").stat().st_size / 2**20, 1)
    log(f"MEMORY: {n} devices imported in {res['import_s']} s")
    z.start(expect=("http", "https", "tftp"))
    try:
        res["idle_full"] = _settle(z)
        paths = work / "paths.txt"
        paths.write_text("\n".join("/" + p.file for p in phones) + "\n")
        r = wrk(f"http://127.0.0.1:{z.ports['http']}", paths, 64, 5 if quick else 15)
        res["load"] = {"requests": r["requests"], "rps": round(r["rps"]), "errors": r["errors"]}
        res["after_load"] = _settle(z, 1.0)
    finally:
        z.stop()
    log(f"MEMORY {n} devices: idle {res['idle_full']['rss_kib'] / 1024:.1f} MiB, after {res['load']['requests']} "
        f"per-MAC requests {res['after_load']['rss_kib'] / 1024:.1f} MiB (peak {res['after_load']['hwm_kib'] / 1024:.1f})")
    return res
