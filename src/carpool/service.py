"""What every carpool daemon does around its own work: control socket, pidfile, metrics, signals.

    async with DaemonShell("devd", run_dir, handlers, bus, registry, metrics) as shell:
        ...start tasks...
        await shell.stopping.wait()

On entry: the run directory, the control socket (``<run-dir>/<name>.sock``), the
pidfile, the optional Prometheus endpoint, SIGTERM/SIGINT setting ``stopping`` and
SIGHUP calling ``on_hup``. On exit all of it is undone, also after an error.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from carpool.errors import CarpoolError

if TYPE_CHECKING:
    import asyncio

    from prometheus_client import CollectorRegistry

    from carpool.control import Handler
    from carpool.events import EventBus
    from carpool.metrics import MetricsServer

# asyncio, prometheus_client and the control/metrics modules are imported where
# they are used, so that a command needing only run_command (zfs-replicate run
# from cron, the *ctl tools) does not pay for them at start-up.


class DaemonShell:
    def __init__(
        self,
        name: str,
        run_dir: Path,
        handlers: Mapping[str, Handler],
        bus: EventBus,
        registry: CollectorRegistry,
        metrics_address: str | None = None,
        on_hup: Callable[[], None] | None = None,
    ) -> None:
        import asyncio

        from carpool.control import ControlServer, socket_path

        self.name = name
        self.run_dir = run_dir
        self.server = ControlServer(socket_path(run_dir, name), handlers, bus, name)
        self.registry = registry
        self.metrics_address = metrics_address
        self.on_hup = on_hup
        self.metrics: MetricsServer | None = None
        self.stopping: asyncio.Event = asyncio.Event()

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    async def __aenter__(self) -> DaemonShell:
        import asyncio
        import signal

        from carpool.control import write_pidfile
        from carpool.metrics import start_metrics_server

        loop = asyncio.get_running_loop()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await self.server.start()
        write_pidfile(self.pidfile)
        if self.metrics_address:
            self.metrics = start_metrics_server(self.metrics_address, self.registry)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        if self.on_hup is not None:
            loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.server.close()
        if self.metrics is not None:
            self.metrics.close()
        with contextlib.suppress(OSError):
            self.pidfile.unlink()


def run_command(program: str, body: Callable[[], int]) -> int:
    """Run a command's ``body``: a CarpoolError becomes one line on stderr and exit status 1
    (no traceback for a wrong file or a refused command); Ctrl-C ends it quietly."""
    try:
        return body()
    except CarpoolError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
