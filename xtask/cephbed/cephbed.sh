#!/usr/bin/env bash
# cephbed: defib's real Ceph test bed (run it through `cargo xtask cephbed ...`).
# A single-node Ceph 16.2 from Debian's packages, entirely in userspace: 1 mon, 1 mgr,
# 1 OSD whose bluestore is a sparse FILE (no loop device, LVM or kernel rbd: this
# kernel has none of them), pool `volumes` of size 1, a `client.cinder` with the usual
# `profile rbd` caps. qemu reaches images through its own librbd driver
# (qemu-block-extra). Adapted from ../shared/testbed/cephbed/recipe.sh (Ceph part).
#
#   cephbed.sh install   apt packages (idempotent: nothing to do when present)
#   cephbed.sh start     bootstrap on first run (fsid, keys, monmap, mkfs, pool), start
#                        mon + mgr + osd (PIDs in $B/pids), wait for HEALTH_OK with an
#                        available mgr and every PG active+clean. Nothing to do when
#                        it runs.
#   cephbed.sh stop      SIGTERM exactly the recorded PIDs (SIGCONT first), wait
#   cephbed.sh status    what runs (exit 3: not running)
#   cephbed.sh env       what a client needs (CEPH_CONF, pool, ids)
#   cephbed.sh wipe      stop + delete the cluster (a fresh one next start)
#
# Everything lives under $B (default /var/lib/defib-cephbed) and listens on 127.0.0.1
# only, on ports below 32768 (outside the kernel's ephemeral range, where an outgoing
# connection can hold a port for a moment): mon v2 23300, v1 26789, OSD/mgr 26800-26899.
# Nothing is written to /etc/ceph: tools and librados find the cluster through
# CEPH_CONF=$B/etc/ceph.conf (qemu: `conf=` in the rbd: filename).
set -euo pipefail

B=${CEPHBED:-/var/lib/defib-cephbed}
C=$B/etc/ceph.conf
export CEPH_CONF=$C
MON_V2=23300
MON_V1=26789
PORT_MIN=26800
PORT_MAX=26899
OSD_GB=20          # sparse: real usage grows with the data written
POOL=volumes
PIDS=$B/pids

log() { printf '[cephbed %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
record() { echo "$1 $2" >> "$PIDS"; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local n=$1 what=$2; shift 2
  local end=$((SECONDS + n))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= end )); then log "timeout waiting for $what"; return 1; fi
    sleep 0.5
  done
}
APT=(apt-get -o DPkg::Lock::Timeout=600)

installed() {
  command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null &&
    command -v ceph-mgr >/dev/null && command -v rbd >/dev/null &&
    [ -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ]
}

do_install() {
  if installed; then return 0; fi
  local t0=$SECONDS
  for _ in $(seq 1 30); do "${APT[@]}" update -q && break; sleep 10; done
  # qemu-block-extra is qemu's rbd driver (block-rbd.so); it must match qemu-system
  # (bookworm's 7.2, as the hostbed installs it).
  DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -q --no-install-recommends \
    ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra uuid-runtime
  log "installed in $((SECONDS - t0)) s"
}

write_conf() {
  local fsid; fsid=$(cat "$B/etc/fsid")
  mkdir -p "$B"/{etc,run,log,crash,data}
  cat > "$C" <<EOF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$MON_V2,v1:127.0.0.1:$MON_V1]
public_network = 127.0.0.0/8
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
ms_bind_port_min = $PORT_MIN
ms_bind_port_max = $PORT_MAX
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = $B/run
crash_dir = $B/crash
admin_socket = $B/run/\$cluster-\$name.asok
log_file = $B/log/\$cluster-\$name.log
mon_cluster_log_file = $B/log/\$cluster.log
pid_file = $B/run/\$name.pid
# One OSD: pools of size 1, PGs placed on OSDs (not hosts), no redundancy warnings.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 16
osd_pool_default_pgp_num = 16
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_allow_pool_delete = true
# A shared root file system may have less than 30 % free: MON_DISK_LOW would spoil
# HEALTH_OK.
mon_data_avail_warn = 2
mon_data_avail_crit = 1
[mon]
mon_data = $B/data/mon-\$id
keyring = $B/data/mon-\$id/keyring
mon_memory_target = 268435456
[mgr]
mgr_data = $B/data/mgr-\$id
keyring = $B/data/mgr-\$id/keyring
[osd]
osd_data = $B/data/osd-\$id
keyring = $B/data/osd-\$id/keyring
osd_objectstore = bluestore
# bluestore on a plain sparse file osd_data/block, created by --mkfs
bluestore_block_create = true
bluestore_block_size = $((OSD_GB * 1024 * 1024 * 1024))
osd_memory_target = 939524096
osd_memory_base = 268435456
osd_memory_cache_min = 67108864
[client]
keyring = $B/etc/\$cluster.\$name.keyring
# One admin socket and log per client process (qemu, the rbd CLI, ...).
admin_socket = $B/run/\$cluster-\$name.\$pid.asok
log_file = $B/log/\$cluster-\$name.\$pid.log
EOF
}

bootstrap_mon() {
  mkdir -p "$B/etc"
  uuidgen > "$B/etc/fsid"
  write_conf
  local K=$B/etc
  ceph-authtool --create-keyring "$K/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$K/ceph.client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$K/mon.keyring" --import-keyring "$K/ceph.client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$(cat "$K/fsid")" --addv a "[v2:127.0.0.1:$MON_V2,v1:127.0.0.1:$MON_V1]" \
    --set-min-mon-release pacific "$K/monmap" >/dev/null
  mkdir -p "$B/data/mon-a"
  ceph-mon -c "$C" --cluster ceph --mkfs -i a --monmap "$K/monmap" --keyring "$K/mon.keyring"
}

