#!/usr/bin/env python3
"""Bounded fuzzing of zprovd's parsers: ``python fuzz/run.py [--seconds N]``.

Every target of ``fuzz/targets.py`` runs in its own subprocess for its share
of ``--seconds`` (default 180 for the whole run), seeded from
``fuzz/corpus/<target>/``.  The engine is atheris (coverage-guided libFuzzer,
zprovd instrumented with ``atheris.instrument_imports()``) when it is
installed, hypothesis otherwise (or with ``--engine hypothesis``): random and
seed-mutating byte strings, as many as fit in the time.

A Python exception escaping a target, a property violation, a hang (over
``--timeout`` seconds on one input) or a crash of the interpreter is a
finding.  Findings are de-duplicated by exception type and the innermost
zprovd frame, shrunk, and printed with the reproducer input and its
traceback; the run then exits 1.  Replay one with
``python fuzz/run.py --reproduce TARGET FILE``.

Each subprocess is killed if it overruns its share by more than a few
seconds, so the run as a whole ends within ``--seconds`` plus about 30 s
(start-up of the subprocesses and shrinking of findings).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import targets as T  # noqa: E402  (only the standard library at import time)

STARTUP = 2.5  # seconds a worker spends importing and setting up (scapy, the catalogue)
GRACE = 15.0  # beyond its share before a worker is killed
SHRINK_SECONDS = 5.0


# ---------------------------------------------------------------------------
# Findings: what escaped a target, keyed by a signature.


def signature(exc: BaseException) -> str:
    """Exception type and innermost zprovd frame (or the property's message kind)."""
    if isinstance(exc, T.PropertyViolation):
        kind = re.sub(r"'.*?'|\".*?\"|[0-9]+", "_", str(exc).splitlines()[0] if str(exc) else "")
        return f"PropertyViolation: {kind[:80]}"
    frames = traceback.extract_tb(exc.__traceback__)
    inner = [f for f in frames if "/zprovd/" in f.filename.replace(os.sep, "/")] or frames
    where = f"{Path(inner[-1].filename).name}:{inner[-1].lineno}" if inner else "?"
    return f"{type(exc).__name__} at {where}"


def record(findings: Path, target: str, data: bytes, exc: BaseException, seen: set[str]) -> None:
    sig = signature(exc)
    if sig in seen:
        return
    seen.add(sig)
    findings.mkdir(parents=True, exist_ok=True)
    stem = f"{target}-{hashlib.sha1(sig.encode()).hexdigest()[:10]}"
    (findings / f"{stem}.bin").write_bytes(data)
    (findings / f"{stem}.json").write_text(json.dumps({
        "target": target,
        "signature": sig,
        "traceback": "".join(traceback.format_exception(exc)),
    }))


def seeds(target: str) -> list[bytes]:
    folder = HERE / "corpus" / target
    if not folder.is_dir():
        return []
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


# ---------------------------------------------------------------------------
# Workers (one per target, in a subprocess).


def worker_atheris(target: T.Target, workdir: Path, seconds: float, timeout: int) -> int:
    import atheris

    with atheris.instrument_imports(include=["zprovd"]):
        check = target.setup()
    findings = workdir / "findings"
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            check(data)
        except Exception as exc:  # a finding; keep fuzzing for other ones
            record(findings, target.name, data, exc, seen)

    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        f"-max_total_time={max(1, int(seconds))}",
        f"-timeout={timeout}",
        f"-max_len={target.max_len}",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={workdir}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    seed_dir = HERE / "corpus" / target.name
    if seed_dir.is_dir():
        argv.append(str(seed_dir))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits by itself


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and buf:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3 and buf:
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randint(1, 32)]
            buf[pos:pos] = chunk * rng.randint(1, 4)
        else:
            buf[pos:pos] = rng.choice([b"\x00", b"\xff", b"%", b"..", b"/", b"\n", b"\"", b"\\", b"~",
                                       b"=", b",", b";", b"&", b"[", b"{mac}", b"\xc3\xa9"])
    return bytes(buf)


