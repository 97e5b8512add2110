"""Progress on stderr, so stdout stays parseable.

`status(msg)` shows a spinner with elapsed seconds while the block runs when stderr is a terminal,
and one line when it is not (logs, CI). `bar(total, msg)` returns a callable(done, total) for loops.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def status(message: str):
    if _quiet:
        yield
        return
    start = time.perf_counter()
    if not _tty():
        print(f"{message} ...", file=sys.stderr, flush=True)
        yield
        print(f"{message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return
    stop = threading.Event()

    def spin():
        for ch in itertools.cycle("|/-\\"):
            if stop.wait(0.1):
                break
            sys.stderr.write(f"\r{ch} {message} ({time.perf_counter() - start:.0f} s)")
            sys.stderr.flush()

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        sys.stderr.write(f"\r  {message}: {time.perf_counter() - start:.1f} s\n")
        sys.stderr.flush()


def bar(message: str):
    """A progress callback(done, total) drawing a bar on stderr (one final line when not a terminal)."""
    start = time.perf_counter()
    last = [0.0]

    def update(done: int, total: int) -> None:
        if _quiet:
            return
        now = time.perf_counter()
        if done < total and now - last[0] < 0.2:
            return
        last[0] = now
        frac = done / total if total else 1.0
        if _tty():
            filled = int(30 * frac)
            sys.stderr.write(f"\r{message} [{'#' * filled}{'.' * (30 - filled)}] {frac:6.1%} {now - start:5.1f} s")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif done >= total:
            print(f"{message}: done in {now - start:.1f} s", file=sys.stderr, flush=True)

    return update
