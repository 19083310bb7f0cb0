"""``/dev/hast/<name>`` on Linux: the primary's NBD export as a local block device.

FreeBSD's hastd creates ``/dev/hast/<name>`` when a resource becomes primary.
With ``hastd --dev-dir DIR`` carpool does the same: it attaches the export
through ``nbdfuse`` (a file backed by the NBD socket) and a loop device with
direct I/O, and makes ``DIR/<name>`` a symlink to that loop device, so that
``fsck -y /dev/hast/pgdata`` and ``mount /dev/hast/pgdata /data`` work as in
the guide. Leaving the primary role detaches it again; a device still in use
(mounted) refuses the role change, as an open GEOM provider would.

This module only runs those commands; where the kernel has the nbd module,
``nbd-client -unix`` does the same job without FUSE (see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from carpool.errors import CarpoolError

log = logging.getLogger("carpool.hastd")

ATTACH_TIMEOUT = 20.0


class DeviceError(CarpoolError):
    """The device could not be attached or detached."""


@dataclass
class AttachedDevice:
    name: str
    link: Path  #: DIR/<name>, the symlink
    loop: str  #: /dev/loopN
    fuse_dir: Path
    nbdfuse: asyncio.subprocess.Process
    #: hastd's own descriptor of the loop device. With it open, ``losetup -d`` only
    #: marks the device autoclear: the kernel releases it when the last user closes
    #: it, so a hastd that dies (or a node that crashes with the filesystem mounted)
    #: never leaves a loop device bound to a dead FUSE file.
    holder_fd: int = -1

    def in_use(self) -> bool:
        """Whether something holds the device open exclusively (a mounted filesystem)."""
        try:
            fd = os.open(self.loop, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as error:
            return error.errno == errno.EBUSY
        os.close(fd)
        return False


async def _run(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise DeviceError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
    return out.decode().strip()


async def attach(name: str, socket: Path, dev_dir: Path, fuse_dir: Path) -> AttachedDevice:
    """nbdfuse on ``socket``, a loop device on its file, ``dev_dir/name`` pointing at it."""
    fuse_dir.mkdir(parents=True, exist_ok=True)
    dev_dir.mkdir(parents=True, exist_ok=True)
    try:
        nbdfuse = await asyncio.create_subprocess_exec(
            "nbdfuse", str(fuse_dir), "--unix", str(socket),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except FileNotFoundError:
        raise DeviceError("nbdfuse is not installed (Debian package libnbd-bin)") from None
    image = fuse_dir / "nbd"
    deadline = time.monotonic() + ATTACH_TIMEOUT
    loop_device = ""
    try:
        while not image.exists():
            if nbdfuse.returncode is not None or time.monotonic() > deadline:
                raise DeviceError(f"nbdfuse did not attach {socket}")
            await asyncio.sleep(0.05)
        loop_device = await _run("losetup", "--direct-io=on", "--show", "-f", str(image))
        holder_fd = os.open(loop_device, os.O_RDONLY | os.O_CLOEXEC)
        await _run("losetup", "-d", loop_device)  # busy (we hold it): becomes autoclear
        link = dev_dir / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(loop_device)
    except BaseException:
        if loop_device:
            with contextlib.suppress(DeviceError):
                await _run("losetup", "-d", loop_device)
        await _stop(nbdfuse, fuse_dir)
        raise
    log.info("%s: attached as %s (%s)", name, link, loop_device)
    return AttachedDevice(name, link, loop_device, fuse_dir, nbdfuse, holder_fd)


async def detach(device: AttachedDevice) -> None:
    """Remove the symlink, the loop device and nbdfuse (in that order)."""
    with contextlib.suppress(FileNotFoundError):
        device.link.unlink()
    if device.holder_fd >= 0:
        os.close(device.holder_fd)  # the last user: the autoclear device goes away
        device.holder_fd = -1
    else:
        try:
            await _run("losetup", "-d", device.loop)
        except DeviceError as error:
            log.warning("%s: %s", device.name, error)
    await _stop(device.nbdfuse, device.fuse_dir)
    log.info("%s: detached %s", device.name, device.loop)


async def _stop(nbdfuse: asyncio.subprocess.Process, fuse_dir: Path) -> None:
    if nbdfuse.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            nbdfuse.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(nbdfuse.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                nbdfuse.kill()
            await nbdfuse.wait()
    # nbdfuse does not unmount when it ends: a lazy unmount, whatever state it left.
    with contextlib.suppress(DeviceError):
        await _run("umount", "-l", str(fuse_dir))
