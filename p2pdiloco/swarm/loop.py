"""The peer's network thread: one uvloop event loop that serves the data plane and runs averages
while the main thread trains. The training thread hands it coroutines and gets back ordinary
`concurrent.futures.Future`s, which is exactly what the engine's `Averager` interface returns."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import uvloop


class BackgroundLoop:
    def __init__(self, name: str = "p2pdiloco-net"):
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro, timeout: float):
        """Run a coroutine on the loop and wait for it, at most `timeout` seconds."""
        return self.submit(asyncio.wait_for(coro, timeout)).result(timeout + 1.0)

    def stop(self, timeout: float = 5.0) -> None:
        if not self.loop.is_running():
            return

        async def _cancel_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.submit(_cancel_rest()).result(timeout)
        except Exception:  # leaving must not fail on a task that will not die: the thread is a daemon
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