def worker_hypothesis(target: T.Target, workdir: Path, seconds: float, timeout: int) -> int:
    from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

    check = target.setup()
    corpus = seeds(target.name) or [b""]
    findings = workdir / "findings"
    seen: set[str] = set()
    end = time.monotonic() + seconds
    examples = 0
    inputs = st.one_of(
        st.binary(max_size=target.max_len),
        st.builds(lambda s, r: _mutate(s, random.Random(r)), st.sampled_from(corpus), st.integers(0, 2**32)),
        st.sampled_from(corpus),
    )
    last: list = []

    def body(data: bytes) -> None:
        nonlocal examples
        examples += 1
        try:
            check(data)
        except Exception as exc:
            last[:] = [data, exc]
            raise

    rng = random.Random()
    while time.monotonic() < end:
        test = settings(max_examples=500, deadline=timeout * 1000, database=None,
                        phases=(Phase.explicit, Phase.generate, Phase.shrink),
                        suppress_health_check=list(HealthCheck), report_multiple_bugs=False)(given(inputs)(body))
        test = seed(rng.getrandbits(64))(test)
        try:
            test()
        except Exception as exc:
            if last:
                record(findings, target.name, last[0], last[1], seen)
            else:
                record(findings, target.name, b"", exc, seen)
    print(f"hypothesis: {examples} inputs in {seconds:.0f} s")
    return 0


# ---------------------------------------------------------------------------
# The driver.


