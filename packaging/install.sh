#!/bin/sh
# Installs a defib bundle: binaries, systemd units, the defib system user, example
# configurations and docs. Idempotent: run it again to upgrade; an existing
# configuration is never overwritten (the new example goes beside it as *.example).
#
#   ./install.sh [--root DIR] [--prefix /usr/local] [--no-reload]
#
# --root installs into DIR as if it were / (an image, a chroot, a test); nothing is
# started. Afterwards: put the cluster key in /etc/defib/cluster.key, edit
# /etc/defib/watchdog.toml (KVM hosts) or /etc/defib/controller.toml (controller), then
# `systemctl enable --now defib-watchdog` or `defib-controller`.
set -eu

ROOT=""
PREFIX=/usr/local
RELOAD=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --no-reload) RELOAD=no; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 64 ;;
    esac
done
ROOT="${ROOT%/}"
HERE="$(cd "$(dirname "$0")" && pwd)"
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

say() { echo "install.sh: $*"; }

# The defib user and group, from the shipped sysusers.d file.
install -D -m 0644 "$HERE/sysusers.d/defib.conf" "$ROOT/usr/lib/sysusers.d/defib.conf"
if command -v systemd-sysusers >/dev/null 2>&1; then
    mkdir -p "$ROOT/etc"
    if [ -n "$ROOT" ]; then
        systemd-sysusers --root="$ROOT" "$ROOT/usr/lib/sysusers.d/defib.conf"
    else
        systemd-sysusers /usr/lib/sysusers.d/defib.conf
    fi
elif [ -z "$ROOT" ]; then
    getent group defib >/dev/null || groupadd --system defib
    getent passwd defib >/dev/null || useradd --system --gid defib \
        --home-dir /var/lib/defib-controller --shell /usr/sbin/nologin defib
else
    echo "install.sh: --root needs systemd-sysusers to create the defib user" >&2
    exit 1
fi
# Numeric ids from the target's own files (the host's may differ under --root).
DEFIB_GID="$(awk -F: '$1 == "defib" { print $3 }' "$ROOT/etc/group")"
DEFIB_UID="$(awk -F: '$1 == "defib" { print $3 }' "$ROOT/etc/passwd")"
[ -n "$DEFIB_UID" ] && [ -n "$DEFIB_GID" ] || { echo "install.sh: no defib user in $ROOT/etc/passwd" >&2; exit 1; }

# Binaries: replaced atomically (a running daemon keeps its old inode).
for bin in defib-watchdog defib-controller defibctl; do
    install -D -m 0755 "$HERE/bin/$bin" "$ROOT$PREFIX/bin/.$bin.new"
    mv -f "$ROOT$PREFIX/bin/.$bin.new" "$ROOT$PREFIX/bin/$bin"
done

# Units, with the binaries' prefix.
for unit in defib-watchdog.service defib-controller.service; do
    mkdir -p "$ROOT/etc/systemd/system"
    sed "s#/usr/local/bin/#$PREFIX/bin/#g" "$HERE/systemd/$unit" > "$ROOT/etc/systemd/system/.$unit.new"
    chmod 0644 "$ROOT/etc/systemd/system/.$unit.new"
    mv -f "$ROOT/etc/systemd/system/.$unit.new" "$ROOT/etc/systemd/system/$unit"
done

# Configuration: created once, never overwritten.
install -d -m 0750 "$ROOT/etc/defib"
chown "0:$DEFIB_GID" "$ROOT/etc/defib"
for conf in watchdog.toml controller.toml; do
    install -m 0640 "$HERE/config/$conf" "$ROOT/etc/defib/$conf.example"
    chown "0:$DEFIB_GID" "$ROOT/etc/defib/$conf.example"
    if [ -e "$ROOT/etc/defib/$conf" ]; then
        say "kept the existing /etc/defib/$conf (new example: $conf.example)"
    else
        install -m 0640 "$HERE/config/$conf" "$ROOT/etc/defib/$conf"
        chown "0:$DEFIB_GID" "$ROOT/etc/defib/$conf"
        say "created /etc/defib/$conf"
    fi
done

# State directories (the units' StateDirectory= creates them too; made here so a
# --root image has them with the right owners).
install -d -m 0700 "$ROOT/var/lib/defib-watchdog"
install -d -m 0750 "$ROOT/var/lib/defib-controller"
chown "$DEFIB_UID:$DEFIB_GID" "$ROOT/var/lib/defib-controller"

# Docs and the Grafana dashboard.
install -d -m 0755 "$ROOT$PREFIX/share/doc/defib"
for f in "$HERE"/docs/*.md; do install -m 0644 "$f" "$ROOT$PREFIX/share/doc/defib/"; done
install -D -m 0644 "$HERE/grafana/defib.json" "$ROOT$PREFIX/share/defib/grafana/defib.json"

if [ -z "$ROOT" ] && [ "$RELOAD" = yes ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
[ -e "$ROOT/etc/defib/cluster.key" ] || say "next: put the cluster's key in /etc/defib/cluster.key (mode 0600; owner root for the watchdog, defib for the controller)"
[ -e "$ROOT/etc/defib/api.token" ] || say "next, on the controller host: put the API's bearer token in /etc/defib/api.token (openssl rand -hex 32; mode 0600, owner defib): the controller refuses to start without it"
say "installed defib $(cat "$HERE/VERSION") into ${ROOT:-/}"
