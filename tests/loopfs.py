"""A small real ext4 filesystem on a loop device, mounted ``errors=remount-ro`` as Raspberry Pi OS mounts its root,
for the tests of a disk that fails under the gateway. Root only (tests skip otherwise).

Why not a tmpfs remounted read-only: Linux refuses ``mount -o remount,ro`` with EBUSY while a file on it is open for
writing, and SQLite keeps the database open for writing, so that never happens under a running gateway. What does
happen is the kernel turning the filesystem read-only by itself after a disk error: :meth:`Ext4.fail` makes ext4
report an error (its ``trigger_fs_error`` test hook), and with ``errors=remount-ro`` every write then fails with
EROFS. (On Linux >= 6.x this is ext4's ``emergency_ro``, which the mount flags do not show.) :meth:`Ext4.shut_down`
is a disk that has stopped answering: every write fails with EIO (``EXT4_IOC_SHUTDOWN``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
_EXT4_GOING_FLAGS_NOLOGFLUSH = 2


class Ext4:
    def __init__(self, mount_point: Path, device: str):
        self.path = mount_point
        self.device = device

    def fail(self) -> None:
        """An ext4 error, as a bad block would cause: the filesystem turns read-only (errors=remount-ro)."""
        Path(f"/sys/fs/ext4/{Path(self.device).name}/trigger_fs_error").write_text("test: disk error\n")

    def shut_down(self) -> None:
        """The disk stops: every write fails with EIO from now on."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, struct.pack("I", _EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def remount(self) -> None:
        """Unmount and mount again: writable, as after the technician's fix (the journal is replayed)."""
        _run("umount", str(self.path))
        _run("mount", "-t", "ext4", "-o", "loop,errors=remount-ro", str(self.image), str(self.path))
        self.device = _source(self.path)

    @property
    def image(self) -> Path:
        return self.path.parent / f"{self.path.name}.img"


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _source(mount_point: Path) -> str:
    done = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount_point)], capture_output=True, text=True)
    return done.stdout.strip()


@contextmanager
def ext4(mount_point: Path, size: int = 32 * 1024 * 1024) -> Iterator[Ext4]:
    """``mount_point`` (created) on a fresh ext4 of ``size`` bytes; unmounted, and its loop device freed, after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root (CI runs these as root)")
    if shutil.which("mkfs.ext4") is None or shutil.which("findmnt") is None:
        pytest.skip("mkfs.ext4 or findmnt is missing")
    mount_point.mkdir()
    image = mount_point.parent / f"{mount_point.name}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 filesystem here: {made.stderr.strip()}")
    # -o loop sets autoclear: the loop device is freed when the filesystem is unmounted.
    done = subprocess.run(
        ["mount", "-t", "ext4", "-o", "loop,errors=remount-ro", str(image), str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {done.stderr.strip() or done.returncode}")
    fs = Ext4(mount_point, _source(mount_point))
    try:
        if not Path(f"/sys/fs/ext4/{Path(fs.device).name}/trigger_fs_error").exists():
            pytest.skip("this kernel's ext4 has no trigger_fs_error")
        os.chmod(mount_point, 0o750)
        yield fs
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)  # a process still holds a file
        image.unlink(missing_ok=True)
