"""Turn the results of a run into the terminal table, latest.md, latest.json and latest.png."""

from __future__ import annotations

import json
from pathlib import Path

from common import RESULTS, ROOT


def _fmt(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return out


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def http_index(res: dict) -> dict:
    return {(r["case"], r["server"], r["connections"]): r for r in res.get("runs", [])}


def tftp_index(res: dict, pinned: bool = False) -> dict:
    return {(r["file"], r["server"], r["blksize"], r["windowsize"]): r for r in res.get("single", [])
            if r.get("pinned", False) == pinned}


PIN_LABEL = {False: "free scheduling", True: "server and client on one CPU"}


def targets(results: dict, quick: bool) -> list[dict]:
    out = []

    def add(name, measured, ok, note=""):
        out.append({"target": name, "measured": measured, "met": ok, "note": note})

    h = results.get("http")
    if h and not h.get("error"):
        idx = http_index(h)
        for case, label in (("per-MAC", "HTTP per-MAC"), ("zoiper", "HTTP Zoiper")):
            for c in sorted({k[2] for k in idx}):
                z, b = idx.get((case, "zprovd", c)), idx.get(("per-MAC", "bare-twisted", c))
                if z and b:
                    ratio = z["rps"] / b["rps"]
                    add(f"{label} >= 0.75x bare twisted.web (c={c})",
                        f"{z['rps']:,.0f} vs {b['rps']:,.0f} req/s = {ratio:.2f}x", ratio >= 0.75)
    t = results.get("tftp")
    if t and not t.get("error"):
        for pinned in sorted({r.get("pinned", False) for r in t.get("single", [])}):
            idx = tftp_index(t, pinned)
            where = PIN_LABEL[pinned]
            for f in ("fw1m.bin", "fw16m.bin"):
                for bs in (512, 1468):
                    z, hpa = idx.get((f, "zprovd", bs, 1)), idx.get((f, "tftpd-hpa", bs, 1))
                    if z and hpa and z["MBps"] and hpa["MBps"]:
                        ratio = z["MBps"] / hpa["MBps"]
                        add(f"TFTP {f} blksize {bs} >= 1.0x tftpd-hpa ({where})",
                            f"{z['MBps']} vs {hpa['MBps']} MB/s = {ratio:.2f}x", ratio >= 1.0)
                    bare = idx.get((f, "bare-twisted", bs, 1))
                    if pinned and z and bare and z["MBps"] and bare["MBps"]:
                        # FINDINGS.md, B: the owner's decision, not the target.
                        ratio = z["MBps"] / bare["MBps"]
                        add(f"Proposed instead: TFTP {f} blksize {bs} >= 0.8x a bare server on the same reactor ({where})",
                            f"{z['MBps']} vs {bare['MBps']} MB/s = {ratio:.2f}x", ratio >= 0.8)
                z, hpa = idx.get((f, "zprovd", 1468, 16)), idx.get((f, "tftpd-hpa", 1468, 1))
                if z and hpa and z["MBps"] and hpa["MBps"]:
                    ratio = z["MBps"] / hpa["MBps"]
                    add(f"TFTP {f} windowsize 16 >= 3x tftpd-hpa blksize 1468 ({where})",
                        f"{z['MBps']} vs {hpa['MBps']} MB/s = {ratio:.2f}x", ratio >= 3.0)
        conc = [r for r in t.get("concurrent", []) if r["server"] == "zprovd"]
        if conc:
            biggest = max(conc, key=lambda r: r["count"])
            add(f"{biggest['count']} concurrent 1 MiB TFTP transfers, 0 failures"
                + (" (quick: fewer than 1,000)" if biggest["count"] < 1000 else ""),
                f"{biggest['failed']} failed, {biggest['elapsed_s']} s", biggest["failed"] == 0 and biggest["count"] >= 1000,
                "" if biggest["count"] >= 1000 else "not evaluated at N=1000")
    d = results.get("dhcp")
    if d and not d.get("error"):
        for mode, what in (("new", "new clients"), ("known", f"{d.get('known_clients', '?')} known clients")):
            if f"zprovd {mode}" not in d.get("steps", {}):
                continue
            best = d.get("best", {}).get(f"zprovd {mode}")
            dn = d.get("best", {}).get(f"dnsmasq {mode}")
            rate = best["dora_per_s"] if best else 0.0
            add(f"DHCP >= 1,000 DORA/s with < 1% drops ({what})",
                f"{rate:,.0f} DORA/s (dnsmasq {dn['dora_per_s']:,.0f})" if dn else f"{rate:,.0f} DORA/s",
                rate >= 1000)
    s = results.get("storm")
    if s and not s.get("error"):
        for r in s.get("runs", []):
            if r.get("dhcp_tries", 4) != 4:
                continue  # the persistent-phones run is information, not the target
            took = r["all_provisioned_s"]
            add(f"Boot storm of {r['phones']} phones (DHCP + {r['protocol'].upper()}) <= 20 s, 0 failures"
                + (" (quick: fewer phones)" if r["phones"] < 2000 else ""),
                f"{r['failed']} failed, all provisioned in {took} s" if took else
                f"{r['failed']} failed, last at {r['last_provisioned_s']} s",
                bool(took is not None and took <= 20 and r["failed"] == 0 and r["phones"] >= 2000),
                "" if r["phones"] >= 2000 else "not evaluated at 2,000 phones")
    return out


def markdown(results: dict) -> str:
    meta = results["meta"]
    quick = meta["quick"]
    L = [f"# zprovd benchmarks{' (QUICK run: reduced sizes)' if quick else ''}", "",
         f"Measured {meta['date']} on **{meta['label']}**, in one run of `bench/run.py "
         f"{' '.join(meta['argv'])}` ({meta['duration_s']:.0f} s). All traffic on loopback or in the bench's own "
         "network namespaces.", ""]
    src = meta.get("source")
    if src:
        L += [f"zprovd source measured: fingerprint `{src['fingerprint']}` (sha256 of the {src['files']} files of "
              f"`zprovd/` and `templates/`; newest: {src['newest']})."
              + (f" **WARNING: these files changed during the run, so sections after the change measured other "
                 f"code: {', '.join(src['changed_during_run'])}.**" if src.get("changed_during_run") else ""), ""]
    L += ["## Machine", ""] + _table(["", ""], [[k, v] for k, v in meta["machine"].items()]) + [""]
    L += ["## Versions", ""] + _table(["program", "version"], [[k, v] for k, v in meta["versions"].items()]) + [""]
    tg = targets(results, quick)
    if tg:
        L += ["## Targets", ""] + _table(["target", "measured", "result"], [
            [t["target"], t["measured"], ("met" if t["met"] else ("MISSED" if not t["note"] else t["note"]))]
            for t in tg]) + [""]
    loads = [(s_, results[s_]["loadavg"]) for s_ in ("http", "tftp", "dhcp", "storm", "memory")
             if isinstance(results.get(s_), dict) and results[s_].get("loadavg")]
    if loads:
        L += ["Load average (1 min) of the machine at the start and end of each section; on this 2-core machine "
              "anything above what the bench itself adds (about 1-2) means other work shared the CPUs:", ""]
        L += _table(["section", "seconds", "load before", "load after"],
                    [[s_, l["seconds"], l["before"][0], l["after"][0]] for s_, l in loads]) + [""]
    for section in ("http", "tftp", "dhcp", "storm", "memory"):
        r = results.get(section)
        if r and r.get("error"):
            L += [f"## {section.upper()}: not measured", "", f"```\n{r['error']}\n```", ""]
    h = results.get("http")
    if h and not h.get("error"):
        idx = http_index(h)
        L += ["## HTTP (wrk, keep-alive, 2 threads)", "",
              f"Best of {h.get('rounds', 1)} interleaved rounds per row (all rounds' req/s in latest.json).",
              f"{h['devices']:,} devices (mix: 70% Yealink T48G, 10% each Snom D785, Polycom VVX 410, Grandstream "
              f"GXP2170), wrk cycling over their per-MAC URLs for {h['seconds']} s per row; nginx serves the same "
              f"bytes pre-rendered to disk (median {h['file_bytes_median']:,} bytes), one worker, access log on; "
              f"the bare twisted.web resource (the issue's reference) and bare httpcore (zprovd's own HTTP layer, "
              f"`bench/bare_httpcore.py`: the ceiling of zprovd's stack) return {h['file_bytes_median']:,} fixed "
              "bytes. Zoiper: "
              f"{h['zoiper_users']} users cycled, `/zoiper?user=U&password=P&version=1.14`, after one first login "
              f"each (first login: {h['zoiper_first_login_ms']} ms per user sequentially, a PBKDF2). "
              "CPU % is the server process's CPU time over the run (100% = one core).", ""]
        rows = []
        for r in h["runs"]:
            base = idx.get(("per-MAC" if r["case"] != "per-MAC https" else "per-MAC https", "bare-twisted",
                            r["connections"]))
            ngx = idx.get(("per-MAC" if r["case"] != "per-MAC https" else "per-MAC https", "nginx",
                           r["connections"]))
            core = idx.get(("per-MAC" if r["case"] != "per-MAC https" else "per-MAC https", "bare-httpcore",
                            r["connections"]))
            rows.append([r["case"], r["server"], r["connections"], _fmt(r["rps"]), _fmt(r["p50_ms"], 2),
                         _fmt(r["p99_ms"], 2), r["errors"], _fmt(r.get("server_cpu_pct"), 0),
                         _ratio(r["rps"], base["rps"]) if base and r["server"] != "bare-twisted" else "",
                         _ratio(r["rps"], core["rps"]) if core and r["server"] == "zprovd" else "",
                         _ratio(r["rps"], ngx["rps"]) if ngx and r["server"] != "nginx" else ""])
        L += _table(["case", "server", "conns", "req/s", "p50 ms", "p99 ms", "errors", "CPU %",
                     "/ bare twisted", "/ bare httpcore", "/ nginx"], rows) + [""]
        L += [f"Import of {h['zoiper_users']} users at the default PBKDF2 cost: {h['import_default_rows_per_s']} rows/s "
              f"(the {h['devices']:,} devices were imported with 1,000 iterations, bench data only, in "
              f"{h['import_bulk_s']} s). zprovd RSS after the HTTP runs: "
              f"{_fmt((h.get('zprovd_rss_kib') or 0) / 1024, 1)} MiB.", ""]
    t = results.get("tftp")
    if t and not t.get("error"):
        L += ["## TFTP (atftp client, one transfer at a time)", "",
              "All servers and the client in one network namespace of the bench (loopback only); dnsmasq on port "
              "69 there. Time = wall time of the `atftp` process, median of the runs (made in rounds over all the "
              "cases, so that load elsewhere hits every server alike); it includes starting atftp "
              "(fetching a 1-byte file takes " + ", ".join(f"{k} {v} ms" for k, v in t["overhead_ms"].items())
              + "). Ratio = against tftpd-hpa at the same blksize, lockstep. Lockstep TFTP is a ping-pong whose "
              "speed on a VM is mostly CPU wake-up latency, which changes with whatever else runs: every case is "
              "measured with free scheduling and with the server and the client pinned to one CPU (then the "
              "time is the sum of both sides' per-packet work, the most repeatable figure). `bare-twisted` is "
              "`bench/bare_tftp.py`, a server with no session logic (one block per ACK, nothing else) on zprovd's "
              "reactor (`zprovd.reactor`): the ceiling of any TFTP server on that reactor; `bare-epoll` is the same server as a plain "
              "`select.epoll` loop, no framework: the ceiling of Python itself.", ""]
        rows = []
        for r in t["single"]:
            hpa = tftp_index(t, r.get("pinned", False)).get((r["file"], "tftpd-hpa", r["blksize"], 1))
            rows.append([PIN_LABEL[r.get("pinned", False)], r["file"], r["server"], r["blksize"], r["windowsize"],
                         _fmt(r["MBps"], 2),
                         _fmt(r["seconds"], 3), f"{r['failures']}/{r['runs']}",
                         _ratio(r["MBps"], hpa["MBps"]) if hpa and r["server"] != "tftpd-hpa" else "",
                         _fmt(r.get("worst_MBps"), 2), _fmt(r.get("best_MBps"), 2)])
        L += _table(["scheduling", "file", "server", "blksize", "window", "MB/s (median)", "seconds", "failed",
                     "/ tftpd-hpa", "worst MB/s", "best MB/s"], rows) + [""]
        L += ["### Concurrent 1 MiB transfers (bench/tftp_client.py, asyncio, blksize 1468, lockstep)", ""]
        L += _table(["server", "N", "ok", "failed", "time to last s", "p50 s", "p99 s", "aggregate MB/s",
                     "client retransmissions", "failure reasons"],
                    [[r["server"], r["count"], r["ok"], r["failed"], r["elapsed_s"], r["p50_s"], r["p99_s"], r["MBps"],
                      r["retransmissions"], ", ".join(f"{k}: {v}" for k, v in r["reasons"].items()) or "-"]
                     for r in t["concurrent"]]) + [""]
        L += ["The client runs on the same 2 cores; its own ceiling shows in the tftpd-hpa rows.", ""]
    d = results.get("dhcp")
    if d and not d.get("error"):
        L += ["## DHCP (perfdhcp as a relay agent, giaddr set, in a namespace pair)", "",
              f"Each row: a fresh server, `perfdhcp -r RATE -R CLIENTS -p {d['seconds']}`. *new*: CLIENTS = 1.2 x the "
              "exchanges, so nearly every exchange is a new lease (first boot of a site); *known*: "
              f"CLIENTS = {d.get('known_clients')}, the same MACs leased again and again (phones rebooting). "
              "Drops = the worse of DISCOVER-OFFER and REQUEST-ACK. dnsmasq with "
              "`--no-ping --dhcp-lease-max=100000 --quiet-dhcp`; zprovd `[dhcp] mode = \"server\"`, "
              "`answer = \"all\"`, `rate_limit = 0`, logging as shipped.", ""]
        rows = []
        for key, steps in d["steps"].items():
            for r in steps:
                rows.append([key.split()[0], key.split()[1], r["rate_asked"], _fmt(r["dora_per_s"], 1),
                             _fmt(r["drops_pct"], 2), _fmt(r["discover_drops_pct"], 2),
                             _fmt(r["request_drops_pct"], 2)])
        L += _table(["server", "clients", "asked /s", "DORA/s", "drops %", "DISCOVER drops %", "REQUEST drops %"],
                    rows) + [""]
        best = d.get("best", {})
        for mode in ("new", "known"):
            z, n = best.get(f"zprovd {mode}"), best.get(f"dnsmasq {mode}")
            if f"zprovd {mode}" in d["steps"]:
                L += [f"Best rate with < 1% drops, {mode} clients: zprovd {_fmt(z['dora_per_s'] if z else 0.0, 0)} "
                      f"DORA/s, dnsmasq {_fmt(n['dora_per_s'] if n else 0.0, 0)} DORA/s, ratio "
                      f"{_ratio(z['dora_per_s'] if z else 0, n['dora_per_s'] if n else 0)}.", ""]
    s = results.get("storm")
    if s and not s.get("error"):
        L += ["## Boot storm (bench/storm.py in a namespace pair)", "",
              "Each phone: DHCP DORA (broadcast) from zprovd's DHCP helper in server mode, then the generic file "
              "`y000000000035.cfg` and its per-MAC file from the server named in option 66 (HTTP keep-alive, or "
              "TFTP blksize 1468); phones start evenly over 1 s. DHCP tries 4: each message sent at most 4 times "
              "(2, 4, 8, 8 s apart: 22 s), a phone not answered by then counts as failed; 8 tries: phones keep "
              "trying (then 16 s apart, 94 s), as real ones do, to show when all would be provisioned.", ""]
        L += _table(["phones", "protocol", "DHCP tries", "ok", "failed", "all provisioned s", "DHCP p50/p99 s", "done p50/p99 s",
                     "DHCP retransmissions", "daemon peak RSS MiB", "failure reasons"],
                    [[r["phones"], r["protocol"], r.get("dhcp_tries", 4), r["ok"], r["failed"], _fmt(r["all_provisioned_s"]) if
                      r["all_provisioned_s"] else f"- (last {r['last_provisioned_s']})",
                      f"{r['dhcp_p50_s']} / {r['dhcp_p99_s']}", f"{r['done_p50_s']} / {r['done_p99_s']}",
                      r.get("dhcp_retransmissions", 0), _fmt(r["daemon_vmhwm_kib"] / 1024, 1),
                      ", ".join(f"{k}: {v}" for k, v in r["reasons"].items()) or "-"] for r in s["runs"]]) + [""]
    m = results.get("memory")
    if m and not m.get("error"):
        L += ["## Memory (VmRSS of the daemon, HTTP + HTTPS + TFTP listening)", ""]
        L += _table(["state", "RSS MiB", "peak MiB"], [
            ["idle, empty database", _fmt(m["idle_empty"]["rss_kib"] / 1024, 1), _fmt(m["idle_empty"]["hwm_kib"] / 1024, 1)],
            [f"idle, {m['devices']:,} devices (database {m['db_mib']} MiB)", _fmt(m["idle_full"]["rss_kib"] / 1024, 1),
             _fmt(m["idle_full"]["hwm_kib"] / 1024, 1)],
            [f"after {m['load']['requests']:,} per-MAC requests over them", _fmt(m["after_load"]["rss_kib"] / 1024, 1),
             _fmt(m["after_load"]["hwm_kib"] / 1024, 1)],
        ]) + [""]
    profiles = {}
    for section in ("http", "tftp", "dhcp"):
        profiles.update((results.get(section) or {}).get("profiles", {}) or {})
    if (results.get("storm") or {}).get("profile"):
        profiles["storm-http"] = results["storm"]["profile"]
    if profiles:
        L += ["## Profiles (py-spy, separate runs of the same loads)", ""]
        L += [f"- {name}: `{path}`" for name, path in profiles.items() if path] + [""]
        L += ["Analysis and proposed fixes: `bench/results/FINDINGS.md`.", ""]
    if results.get("plot"):
        L += [f"![throughput against concurrency]({Path(results.get('stem', 'latest')).name}.png)", ""]
    return "\n".join(L) + "\n"


def terminal(results: dict) -> str:
    lines = []
    for t in targets(results, results["meta"]["quick"]):
        flag = "met   " if t["met"] else ("n/a   " if t["note"] else "MISSED")
        lines.append(f"  [{flag}] {t['target']}: {t['measured']}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, grid = plt.subplots(2, 2, figsize=(15, 10))
    axes = [grid[0][0], grid[0][1], grid[1][1], grid[1][0]]
    h = results.get("http")
    ax = axes[0]
    if h and not h.get("error"):
        series: dict[str, list] = {}
        for r in h["runs"]:
            series.setdefault(f"{r['server']} {r['case']}", []).append((r["connections"], r["rps"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle="--" if "https" in name else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["connections"] for r in h["runs"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_yscale("log")
        ax.set_xlabel("concurrent connections (wrk, keep-alive)")
        ax.set_ylabel("requests/s")
        ax.set_title("HTTP(S): per-MAC files and Zoiper")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    t = results.get("tftp")
    if t and not t.get("error"):
        ax = axes[1]
        series = {}
        for r in t["concurrent"]:
            series.setdefault(r["server"], []).append((r["count"], r["MBps"], r["failed"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for n, mb, failed in pts:
                if failed:
                    ax.annotate(f"{failed} failed", (n, mb), fontsize=7)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["count"] for r in t["concurrent"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent 1 MiB transfers (asyncio client, blksize 1468)")
        ax.set_ylabel("aggregate MB/s")
        ax.set_title("TFTP: concurrent transfers")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax = axes[3]
        rows = [r for r in t["single"] if r["file"] == "fw16m.bin" and r["MBps"] and not r.get("pinned")]
        pinned = {(r["server"], r["blksize"], r["windowsize"]): r for r in t["single"]
                  if r["file"] == "fw16m.bin" and r["MBps"] and r.get("pinned")}
        labels = [f"{r['server']}\nb{r['blksize']} w{r['windowsize']}" for r in rows]
        colors = ["tab:orange" if r["server"] == "zprovd" else "tab:blue" for r in rows]
        x = list(range(len(rows)))
        ax.bar([i - 0.2 for i in x], [r["MBps"] for r in rows], width=0.4, color=colors, label="free scheduling")
        ax.bar([i + 0.2 for i in x], [(pinned.get((r["server"], r["blksize"], r["windowsize"])) or {}).get("MBps")
                                      or 0 for r in rows], width=0.4, color=colors, alpha=0.45, hatch="//",
               label="server + client on one CPU")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=60)
        ax.set_ylabel("MB/s (median)")
        ax.legend(fontsize=7)
        ax.set_title("TFTP: one 16 MiB transfer (atftp), by server, blksize b, windowsize w")
        ax.grid(True, axis="y", alpha=0.3)
    d = results.get("dhcp")
    ax = axes[2]
    if d and not d.get("error"):
        for key, steps in d["steps"].items():
            ax.plot([s["rate_asked"] for s in steps], [s["dora_per_s"] for s in steps], marker="o",
                    label=f"{key} clients", linestyle="-" if key.endswith("new") else "--")
        lim = max([s["rate_asked"] for st in d["steps"].values() for s in st] or [1])
        ax.plot([1, lim], [1, lim], color="grey", linestyle=":", label="offered")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered DORA/s (perfdhcp -r)")
        ax.set_ylabel("completed DORA/s")
        ax.set_title("DHCP (relayed)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    meta = results["meta"]
    fig.suptitle(f"zprovd benchmarks, {meta['date']}, {meta['label']}" + (" (quick)" if meta["quick"] else ""),
                 fontsize=10)
    import matplotlib.ticker  # noqa: F401
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, stem: str = "latest") -> None:
    results["stem"] = stem
    (RESULTS / stem).parent.mkdir(parents=True, exist_ok=True)
    try:
        results["plot"] = plot(results, RESULTS / f"{stem}.png")
    except Exception as exc:  # the numbers matter more than the picture
        results["plot"] = False
        results["plot_error"] = str(exc)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(markdown(results))