def shrink(check, data: bytes, sig: str, budget: float) -> bytes:
    """Delete chunks while the same finding reproduces."""
    end = time.monotonic() + budget

    def same(candidate: bytes) -> bool:
        try:
            check(candidate)
        except Exception as exc:
            return signature(exc) == sig
        return False

    chunk = max(1, len(data) // 2)
    while chunk >= 1 and time.monotonic() < end:
        i, changed = 0, False
        while i < len(data) and time.monotonic() < end:
            candidate = data[:i] + data[i + chunk:]
            if same(candidate):
                data, changed = candidate, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return data


_CHECKS: dict = {}


def checker(name: str):
    """Target ``name``'s check function in this (uninstrumented) process, set up once."""
    if name not in _CHECKS:
        _CHECKS[name] = T.TARGETS[name].setup()
    return _CHECKS[name]


def reproduce(name: str, data: bytes) -> str | None:
    """The traceback of ``data`` on target ``name`` (uninstrumented), or None."""
    check = checker(name)
    try:
        check(data)
    except Exception:
        return traceback.format_exc()
    return None


def stats(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    runs = re.findall(r"Done (\d+) runs in (\d+) second", text)
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
    hyp = re.findall(r"hypothesis: (\d+) inputs", text)
    parts = []
    if runs:
        parts.append(f"{runs[-1][0]} runs in {runs[-1][1]} s")
    if cov:
        parts.append(f"coverage {cov[-1][0]} edges, {cov[-1][1]} features, corpus {cov[-1][2]}")
    if hyp:
        parts.append(f"{hyp[-1]} inputs")
    return "; ".join(parts) or "no statistics (see the log)"


def run_target(target: T.Target, engine: str, seconds: float, timeout: int, workdir: Path) -> tuple[int, list[dict]]:
    tdir = workdir / target.name
    tdir.mkdir(parents=True, exist_ok=True)
    log = tdir / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target.name, "--engine", engine,
           "--seconds", str(seconds), "--timeout", str(timeout), "--workdir", str(tdir)]
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=seconds + STARTUP + GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group
            proc.wait()
            code = -9
    elapsed = time.monotonic() - started
    found = []
    for meta in sorted((tdir / "findings").glob("*.json")):
        info = json.loads(meta.read_text())
        info["data"] = meta.with_suffix(".bin").read_bytes()
        found.append(info)
    # libFuzzer artifacts: hangs, memory blow-ups, interpreter crashes.
    for artifact in sorted(tdir.glob("*-*")):
        kind = artifact.name.split("-", 1)[0]
        if artifact.is_file() and kind in ("crash", "timeout", "oom", "leak", "slow"):
            tail = log.read_text(errors="replace")[-3000:]
            found.append({"target": target.name, "signature": f"libFuzzer {kind}", "traceback": tail,
                          "data": artifact.read_bytes()})
    if code not in (0, None) and not found:
        found.append({"target": target.name, "signature": f"worker exited with {code}",
                      "traceback": log.read_text(errors="replace")[-3000:], "data": b""})
    print(f"  {target.name:10s} {elapsed:5.0f} s  {stats(log)}  findings: {len(found)}", flush=True)
    return code, found


def report(finding: dict, deadline: float) -> None:
    name, data, sig = finding["target"], finding["data"], finding["signature"]
    trace = finding["traceback"]
    if not sig.startswith(("libFuzzer", "worker")):
        budget = min(SHRINK_SECONDS, deadline - time.monotonic())
        if budget > 0:
            data = shrink(checker(name), data, sig, budget)
        trace = reproduce(name, data) or trace
    print("=" * 78)
    print(f"FINDING in target {name!r}: {sig}")
    print(f"  input ({len(data)} bytes): {data[:600]!r}{' ...' if len(data) > 600 else ''}")
    print("  as the target sees it: " + T.describe(name, data)[:800].replace("\n", "\n    "))
    print(f"  base64: {base64.b64encode(data).decode()[:1200]}")
    print("  traceback:")
    print("    " + trace.rstrip().replace("\n", "\n    "))
    print(f"  replay: python fuzz/run.py --reproduce {name} FILE   (FILE holding the input bytes)")


def default_engine() -> str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "hypothesis"
    return "atheris"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="total fuzzing time (default 180)")
    parser.add_argument("--targets", default=",".join(T.TARGETS), help="comma-separated, default all: "
                        + ", ".join(T.TARGETS))
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=None,
                        help="default: atheris if installed, else hypothesis")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (default 10)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where corpora, logs and findings go (default: a temporary folder, kept on failure)")
    parser.add_argument("--reproduce", nargs=2, metavar=("TARGET", "FILE"), help="run one input and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    engine = args.engine or default_engine()

    if args.reproduce:
        name, file = args.reproduce
        data = Path(file).read_bytes()
        print(T.describe(name, data))
        with tempfile.TemporaryDirectory(prefix="zprovd-fuzz-") as scratch:
            os.environ["ZPROVD_FUZZ_TMP"] = scratch
            trace = reproduce(name, data)
        print(trace or "no finding: the target accepts this input")
        return 1 if trace else 0

    if args.worker:
        target = T.TARGETS[args.worker]
        work = worker_atheris if engine == "atheris" else worker_hypothesis
        return work(target, args.workdir, args.seconds, args.timeout)

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in T.TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(T.TARGETS)}")
    chosen = [T.TARGETS[n] for n in names]
    started = time.monotonic()
    fuzz_end = started + args.seconds
    deadline = fuzz_end + 30  # shrinking and reporting stop by then
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zprovd-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["ZPROVD_FUZZ_TMP"] = str(workdir)  # targets' scratch folders (firmware, config)
    print(f"fuzzing {len(chosen)} targets for {args.seconds:.0f} s with {engine}; work folder {workdir}", flush=True)

    findings: list[dict] = []
    failed = False
    for i, target in enumerate(chosen):
        # What is left, less each remaining worker's start-up, split by weight.
        left = chosen[i:]
        remaining = fuzz_end - time.monotonic() - STARTUP * len(left)
        share = max(3.0, remaining * target.weight / sum(t.weight for t in left))
        code, found = run_target(target, engine, share, args.timeout, workdir)
        findings += found
        failed = failed or bool(found)

    for finding in findings:
        report(finding, deadline)
    print("=" * 78)
    print(f"{len(findings)} finding(s) in {time.monotonic() - started:.0f} s")
    if failed:
        print(f"work folder kept: {workdir}")
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
