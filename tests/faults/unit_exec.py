"""Start a unit's ExecStart the way systemd would, minus the sandbox: StateDirectory= created and owned by User=,
User=/Group=/SupplementaryGroups=, WorkingDirectory=, UMask=, Environment= and EnvironmentFile=, NOTIFY_SOCKET.
Waits for READY=1, asks the HTTP API what it sees, stops it with SIGTERM and prints one JSON report.

Used by test_install.py inside a private mount namespace where systemd/install.sh has run; run as root:
``python unit_exec.py /etc/systemd/system/gatewayd.service``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.test_systemd_unit import parse_unit


def env_file(path: str) -> dict[str, str]:
    optional = path.startswith("-")
    file = Path(path.lstrip("-"))
    if not file.exists():
        assert optional, f"EnvironmentFile {file} is missing"
        return {}
    out = {}
    for line in file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def main(unit_path: str) -> dict[str, Any]:
    service = parse_unit(Path(unit_path).read_text(encoding="utf-8"))["Service"]
    user = pwd.getpwnam(service["User"][-1])
    group = grp.getgrnam(service["Group"][-1])
    extra = [grp.getgrnam(name).gr_gid for value in service["SupplementaryGroups"] for name in value.split()]

    state = Path("/var/lib") / service["StateDirectory"][-1]
    state.mkdir(mode=int(service["StateDirectoryMode"][-1], 8), exist_ok=True)
    os.chown(state, user.pw_uid, group.gr_gid)

    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name, "LANG": "C.UTF-8"}
    for value in service.get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    for value in service.get("EnvironmentFile", []):
        env.update(env_file(value))

    sock_dir = tempfile.mkdtemp(prefix="notify-")
    notify = Path(sock_dir) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    os.chmod(sock_dir, 0o755)
    os.chmod(notify, 0o777)  # systemd's notify socket is writable by the service's user too
    env["NOTIFY_SOCKET"] = str(notify)

    umask = int(service["UMask"][-1], 8)
    workdir = service["WorkingDirectory"][-1]
    argv = shlex.split(service["ExecStart"][-1])

    def become() -> None:
        os.setgroups(extra)
        os.setgid(group.gr_gid)
        os.setuid(user.pw_uid)
        os.umask(umask)

    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, cwd=workdir, preexec_fn=become, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    report: dict[str, Any] = {"argv": argv, "state_dir": str(state)}
    sock.settimeout(0.5)
    ready = False
    while time.monotonic() - started < 60 and proc.poll() is None and not ready:
        try:
            ready = b"READY=1" in sock.recv(4096)
        except TimeoutError:
            pass
    report["ready"] = ready
    report["ready_s"] = round(time.monotonic() - started, 3)
    if ready:
        url = f"http://127.0.0.1:{env.get('GATEWAYD_HTTP__PORT', '8080')}"
        with urllib.request.urlopen(f"{url}/api/v1/devices", timeout=10) as resp:
            devices = json.loads(resp.read())
        items = devices["devices"] if isinstance(devices, dict) else devices
        report["devices"] = {d["name"]: d.get("available") for d in items}
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
            report["healthz"] = resp.status
        status = Path(f"/proc/{proc.pid}/status").read_text()
        ids = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status.splitlines()}
        report["uid"] = int(ids["Uid"][0])
        report["groups"] = sorted(grp.getgrgid(int(g)).gr_name for g in ids["Groups"])
        proc.send_signal(signal.SIGTERM)
    try:
        report["exit"] = proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        report["exit"] = "killed"
    assert proc.stdout is not None
    report["output_tail"] = proc.stdout.read().decode(errors="replace").splitlines()[-15:]
    files = {}
    for path in sorted(state.iterdir()):
        st = path.stat()
        owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
        files[path.name] = f"{owner} {stat.filemode(st.st_mode)}"
    report["files"] = files
    st = state.stat()
    report["state_mode"] = f"{pwd.getpwuid(st.st_uid).pw_name} {oct(st.st_mode & 0o7777)}"
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
