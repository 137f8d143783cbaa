"""py-spy profiles of the daemon under load, summarised as text.

``Profile(pid, name)`` attaches ``py-spy record`` (raw collapsed stacks,
non-blocking sampling) to a running daemon; ``stop()`` writes
``bench/results/profiles/<name>.txt``: the functions with the most samples
on top of the stack (self) and anywhere in it (inclusive).  Profiles are
taken in separate runs of a workload, never during a measured run.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import time
from pathlib import Path

from common import CLEANUP, PYTHON, RESULTS, ROOT, log

PROFILES = RESULTS / "profiles"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def _spy() -> str:
    return str(Path(PYTHON).with_name("py-spy"))


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("/site-packages/", str(ROOT) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def _short_line(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{_short(frame)}:{m.group('line') or '?'}"


def _thread_kind(name: str) -> str:
    name = re.sub(r"\d+", "N", name)
    return name


def summarise(raw: Path, title: str, seconds: float | None = None, rate: int = 250, top: int = 30) -> str:
    threads: collections.Counter[str] = collections.Counter()
    self_counts: collections.Counter[str] = collections.Counter()
    self_lines: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    main_incl: collections.Counter[str] = collections.Counter()
    main_self: collections.Counter[str] = collections.Counter()
    main_total = 0
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = stack.split(";")
        thread = "?"
        if parts and parts[0].startswith("thread ("):
            thread = _thread_kind(parts[0].split(": ", 1)[-1])
        frames = [f for f in parts if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        threads[thread] += n
        self_counts[_short(frames[-1])] += n
        self_lines[_short_line(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
        if thread == "MainThread":
            main_total += n
            main_self[_short(frames[-1])] += n
            for f in {_short(f) for f in frames}:
                main_incl[f] += n
    out = [f"# {title}", f"samples: {total} (non-idle, all threads; {rate} Hz"
           + (f", {seconds:.1f} s)" if seconds else ")"), "", "## busy threads (share of all samples"
           + (", and share of wall time)" if seconds else ")")]
    for name, n in threads.most_common():
        busy = f"  busy {100 * n / (rate * seconds):5.1f}% of wall time" if seconds else ""
        out.append(f"{100 * n / max(total, 1):5.1f}%  {name}{busy}")
    out += ["", "## self (top of stack)"]
    for name, n in self_counts.most_common(top):
        out.append(f"{100 * n / max(total, 1):5.1f}%  {name}")
    out += ["", "## self, by line"]
    for name, n in self_lines.most_common(15):
        out.append(f"{100 * n / max(total, 1):5.1f}%  {name}")
    if main_total:
        out += ["", "## MainThread (the reactor): inclusive, zprovd and twisted.web functions"]
        for name, n in main_incl.most_common():
            if "zprovd/" in name or "(twisted/web" in name or "(twisted/logger" in name or "logs.py" in name \
                    or "prometheus" in name or "jinja2/environment" in name or "threads.py" in name:
                out.append(f"{100 * n / main_total:5.1f}%  {name}")
            if len(out) > 400:
                break
        out += ["", "## MainThread: self"]
        for name, n in main_self.most_common(20):
            out.append(f"{100 * n / main_total:5.1f}%  {name}")
    out += ["", "## inclusive (anywhere on the stack)"]
    for name, n in incl.most_common(top + 20):
        out.append(f"{100 * n / max(total, 1):5.1f}%  {name}")
    return "\n".join(out) + "\n"


class Profile:
    def __init__(self, pid: int, name: str, title: str, max_seconds: float = 120):
        PROFILES.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.title = title
        self.raw = PROFILES / f"{name}.raw"
        self.txt = PROFILES / f"{name}.txt"
        self.proc = subprocess.Popen(
            [_spy(), "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking", "--threads",
             "--duration", str(int(max_seconds)), "--output", str(self.raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        self._cleanup = CLEANUP.push(f"py-spy {name}", self._stop)
        time.sleep(0.5)
        self.started = time.monotonic()

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> str | None:
        seconds = time.monotonic() - self.started
        CLEANUP.run_one(self._cleanup)
        if not self.raw.exists():
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            log(f"py-spy wrote no profile for {self.name}: {err[-500:]}")
            return None
        text = summarise(self.raw, self.title, seconds)
        self.txt.write_text(text)
        return str(self.txt.relative_to(ROOT))
