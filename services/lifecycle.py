"""Process lifecycle shared by the service, the realtime gateway and `moss-speech up`."""

from __future__ import annotations

import asyncio
import contextlib
import signal


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT (where the loop can install handlers: not on Windows)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