bootstrap_rest() {   # with the mon running: the mgr's key, the OSD (mkfs on a file)
  mkdir -p "$B/data/mgr-x"
  ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    > "$B/data/mgr-x/keyring"
  local uuid secret id
  uuid=$(uuidgen); secret=$(ceph-authtool --gen-print-key)
  id=$(echo "{\"cephx_secret\": \"$secret\"}" | ceph osd new "$uuid" -i -)
  mkdir -p "$B/data/osd-$id"
  ceph-authtool --create-keyring "$B/data/osd-$id/keyring" --name "osd.$id" --add-key "$secret" >/dev/null
  ceph-osd -c "$C" -i "$id" --mkfs --osd-uuid "$uuid" > "$B/log/osd-mkfs.log" 2>&1
  echo "$id" > "$B/etc/osd_id"
}

bootstrap_pool() {
  ceph osd pool create $POOL 16 16 replicated --size 1 >/dev/null 2>&1 ||
    ceph osd pool create $POOL 16 16 >/dev/null
  ceph osd pool application enable $POOL rbd >/dev/null
  rbd pool init $POOL
  # What a hypervisor's qemu uses: the usual "profile rbd" caps.
  ceph auth get-or-create client.cinder mon 'profile rbd' osd "profile rbd pool=$POOL" \
    mgr "profile rbd pool=$POOL" > "$B/etc/ceph.client.cinder.keyring"
  touch "$B/etc/bootstrapped"
}

# HEALTH_OK alone is not enough right after a restart: the mon still believes in the
# old mgr and the old PG states for a few seconds.
health_ok() {
  ceph health 2>/dev/null | grep -q '^HEALTH_OK' &&
    ceph mgr stat 2>/dev/null | grep -q '"available": true' &&
    ceph pg stat 2>/dev/null | grep -qE '^[0-9]+ pgs: [0-9]+ active\+clean;'
}
osd_up() { ceph osd dump 2>/dev/null | grep -qE '^osd\.[0-9]+ up +in'; }

# Whether the recorded pid still runs the recorded daemon of this bed.
ours() { grep -qa "$B" "/proc/$1/cmdline" 2>/dev/null; }

running() {
  [ -s "$PIDS" ] || return 1
  local pid name
  while read -r pid name; do ours "$pid" || return 1; done < "$PIDS"
}

do_start() {
  local t0=$SECONDS
  mkdir -p "$B"
  if running && timeout 10 ceph health >/dev/null 2>&1; then
    log "already running"
    return 0
  fi
  # Something half up (a daemon died): start from a clean slate.
  do_stop
  # A bootstrap cut short is redone from scratch.
  if [ -f "$B/etc/fsid" ] && [ ! -f "$B/etc/bootstrapped" ]; then
    rm -rf "$B/etc" "$B/data" "$B/run" "$B/log"
  fi
  local first=0
  if [ ! -f "$B/etc/fsid" ]; then first=1; bootstrap_mon; else write_conf; fi
  : > "$PIDS"
  nohup ceph-mon -f -c "$C" --cluster ceph -i a > "$B/log/mon.out" 2>&1 &
  record $! ceph-mon.a
  wait_for 60 "the mon" timeout 5 ceph mon stat
  if [ $first = 1 ]; then bootstrap_rest; fi
  local id; id=$(cat "$B/etc/osd_id")
  nohup ceph-mgr -f -c "$C" -i x > "$B/log/mgr.out" 2>&1 &
  record $! ceph-mgr.x
  nohup ceph-osd -f -c "$C" -i "$id" > "$B/log/osd.out" 2>&1 &
  record $! "ceph-osd.$id"
  wait_for 120 "the OSD up" osd_up
  if [ $first = 1 ]; then bootstrap_pool; fi
  if wait_for 180 "HEALTH_OK" health_ok; then
    log "HEALTH_OK $((SECONDS - t0)) s after start"
  else
    ceph health detail >&2 || true
    return 1
  fi
}

do_stop() {
  [ -f "$PIDS" ] || return 0
  local pid name
  tac "$PIDS" | while read -r pid name; do
    if ours "$pid"; then
      kill -CONT "$pid" 2>/dev/null || true   # a SIGSTOPped daemon would never exit
      kill "$pid" 2>/dev/null && log "stopped $pid ($name)" || true
    fi
  done
  for _ in $(seq 1 60); do
    local alive=0
    while read -r pid name; do ours "$pid" && alive=1; done < "$PIDS"
    [ $alive = 0 ] && break
    sleep 0.5
  done
  while read -r pid name; do
    if ours "$pid"; then log "$pid ($name) did not stop on SIGTERM: SIGKILL"; kill -9 "$pid" || true; fi
  done < "$PIDS"
  rm -f "$PIDS"
}

do_status() {
  if ! installed; then echo "ceph: not installed"; exit 3; fi
  if ! running; then echo "ceph: not running"; exit 3; fi
  cat "$PIDS"
  timeout 10 ceph -s || exit 3
}

do_env() {
  cat <<EOF
export CEPH_CONF=$C
# admin keyring: $B/etc/ceph.client.admin.keyring; qemu's: $B/etc/ceph.client.cinder.keyring
# pool: $POOL; a qemu disk: file=rbd:$POOL/IMAGE:id=cinder:conf=$C,format=raw
EOF
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env) do_env ;;
  wipe) do_stop; rm -rf "$B" ;;
  *) echo "usage: $0 install|start|stop|status|env|wipe" >&2; exit 64 ;;
esac
