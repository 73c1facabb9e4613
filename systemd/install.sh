#!/usr/bin/env bash
# Install gatewayd as a systemd service on Raspberry Pi OS / Debian: sections 1-5 of docs/install-pi.md in one
# go. Run as root from the clone in /opt/gatewayd:
#
#   git clone <gatewayd repository URL> /opt/gatewayd && /opt/gatewayd/systemd/install.sh
#
# Safe to run again (after an update, say): it never overwrites /etc/gatewayd/config.toml or an installed udev
# rules file, and it re-installs the code and the unit. It enables the service but does not start it: edit the
# configuration first (docs/install-pi.md, section 3), then `systemctl start gatewayd`.
set -euo pipefail

DEST=/opt/gatewayd
USER_NAME=gatewayd
STATE=/var/lib/gatewayd
ETC=/etc/gatewayd
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf 'gatewayd install: %s\n' "$*"; }
die() { printf 'gatewayd install: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"
[ "$SRC" = "$DEST" ] || die "the unit runs $DEST/.venv/bin/gatewayd: clone the repository to $DEST and run $DEST/systemd/install.sh"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "gatewayd needs Python 3.11 or newer (Raspberry Pi OS Bookworm has it)"

# --- 1. packages, groups, user ----------------------------------------------------------------------------------
packages=()
python3 -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv)
# lgpio is gpiozero's pin library on a Pi (the only one that works on a Pi 5); the Raspberry Pi archive has it,
# plain Debian does not. Without it, GPIO devices are unavailable and everything else works.
if ! python3 -c 'import lgpio' 2>/dev/null && apt-cache show python3-lgpio >/dev/null 2>&1; then
    packages+=(python3-lgpio)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    say "installing ${packages[*]}"
    apt-get install -y -qq "${packages[@]}"
fi
# Raspberry Pi OS has both groups; on plain Debian gpio is missing, and the udev rules give it the GPIO chips.
for group in dialout gpio; do
    getent group "$group" >/dev/null || { say "creating group $group"; groupadd --system "$group"; }
done
if id "$USER_NAME" >/dev/null 2>&1; then
    usermod --append --groups dialout,gpio "$USER_NAME"
else
    say "creating user $USER_NAME"
    # No home directory here: systemd creates $STATE (StateDirectory=) owned by the user on the first start.
    useradd --system --home "$STATE" --no-create-home --shell /usr/sbin/nologin --groups dialout,gpio "$USER_NAME"
fi

# --- 2. code ----------------------------------------------------------------------------------------------------
# --system-site-packages: the venv sees python3-lgpio; what pip installs into the venv still comes first.
[ -x "$DEST/.venv/bin/python" ] || python3 -m venv --system-site-packages "$DEST/.venv"
say "installing the code into $DEST/.venv"
"$DEST/.venv/bin/pip" install -q --upgrade pip
"$DEST/.venv/bin/pip" install -q "$DEST"

# --- 3. configuration -------------------------------------------------------------------------------------------
install -d -m 0755 "$ETC"
if [ ! -e "$ETC/config.toml" ]; then
    say "installing $ETC/config.toml (simulated hardware until you edit it)"
    # Relative paths in the file are relative to the file: point them at the code and the state directory.
    sed -e "s|^data_dir = \"./var\"|data_dir = \"$STATE\"|" \
        -e "s|\"\\./hardware/|\"$DEST/hardware/|" \
        "$DEST/config.toml" >"$ETC/config.toml.new"
    chown root:"$USER_NAME" "$ETC/config.toml.new"
    chmod 0640 "$ETC/config.toml.new"
    mv "$ETC/config.toml.new" "$ETC/config.toml"
fi

# --- 4. udev rules ----------------------------------------------------------------------------------------------
rules=/etc/udev/rules.d/99-gatewayd.rules
if [ ! -e "$rules" ]; then
    say "installing $rules (edit its <EDIT_ME> values for short port names; the GPIO lines work as they are)"
    install -D -m 0644 "$DEST/hardware/udev/99-gatewayd.rules" "$rules"
fi
if udevadm control --ping >/dev/null 2>&1; then
    udevadm control --reload && udevadm trigger
fi

# --- 5. systemd unit --------------------------------------------------------------------------------------------
install -D -m 0644 "$DEST/systemd/gatewayd.service" /etc/systemd/system/gatewayd.service
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable gatewayd
fi

# The daemon's own user must be able to read the configuration and the profiles.
runuser -u "$USER_NAME" -- "$DEST/.venv/bin/gatewayd" check-config "$ETC/config.toml"
say "done. Edit $ETC/config.toml (docs/install-pi.md, section 3), then: systemctl start gatewayd"
