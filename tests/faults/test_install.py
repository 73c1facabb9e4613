"""The Pi install steps work: systemd/install.sh (sections 1-5 of docs/install-pi.md) run for real, as root, at the
real paths (/opt/gatewayd, /etc/gatewayd, /var/lib/gatewayd, /etc/systemd/system, /etc/udev/rules.d), inside a
private mount namespace whose /etc, /opt and /var/lib are copy-on-write overlays, so this machine is left as it was.

Then, as systemd would start the unit (minus the sandbox, which needs a running systemd; the sandbox itself is
checked by test_systemd_unit.py): the state directory created for the gatewayd user, the daemon running as that user
with the unit's groups, environment and umask, READY=1 sent, every device up, and a clean stop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="installs a user and system files: needs root")

INSIDE = r"""
set -euo pipefail
for d in etc opt var/lib; do
    mkdir -p "$WORK/upper/$d" "$WORK/work/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$WORK/upper/$d,workdir=$WORK/work/$d" "/$d"
done
# The clone: the project's files as they are in this checkout.
mkdir -p /opt/gatewayd
(cd "$SRC" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t /opt/gatewayd)
rm -rf /etc/gatewayd /etc/udev/rules.d/99-gatewayd.rules /etc/systemd/system/gatewayd.service
userdel gatewayd 2>/dev/null || true

# As root on a Pi: the system's python3, not a developer's pyenv under /root (which the gatewayd user cannot read).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
/opt/gatewayd/systemd/install.sh > "$WORK/install.log" 2>&1
/opt/gatewayd/systemd/install.sh > "$WORK/install-again.log" 2>&1  # a second run changes nothing and succeeds

id gatewayd > "$WORK/id.txt"
stat -c '%U:%G %a' /etc/gatewayd/config.toml > "$WORK/config-stat.txt"
udevadm test /sys/class/tty/tty0 > "$WORK/udev.txt" 2>&1 || true
unit=/etc/systemd/system/gatewayd.service
systemd-analyze verify "$unit" > "$WORK/verify.txt" 2>&1 || echo "exit $?" >> "$WORK/verify.txt"
# Site settings go in the EnvironmentFile, as the guide says: here, free ports instead of 8080 and 1883.
install -m 0600 /dev/null /etc/gatewayd/gatewayd.env
printf 'GATEWAYD_HTTP__PORT=%s\nGATEWAYD_MQTT__PORT=%s\n' "$HTTP_PORT" "$MQTT_PORT" >> /etc/gatewayd/gatewayd.env
"$PY" "$SRC/tests/faults/unit_exec.py" /etc/systemd/system/gatewayd.service > "$WORK/run.json"
"""


@needs_root
@pytest.mark.timeout(600)
def test_install_script_sets_up_user_groups_config_udev_and_unit_and_the_daemon_runs_as_systemd_starts_it(
    tmp_path: Path,
) -> None:
    if shutil.which("unshare") is None or shutil.which("systemd-analyze") is None:
        pytest.skip("needs unshare (util-linux) and systemd-analyze")
    work = tmp_path / "install"
    work.mkdir()
    env = {
        **os.environ,
        "WORK": str(work),
        "SRC": str(ROOT),
        "PY": str(Path(os.sys.executable)),
        "HTTP_PORT": str(free_port()),
        "MQTT_PORT": str(free_port()),
    }
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", INSIDE],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(work.glob("*.log")) if p.is_file()
    )
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{logs}"
    # The machine itself is untouched: no user, no files outside the overlays.
    assert subprocess.run(["id", "gatewayd"], capture_output=True, check=False).returncode != 0
    assert not Path("/opt/gatewayd").exists() and not Path("/etc/gatewayd").exists()

    # User and device groups.
    ident = (work / "id.txt").read_text()
    assert "(dialout)" in ident and "(gpio)" in ident, ident
    # The configuration: readable by the daemon's group only, and it checks (install.sh ran check-config as the
    # gatewayd user and printed its verdict).
    assert (work / "config-stat.txt").read_text().split() == ["root:gatewayd", "640"]
    install_log = (work / "install.log").read_text()
    assert "/etc/gatewayd/config.toml: ok" in install_log, install_log
    assert "creating user gatewayd" in install_log
    again = (work / "install-again.log").read_text()
    assert "creating user" not in again and "installing /etc/gatewayd/config.toml" not in again, again
    # udev parses our rules with no complaint (an unknown key, or the gpio group missing, is reported per line).
    udev = (work / "udev.txt").read_text()
    assert "Reading rules file: /etc/udev/rules.d/99-gatewayd.rules" in udev, udev[-2000:]
    complaints = [line for line in udev.splitlines() if "99-gatewayd.rules:" in line]
    assert complaints == [], complaints
    # systemd accepts the installed unit, whose ExecStart now exists.
    verify = (work / "verify.txt").read_text()
    assert [line for line in verify.splitlines() if "gatewayd.service" in line or line.startswith("exit")] == []

    # Started as systemd would: as gatewayd with dialout and gpio, READY sent, devices up, state files private.
    run = json.loads((work / "run.json").read_text())
    assert run["ready"], run
    assert run["argv"] == ["/opt/gatewayd/.venv/bin/gatewayd", "run", "--config", "/etc/gatewayd/config.toml"]
    assert run["healthz"] == 200
    assert run["devices"] and all(run["devices"].values()), run["devices"]
    assert {"dialout", "gpio"} <= set(run["groups"]) and run["uid"] != 0, run
    assert run["exit"] == 0, run["output_tail"]
    assert run["state_mode"] == "gatewayd 0o750"
    database = run["files"]["gatewayd.sqlite3"]
    assert database == "gatewayd:gatewayd -rw-r-----", run["files"]
    print(f"\ninstall: READY {run['ready_s']} s after start; files {run['files']}")
