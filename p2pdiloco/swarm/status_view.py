"""`p2pdiloco status --watch`: a live table of a run's peers, read from the DHT every few seconds.

The figures are the peers' own DHT records (records.py), the same that one-shot `status` prints:
state, step, tokens, tokens/s and the last round applied per fragment, plus how many steps each
peer took since the previous refresh. On a terminal the table redraws in place (rich.live); when
the output is a file or a pipe each refresh is printed after the last, so a log keeps every one.
Ctrl-C ends it with status 0: it is how one leaves a live view, not an error.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .records import PeerRecord


def table(run_id: str, records: list[PeerRecord], previous: dict[str, int], error: str = "") -> Table:
    """The view of one refresh. `previous`: each peer's step at the previous refresh (for Δstep)."""
    total_rate = sum(r.tokens_per_s for r in records if r.state == "training")
    title = (f"run '{run_id}': {len(records)} live peer(s), {total_rate:,.0f} tok/s in all, "
             f"{time.strftime('%H:%M:%S')}")
    t = Table(title=title, caption=error or None, title_justify="left")
    for name, justify in (("peer", "left"), ("state", "left"), ("step", "right"), ("Δstep", "right"),
                          ("tokens", "right"), ("tok/s", "right"), ("last rounds", "left"), ("address", "left")):
        t.add_column(name, justify=justify, no_wrap=name in ("peer", "address"))
    for r in records:
        before = previous.get(r.peer_id)
        rounds = " ".join(f"f{k}:r{v}" for k, v in sorted(r.rounds.items(), key=lambda kv: int(kv[0]))) or "-"
        t.add_row(f"…{r.peer_id[-12:]}", r.state, f"{r.step:,}", "" if before is None else f"+{r.step - before:,}",
                  f"{r.tokens:,}", f"{r.tokens_per_s:,.0f}", rounds, r.address)
    return t


def watch(control, run_id: str, every_s: float, count: int = 0, console: Console | None = None) -> int:
    """Refresh every `every_s` seconds, `count` times (0: until Ctrl-C). Each DHT read is bounded
    by the DHT's own timeout (control.py); a read that fails is shown in the caption and retried
    at the next refresh, so a slow DHT never ends the view."""
    console = console or Console()
    previous: dict[str, int] = {}
    shown = 0
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        while True:
            try:
                records, error = control.peers(), ""
            except TimeoutError as exc:
                records, error = [], f"the DHT did not answer: {exc}; retrying"
            view = table(run_id, records, previous, error)
            if live is not None:
                live.update(view, refresh=True)
            else:
                console.print(view)
            previous = {r.peer_id: r.step for r in records} if records else previous
            shown += 1
            if count and shown >= count:
                return 0
            time.sleep(every_s)
    except KeyboardInterrupt:
        return 0
    finally:
        if live is not None:
            live.stop()
