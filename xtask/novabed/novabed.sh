#!/usr/bin/env bash
# novabed: defib's real OpenStack test bed (run it through `cargo xtask novabed ...`).
# A REAL all-in-one Nova 34.0.0 (+ placement 16, glance 33, neutron 29 API + RPC server
# with lab L3 agents that speak Neutron's agent RPC,
# keystone 30, RabbitMQ, MariaDB) on one Debian 12 box, no systemd, no docker.
# Compute hosts are separate nova-compute processes with the fake virt driver, one
# per host name fake-1..fake-N. Adapted from ../shared/testbed/novabed/recipe.sh.
#
#   novabed.sh install     apt + venv/pip (once per machine; nothing to do after)
#   novabed.sh start       configure, init DBs (first time), start everything,
#                          register N fake computes, flavor "1" + image (nothing to
#                          do when it runs)
#   novabed.sh stop        kill exactly the PIDs recorded in $B/pids
#   novabed.sh status      what runs (exit 3: not installed / not running)
#   novabed.sh env         print the headers / endpoints to use
#   novabed.sh mem         RSS/PSS of everything started
#   novabed.sh start-compute N   (re)start nova-compute for host fake-N
#   novabed.sh start-l3-agent N  (re)start the lab L3 agent of host fake-N
#   novabed.sh start-libvirt-compute HOST URI   a new host HOST with Nova's libvirt
#                          driver against the libvirtd at URI (a test's own)
#   novabed.sh restart-libvirt-compute HOST     start HOST's compute again (it returns)
#   novabed.sh remove-compute HOST   delete HOST's servers, stop its compute, delete
#                          its service
#   novabed.sh hbguest-image BOOT_SECTOR   the boot-sector guest as a Glance image
#
# Pinned versions: constraints.txt beside this script (a `pip freeze` of a working venv).
# Everything lives in $B (default /var/lib/defib-novabed) and listens on 127.0.0.1 only.
# Auth, path 1 (no keystone): nova-api (:38774) runs its normal paste pipeline minus
# the keystonemiddleware "authtoken" filter, so nova's own NovaKeystoneContext builds
# the request context from the headers keystonemiddleware would have set:
#   X-User-Id, X-Project-Id, X-Roles (send X-Roles: admin,member,reader).
# placement (:38778): auth_strategy=noauth2 (X-Auth-Token: admin); glance: no-auth
# "unauthenticated-context" pipeline + allow-all policy; neutron: auth_strategy=noauth.
# Auth, path 2 (keystone, as real clouds): keystone (:35000, fernet, admin/admin) whose
# catalog lists a second nova-api (:38775) and placement-api (:38779) that validate
# tokens with keystonemiddleware; $B/data/keystone/appcred.json holds an application
# credential of admin.
set -euo pipefail

B=${NOVABED:-/var/lib/defib-novabed}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
V=$B/venv
NCOMPUTE=${NCOMPUTE:-3}
# novabed_fake.RestartableFakeDriver (written by do_configure into the venv's nova/virt/)
# = nova.virt.fake.FakeDriver with a node uuid that survives a restart.  Per-host capacity:
export NOVABED_FAKE_VCPUS=${NOVABED_FAKE_VCPUS:-64} NOVABED_FAKE_MEMORY_MB=${NOVABED_FAKE_MEMORY_MB:-131072}
export NOVABED_FAKE_DISK_GB=${NOVABED_FAKE_DISK_GB:-2048}
COMPUTE_DRIVER=${COMPUTE_DRIVER:-novabed_fake.RestartableFakeDriver}
RABBIT_PORT=${RABBIT_PORT:-35672}
EPMD_PORT=${EPMD_PORT:-34369}
MYSQL_PORT=${MYSQL_PORT:-33306}
NOVA_PORT=${NOVA_PORT:-38774}
PLACEMENT_PORT=${PLACEMENT_PORT:-38778}
GLANCE_PORT=${GLANCE_PORT:-39292}
NEUTRON_PORT=${NEUTRON_PORT:-39696}
# Keystone, and a second nova-api and placement-api that authenticate with it
KEYSTONE_PORT=${KEYSTONE_PORT:-35000}
NOVA_KS_PORT=${NOVA_KS_PORT:-38775}
PLACEMENT_KS_PORT=${PLACEMENT_KS_PORT:-38779}
DB="mysql+pymysql://os:os@127.0.0.1:$MYSQL_PORT"
PIDS=$B/pids
L=$B/logs

log() { printf '[novabed %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
t_now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$(t_now)"; }

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local n=$1 what=$2; shift 2
  local end=$((SECONDS + n))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= end )); then log "TIMEOUT waiting for $what"; return 1; fi
    sleep 0.5
  done
}

rabbit_env() {
  export HOME=$B/data/rabbitmq
  export RABBITMQ_NODENAME=novabed@localhost
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$RABBIT_PORT
  export RABBITMQ_DIST_PORT=$((RABBIT_PORT + 1))
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_EPMD_PORT=$EPMD_PORT
  export RABBITMQ_MNESIA_BASE=$B/data/rabbitmq/mnesia
  export RABBITMQ_LOG_BASE=$L
  export RABBITMQ_CONFIG_FILE=$B/data/rabbitmq/rabbitmq
  export RABBITMQ_ENABLED_PLUGINS_FILE=$B/data/rabbitmq/enabled_plugins
  export RABBITMQ_CONF_ENV_FILE=$B/data/rabbitmq/rabbitmq-env.conf
  export RABBITMQ_PID_FILE=$B/data/rabbitmq/rabbit.pid
}

record() { echo "$1 $2" >> "$PIDS"; }
port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; }
# Adds the test bed's fixed ports to net.ipv4.ip_local_reserved_ports (idempotent: the
# kernel keeps a set).
reserve_ports() {
  local f=/proc/sys/net/ipv4/ip_local_reserved_ports have
  have=$(cat $f)
  echo "${have:+$have,}$RABBIT_PORT,$((RABBIT_PORT + 1)),$EPMD_PORT,$MYSQL_PORT,$NOVA_PORT,$PLACEMENT_PORT,$GLANCE_PORT,$NEUTRON_PORT,$KEYSTONE_PORT,$NOVA_KS_PORT,$PLACEMENT_KS_PORT" > $f
}

rctl() { ( rabbit_env; /usr/lib/rabbitmq/bin/rabbitmqctl -n novabed@localhost "$@" ); }

# ---------------------------------------------------------------- install
INSTALL_STAMP="nova==34.0.0 placement==16.0.0 glance==33.0.0 neutron==29.0.0 keystone==30.0.0 v1"
installed() { [ "$(cat "$B/installed" 2>/dev/null)" = "$INSTALL_STAMP" ]; }
do_install() {
  if installed; then return 0; fi
  mkdir -p "$B"
  rm -rf "$V"
  local t0; t0=$(t_now)
  # apt: another process may hold the lists lock; retry update, wait on dpkg lock
  for i in $(seq 1 60); do apt-get -o DPkg::Lock::Timeout=600 update -q && break; sleep 10; done
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
    rabbitmq-server mariadb-server mariadb-client
  log "apt done in $(elapsed "$t0") s"
  local t1; t1=$(t_now)
  python3 -m venv "$V"
  "$V/bin/pip" install -q -U pip
  local C=()
  [ -f "$HERE/constraints.txt" ] && C=(-c "$HERE/constraints.txt")
  "$V/bin/pip" install "${C[@]}" nova==34.0.0 openstack-placement==16.0.0 glance==33.0.0 neutron==29.0.0 \
    gunicorn pymysql python-openstackclient
  # neutron 29 / upper-constraints are tested with SQLAlchemy 2.0.x; nova is happy with it too
  "$V/bin/pip" install "${C[@]}" "SQLAlchemy==2.0.52"
  # keystone for the authenticated path (a second nova-api with authtoken)
  "$V/bin/pip" install "${C[@]}" keystone==30.0.0 "SQLAlchemy==2.0.52"
  "$V/bin/pip" check
  echo "$INSTALL_STAMP" > "$B/installed"
  log "pip done in $(elapsed "$t1") s; total install $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- configure
do_configure() {
  mkdir -p $B/{etc/nova,etc/placement,etc/glance,etc/neutron/plugins/ml2,data,logs,run}
  mkdir -p $B/data/{nova/lock,nova/instances,glance/images,glance/staging,glance/tasks,glance/lock,neutron/lock,mysql,rabbitmq}
  mkdir -p $B/run/{nova-api,placement-api,glance-api,neutron-api}

  # --- the fake virt driver, restartable (see the docstring)
  # nova imports compute_driver as nova.virt.<compute_driver>, so the file goes
  # into the venv's nova/virt package (an added file, nothing of nova changed)
  local virt; virt=$($V/bin/python -c 'import os, nova.virt; print(os.path.dirname(nova.virt.__file__))')
  cat > $virt/novabed_fake.py <<'PYEOF'
"""nova's own fake virt driver, made restartable for host-failure drills.

nova.virt.fake.FakeDriver names its compute node uuid with oslo's uuidsentinel,
i.e. a random uuid per process.  A nova-compute that is killed and started again
therefore cannot find its compute node any more: init_host skips the
evacuation cleanup ("Failed to clean allocation of evacuated instance as the
source node fake-1 is not found"), the evacuation migrations stay 'done', and
nova-api refuses forced_down=false for that host.  This subclass derives the
node uuid from the node name (uuid5), exactly like nova's own
PredictableNodeUUIDDriver does for get_available_resource, and also in
get_nodenames_by_uuid.  Capacity per host comes from the environment.
"""
import os
import uuid

from nova.virt import fake


class RestartableFakeDriver(fake.FakeDriver):
    vcpus = int(os.environ.get('NOVABED_FAKE_VCPUS', '64'))
    memory_mb = int(os.environ.get('NOVABED_FAKE_MEMORY_MB', '131072'))
    local_gb = int(os.environ.get('NOVABED_FAKE_DISK_GB', '2048'))

    @staticmethod
    def node_uuid(nodename):
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, nodename))

    def get_available_resource(self, nodename):
        res = super().get_available_resource(nodename)
        res['uuid'] = self.node_uuid(nodename)
        return res

    def get_nodenames_by_uuid(self, refresh=False):
        return {self.node_uuid(n): n for n in self.get_available_nodes()}
PYEOF

  # --- rabbitmq
  echo '[].' > $B/data/rabbitmq/enabled_plugins
  : > $B/data/rabbitmq/rabbitmq-env.conf
  printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\n' "$RABBIT_PORT" > $B/data/rabbitmq/rabbitmq.conf

  # --- mariadb (tuned for a throw-away CI database)
  cat > $B/etc/my.cnf <<EOF
[mysqld]
datadir = $B/data/mysql
socket = $B/data/mysqld.sock
pid-file = $B/data/mysqld.pid
bind-address = 127.0.0.1
port = $MYSQL_PORT
user = root
skip-name-resolve
log-error = $L/mariadb.err
max_connections = 1000
innodb_buffer_pool_size = 128M
innodb_log_file_size = 48M
innodb_flush_log_at_trx_commit = 0
innodb_doublewrite = 0
sync_binlog = 0
character-set-server = utf8mb4
collation-server = utf8mb4_general_ci
[client]
socket = $B/data/mysqld.sock
port = $MYSQL_PORT
EOF

  # --- nova: common file (what nova-compute sees: no DB credentials) ...
  cat > $B/etc/nova/nova.conf <<EOF
[DEFAULT]
transport_url = rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/
state_path = $B/data/nova
compute_driver = $COMPUTE_DRIVER
my_ip = 127.0.0.1
host = controller
debug = False
graceful_shutdown_timeout = 5
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = -1
[placement]
auth_type = admin_token
endpoint = http://127.0.0.1:$PLACEMENT_PORT
token = admin
endpoint_override = http://127.0.0.1:$PLACEMENT_PORT
[neutron]
auth_type = admin_token
endpoint = http://127.0.0.1:$NEUTRON_PORT
token = admin
endpoint_override = http://127.0.0.1:$NEUTRON_PORT
[glance]
endpoint_override = http://127.0.0.1:$GLANCE_PORT
[oslo_concurrency]
lock_path = $B/data/nova/lock
[oslo_messaging_notifications]
driver = noop
[quota]
instances = -1
cores = -1
ram = -1
EOF
  # ... and the DB file for api / conductor / scheduler / nova-manage
  cat > $B/etc/nova/nova-db.conf <<EOF
[api_database]
connection = $DB/nova_api?charset=utf8
[database]
connection = $DB/nova_cell1?charset=utf8
EOF
  # nova-api paste pipeline: the shipped one without keystonemiddleware's authtoken
  sed -e 's/ authtoken keystonecontext/ keystonecontext/' $V/etc/nova/api-paste.ini > $B/etc/nova/api-paste.ini
  for h in $(seq 1 "$NCOMPUTE"); do compute_conf $h; done

  # --- placement
  cat > $B/etc/placement/placement.conf <<EOF
[DEFAULT]
debug = False
[api]
auth_strategy = noauth2
[placement_database]
connection = $DB/placement?charset=utf8
EOF

  # --- glance (file store, no auth)
  cp $V/etc/glance/glance-api-paste.ini $B/etc/glance/
  cat > $B/etc/glance/glance-api.conf <<EOF
[DEFAULT]
debug = False
enabled_backends = fs:file
worker_self_reference_url = http://127.0.0.1:$GLANCE_PORT
image_cache_dir = $B/data/glance/cache
[database]
connection = $DB/glance?charset=utf8
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = $B/data/glance/images
[os_glance_staging_store]
filesystem_store_datadir = $B/data/glance/staging
[os_glance_tasks_store]
filesystem_store_datadir = $B/data/glance/tasks
[paste_deploy]
flavor =
config_file = $B/etc/glance/glance-api-paste.ini
[oslo_policy]
policy_file = $B/etc/glance/policy.yaml
enforce_scope = False
enforce_new_defaults = False
[oslo_concurrency]
lock_path = $B/data/glance/lock
EOF
  "$V/bin/python" - "$B/etc/glance/policy.yaml" <<'EOF'
import sys
from glance.policies import list_rules
with open(sys.argv[1], 'w') as f:
    for r in list_rules():
        f.write('"%s": "@"\n' % r.name)
EOF

  # --- neutron: the API server, an RPC server (agent state reports, the L3 plugin's
  # agent RPC) and small L3 agents (l3_agent_lab.py below), ML2 with no mechanism
  # drivers. Nova needs the API: evacuate/rebuild always list the instance's ports.
  # Agent liveness is Neutron's own, tightened for a test bed: an agent reports every
  # second and is dead after 10 s of silence (Neutron's defaults: 30 s and 75 s).
  # Neutron's own router failover (allow_automatic_l3agent_failover) stays off, its
  # default: moving routers off a dead agent is defib's job here. HA routers keep
  # their VRRP network on a flat physnet (the project has no tenant network types).
  cp $V/etc/neutron/api-paste.ini $B/etc/neutron/
  cat > $B/etc/neutron/neutron.conf <<EOF
[DEFAULT]
debug = False
core_plugin = ml2
service_plugins = router,port_forwarding
auth_strategy = noauth
transport_url = rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/
notify_nova_on_port_status_changes = False
notify_nova_on_port_data_changes = False
state_path = $B/data/neutron
rpc_workers = 1
rpc_state_report_workers = 1
agent_down_time = 10
allow_automatic_l3agent_failover = False
l3_ha_network_type = flat
l3_ha_network_physical_name = l3ha
[AGENT]
report_interval = 1
[quotas]
# tests and benchmarks create hundreds of routers
quota_router = -1
quota_network = -1
quota_port = -1
[database]
connection = $DB/neutron?charset=utf8
[oslo_concurrency]
lock_path = $B/data/neutron/lock
EOF
  # The lab's L3 agent (one process per lab host, `start_l3_agent N` -> host fake-N):
  # Neutron's own RPC, no kernel work. See its docstring.
  cat > $B/etc/neutron/l3_agent_lab.py <<'PYEOF'
"""A lab L3 agent for Neutron: neutron-l3-agent's control plane without its data plane.

It registers and reports state exactly as neutron-l3-agent does: Neutron's own
PluginReportStateAPI (topic q-reports-plugin, agent_type 'L3 agent', binary
neutron-l3-agent, topic l3_agent, start_flag on the first report) every
[AGENT] report_interval, so the agent's liveness in GET /v2.0/agents is Neutron's own
(alive = a report within agent_down_time). It syncs its routers over the L3 plugin's
RPC (get_router_ids, as the real agent's full sync does) on every report, and at once
when Neutron notifies it: like the real agent it serves the l3_agent topic (its host's
queue and the fanout), where router_added_to_agent is an RPC call Neutron waits for.

Its "data plane" is the set of routers it serves, kept in a state file that outlives
the process, as qrouter- namespaces outlive a killed neutron-l3-agent. A restarted
agent first reports what it still holds (routers moved away while it was dead
included: stale), then syncs, dropping every router no longer bound to it (as the
real agent's first full sync deletes the namespaces of routers not scheduled to it;
an agent that is admin-down gets no routers at all), and reports again.

Every change is appended to STATE_FILE.log ("<unix ms> gained|dropped <router>").

    python l3_agent_lab.py HOST NEUTRON_CONF STATE_FILE
"""
import json
import os
import sys
import time

from neutron.agent import rpc as agent_rpc
from neutron.agent.l3.agent import L3PluginApi
from neutron.common import config as common_config
from neutron.conf.agent import common as agent_config
from neutron_lib.agent import topics
from neutron_lib import context as n_context
from neutron_lib import rpc as n_rpc
from oslo_config import cfg
import oslo_messaging
import threading

host, conf_file, state_file = sys.argv[1:4]
common_config.register_common_config_options()
agent_config.register_agent_state_opts_helper(cfg.CONF)
common_config.init(['--config-file', conf_file])

ctx = n_context.get_admin_context_without_session()
reports = agent_rpc.PluginReportStateAPI(topics.REPORTS)
plugin = L3PluginApi(topics.L3PLUGIN, host)


wake = threading.Event()


class Notifications:
    """The l3_agent topic's methods (L3NATAgent's): every one means "sync now"."""
    target = oslo_messaging.Target(version='1.4')

    def __getattr__(self, name):
        if name.startswith(('_', 'oslo_')):
            raise AttributeError(name)
        return lambda context, **kwargs: wake.set()


conn = n_rpc.Connection()
conn.create_consumer(topics.L3_AGENT, [Notifications()], fanout=False)
conn.create_consumer('%s.%s' % (topics.L3_AGENT, host), [Notifications()], fanout=False)
conn.create_consumer(topics.L3_AGENT, [Notifications()], fanout=True)
conn.consume_in_threads()


def load():
    try:
        with open(state_file) as f:
            return set(json.load(f))
    except (OSError, ValueError):
        return set()


def save(held):
    tmp = state_file + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(sorted(held), f)
    os.replace(tmp, state_file)


held = load()
state = {
    'binary': 'neutron-l3-agent',
    'host': host,
    'availability_zone': 'nova',
    'topic': topics.L3_AGENT,
    'agent_type': 'L3 agent',
    'start_flag': True,
    'configurations': {
        'agent_mode': 'legacy',
        'handle_internal_only_routers': True,
        'gateway_external_network_id': '',
        'interface_driver': 'lab',
        'log_agent_heartbeats': False,
        'routers': len(held),
        'ex_gw_ports': 0, 'interfaces': 0, 'floating_ips': 0,
    },
}
interval = cfg.CONF.AGENT.report_interval
while True:
    t0 = time.monotonic()
    try:
        state['configurations']['routers'] = len(held)
        reports.report_state(ctx, state, use_call=state.get('start_flag', False))
        state.pop('start_flag', None)
        bound = set(plugin.get_router_ids(ctx))
        if bound != held:
            # The binding history, as this agent lived it (tests count moves by it).
            with open(state_file + '.log', 'a') as f:
                now = int(time.time() * 1000)
                for r in sorted(bound - held):
                    f.write('%d gained %s\n' % (now, r))
                for r in sorted(held - bound):
                    f.write('%d dropped %s\n' % (now, r))
            held = bound
            save(held)
    except Exception as e:  # the server may be restarting: keep going, like the agent
        print('l3 agent %s: %s' % (host, e), file=sys.stderr, flush=True)
    wake.wait(max(0.0, interval - (time.monotonic() - t0)))
    wake.clear()
PYEOF

  cat > $B/etc/neutron/plugins/ml2/ml2_conf.ini <<EOF
[ml2]
type_drivers = flat
project_network_types =
mechanism_drivers =
extension_drivers =
[ml2_type_flat]
flat_networks = *
EOF

  # --- keystone (fernet tokens) and the keystone-authenticated nova-api / placement-api
  mkdir -p $B/etc/keystone $B/etc/nova-ks $B/etc/placement-ks $B/data/keystone/fernet-keys $B/data/keystone/credential-keys
  mkdir -p $B/run/keystone $B/run/nova-api-ks $B/run/placement-api-ks
  cat > $B/etc/keystone/keystone.conf <<KSEOF
[DEFAULT]
debug = False
[database]
connection = $DB/keystone?charset=utf8
[token]
provider = fernet
expiration = 3600
[fernet_tokens]
key_repository = $B/data/keystone/fernet-keys
[fernet_receipts]
key_repository = $B/data/keystone/fernet-keys
[credential]
key_repository = $B/data/keystone/credential-keys
KSEOF
  local authtoken="[keystone_authtoken]
www_authenticate_uri = http://127.0.0.1:$KEYSTONE_PORT
auth_url = http://127.0.0.1:$KEYSTONE_PORT
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = admin
username = admin
password = admin"
  cp $V/etc/nova/api-paste.ini $B/etc/nova-ks/api-paste.ini
  cp $B/etc/nova/nova-db.conf $B/etc/nova-ks/nova-db.conf
  { cat $B/etc/nova/nova.conf; echo "$authtoken"; } > $B/etc/nova-ks/nova.conf
  { printf '[DEFAULT]\ndebug = False\n[api]\nauth_strategy = keystone\n[placement_database]\nconnection = %s/placement?charset=utf8\n' "$DB"
    echo "$authtoken"; } > $B/etc/placement-ks/placement.conf

  # --- gunicorn configs: gunicorn is started with NO argv (it reads
  # ./gunicorn.conf.py) because nova/neutron parse sys.argv with oslo.config.
  gconf() {  # gconf NAME MODULE PORT THREADS ENV
    cat > $B/run/$1/gunicorn.conf.py <<EOF
wsgi_app = "$2"
bind = "127.0.0.1:$3"
worker_class = "gthread"
workers = 1
threads = $4
timeout = 300
graceful_timeout = 5
# keep idle client connections well beyond typical client pool idle times; the
# 2 s default races with clients that reuse a pooled connection ("Remote end
# closed connection without response")
keepalive = 75
proc_name = "$1"
control_socket_disable = True
accesslog = "-"
# nova sends neutron GET /v2.0/ports?device_id=..&device_id=.. lines far over
# gunicorn's 4094-byte default when listing ~100 servers
limit_request_line = 0
limit_request_field_size = 0
raw_env = ["$5"]
EOF
  }
  gconf nova-api nova.wsgi.osapi_compute:application $NOVA_PORT 8 "OS_NOVA_CONFIG_DIR=$B/etc/nova"
  gconf placement-api placement.wsgi.api:application $PLACEMENT_PORT 8 "OS_PLACEMENT_CONFIG_DIR=$B/etc/placement"
  gconf glance-api glance.wsgi.api:application $GLANCE_PORT 4 "OS_GLANCE_CONFIG_DIR=$B/etc/glance"
  gconf neutron-api neutron.wsgi.api:application $NEUTRON_PORT 4 "OS_NEUTRON_CONFIG_DIR=$B/etc/neutron"
  gconf keystone keystone.wsgi.api:application $KEYSTONE_PORT 4 "OS_KEYSTONE_CONFIG_DIR=$B/etc/keystone"
  gconf nova-api-ks nova.wsgi.osapi_compute:application $NOVA_KS_PORT 4 "OS_NOVA_CONFIG_DIR=$B/etc/nova-ks"
  gconf placement-api-ks placement.wsgi.api:application $PLACEMENT_KS_PORT 4 "OS_PLACEMENT_CONFIG_DIR=$B/etc/placement-ks"
}

start_gunicorn() {  # start_gunicorn NAME ENVVAR=VALUE...
  local name=$1; shift
  ( cd $B/run/$name && exec env "$@" nohup $V/bin/gunicorn > $L/$name.log 2>&1 ) &
  record $! $name
}

NOVA_CONF=(--config-file $B/etc/nova/nova.conf --config-file $B/etc/nova/nova-db.conf)
H=(-H 'X-Auth-Token: admin' -H 'X-User-Id: admin' -H 'X-Project-Id: admin' -H 'X-Roles: admin,member,reader' -H 'Content-Type: application/json')

nova_api() {  # nova_api METHOD PATH [BODY] (microversion 2.94)
  curl -sf -m 60 "${H[@]}" -H 'OpenStack-API-Version: compute 2.94' -X "$1" "http://127.0.0.1:$NOVA_PORT/v2.1$2" ${3:+-d "$3"}
}

# ---------------------------------------------------------------- start
do_start() {
  local T0; T0=$(t_now)
  installed || { log "not installed: run '$0 install' first"; exit 1; }
  if [ -s $PIDS ]; then
    if running; then ensure_neutron_agents; log "already running"; return 0; fi
    log "a previous start left $PIDS but nova-api does not answer: stopping it first"
    do_stop
  fi
  do_configure
  : >> $PIDS

  # Every port above sits in the kernel's ephemeral range (32768-60999): any outgoing
  # connection on the machine may be given one of them between our check and our bind
  # (rabbitmq once failed with eaddrinuse that way). Reserved, the kernel never hands
  # them out on its own; binding them explicitly still works.
  reserve_ports
  # a broker of an earlier run may still be letting its port go
  wait_for 60 "port $RABBIT_PORT free" port_free $RABBIT_PORT
  # epmd (our own, loopback only) + rabbitmq
  ( rabbit_env; exec nohup /usr/bin/epmd -address 127.0.0.1 -port $EPMD_PORT > $L/epmd.log 2>&1 ) &
  record $! epmd
  ( rabbit_env; exec nohup /usr/lib/rabbitmq/bin/rabbitmq-server > $L/rabbitmq.out 2>&1 ) &
  record $! rabbitmq-server   # sh wrapper; SIGTERM on it stops the broker cleanly

  # mariadb
  local first=0
  if [ ! -d $B/data/mysql/mysql ]; then
    first=1
    mariadb-install-db --defaults-file=$B/etc/my.cnf --auth-root-authentication-method=normal \
      --skip-test-db > $L/mariadb-install.log 2>&1
  fi
  nohup /usr/sbin/mariadbd --defaults-file=$B/etc/my.cnf > $L/mariadb.out 2>&1 &
  record $! mariadbd
  wait_for 60 mariadb mariadb-admin --defaults-file=$B/etc/my.cnf -uroot ping
  if [ $first = 1 ]; then
    mariadb --defaults-file=$B/etc/my.cnf -uroot -e "
      CREATE USER 'os'@'127.0.0.1' IDENTIFIED BY 'os'; GRANT ALL ON *.* TO 'os'@'127.0.0.1';
      CREATE DATABASE nova_api; CREATE DATABASE nova_cell0; CREATE DATABASE nova_cell1;
      CREATE DATABASE placement; CREATE DATABASE glance; CREATE DATABASE neutron;"
  fi
  log "mariadb up at +$(elapsed "$T0") s"

  if [ $first = 1 ]; then   # schema sync: run the four in parallel (they are independent)
    local t; t=$(t_now)
    $V/bin/placement-manage --config-file $B/etc/placement/placement.conf db sync > $L/sync-placement.log 2>&1 &
    local p1=$!
    $V/bin/glance-manage --config-file $B/etc/glance/glance-api.conf db sync > $L/sync-glance.log 2>&1 &
    local p2=$!
    $V/bin/neutron-db-manage --config-file $B/etc/neutron/neutron.conf \
      --config-file $B/etc/neutron/plugins/ml2/ml2_conf.ini upgrade heads > $L/sync-neutron.log 2>&1 &
    local p3=$!
    ( set -e
      $V/bin/nova-manage "${NOVA_CONF[@]}" api_db sync
      $V/bin/nova-manage "${NOVA_CONF[@]}" cell_v2 map_cell0 --database_connection "$DB/nova_cell0?charset=utf8"
      $V/bin/nova-manage "${NOVA_CONF[@]}" cell_v2 create_cell --name cell1
      $V/bin/nova-manage "${NOVA_CONF[@]}" db sync ) > $L/sync-nova.log 2>&1 &
    local p4=$!
    wait $p1 $p2 $p3 $p4
    log "db schemas synced in $(elapsed "$t") s"
  fi

  # keystone: its database, keys and admin user, once
  if [ ! -f $B/data/keystone/bootstrapped ]; then
    local t; t=$(t_now)
    mariadb --defaults-file=$B/etc/my.cnf -uroot -e "CREATE DATABASE IF NOT EXISTS keystone;"
    ( set -e
      K=(--config-file $B/etc/keystone/keystone.conf)
      $V/bin/keystone-manage "${K[@]}" db_sync
      $V/bin/keystone-manage "${K[@]}" fernet_setup --keystone-user root --keystone-group root
      $V/bin/keystone-manage "${K[@]}" credential_setup --keystone-user root --keystone-group root
      $V/bin/keystone-manage "${K[@]}" bootstrap --bootstrap-password admin \
        --bootstrap-admin-url http://127.0.0.1:$KEYSTONE_PORT/v3 \
        --bootstrap-internal-url http://127.0.0.1:$KEYSTONE_PORT/v3 \
        --bootstrap-public-url http://127.0.0.1:$KEYSTONE_PORT/v3 --bootstrap-region-id RegionOne
    ) > $L/keystone-setup.log 2>&1
    touch $B/data/keystone/bootstrapped
    log "keystone set up in $(elapsed "$t") s"
  fi

  wait_for 90 rabbitmq rctl -q status
  log "rabbitmq up at +$(elapsed "$T0") s"

  start_gunicorn placement-api OS_PLACEMENT_CONFIG_DIR=$B/etc/placement
  start_gunicorn glance-api OS_GLANCE_CONFIG_DIR=$B/etc/glance
  start_gunicorn neutron-api OS_NEUTRON_CONFIG_DIR=$B/etc/neutron
  start_gunicorn nova-api OS_NOVA_CONFIG_DIR=$B/etc/nova OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf;nova-db.conf"
  start_gunicorn keystone OS_KEYSTONE_CONFIG_DIR=$B/etc/keystone
  start_gunicorn nova-api-ks OS_NOVA_CONFIG_DIR=$B/etc/nova-ks OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf;nova-db.conf"
  start_gunicorn placement-api-ks OS_PLACEMENT_CONFIG_DIR=$B/etc/placement-ks
  nohup $V/bin/nova-conductor "${NOVA_CONF[@]}" --log-file $L/nova-conductor.log > $L/nova-conductor.out 2>&1 &
  record $! nova-conductor
  nohup $V/bin/nova-scheduler "${NOVA_CONF[@]}" --log-file $L/nova-scheduler.log > $L/nova-scheduler.out 2>&1 &
  record $! nova-scheduler
  start_rpc_server
  for h in $(seq 1 "$NCOMPUTE"); do start_compute $h; start_l3_agent $h; done

  wait_for 120 placement-api curl -sf -m 5 http://127.0.0.1:$PLACEMENT_PORT/
  wait_for 120 glance-api curl -sf -m 5 http://127.0.0.1:$GLANCE_PORT/v2/images
  # neutron: the first request of a fresh worker must not be GET /ports (its ORM
  # backrefs are configured lazily; GET /ports as first request -> 500), so warm up
  wait_for 120 neutron-api curl -sf -m 5 http://127.0.0.1:$NEUTRON_PORT/v2.0/networks
  wait_for 120 nova-api curl -sf -m 5 http://127.0.0.1:$NOVA_PORT/v2.1/
  wait_for 120 keystone curl -sf -m 5 http://127.0.0.1:$KEYSTONE_PORT/v3
  keystone_catalog
  log "all APIs answer at +$(elapsed "$T0") s"

  # all computes report "up", then map them into cell1
  wait_for 180 "$NCOMPUTE nova-compute services up" computes_up "$NCOMPUTE"
  $V/bin/nova-manage "${NOVA_CONF[@]}" cell_v2 discover_hosts > $L/discover_hosts.log 2>&1
  wait_for 120 "$NCOMPUTE hypervisors" hypervisors_count "$NCOMPUTE"

  # flavor + image
  nova_api GET /flavors/1 >/dev/null 2>&1 || \
    nova_api POST /flavors '{"flavor":{"name":"m1.tiny","id":"1","ram":512,"vcpus":1,"disk":1}}' >/dev/null
  if [ ! -s $B/data/image_id ]; then
    local img
    img=$(curl -sf -m 30 -X POST http://127.0.0.1:$GLANCE_PORT/v2/images -H 'Content-Type: application/json' \
      -d '{"name":"fake-image","disk_format":"raw","container_format":"bare","visibility":"public"}' \
      | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])')
    head -c 1048576 /dev/zero > $B/data/fake.img
    curl -sf -m 60 -X PUT http://127.0.0.1:$GLANCE_PORT/v2/images/$img/file \
      -H 'Content-Type: application/octet-stream' --data-binary @$B/data/fake.img
    echo "$img" > $B/data/image_id
  fi
  wait_for 120 "$NCOMPUTE L3 agents alive" l3_agents_alive "$NCOMPUTE"
  log "READY: nova-api http://127.0.0.1:$NOVA_PORT/v2.1 with $NCOMPUTE fake hosts, cold start took $(elapsed "$T0") s"
}

# Once: compute and placement in the catalog (the keystone-authenticated instances),
# and an application credential of admin for tests ($B/data/keystone/appcred.json).
keystone_catalog() {
  [ -s $B/data/keystone/appcred.json ] && return 0
  python3 - "$KEYSTONE_PORT" "$NOVA_KS_PORT" "$PLACEMENT_KS_PORT" "$B/data/keystone/appcred.json" <<'PYEOF'
import json, sys, urllib.request
kp, np, pp, out = sys.argv[1:]
K = 'http://127.0.0.1:%s/v3' % kp
def call(method, path, body=None, token=None):
    h = {'Content-Type': 'application/json'}
    if token:
        h['X-Auth-Token'] = token
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(K + path, method=method, data=data, headers=h)
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.headers.get('X-Subject-Token'), json.loads(r.read() or b'null')
tok, body = call('POST', '/auth/tokens', {'auth': {
    'identity': {'methods': ['password'], 'password': {'user': {
        'name': 'admin', 'domain': {'name': 'Default'}, 'password': 'admin'}}},
    'scope': {'project': {'name': 'admin', 'domain': {'name': 'Default'}}}}})
user = body['token']['user']['id']
for typ, name, url in (('compute', 'nova', 'http://127.0.0.1:%s/v2.1' % np),
                       ('placement', 'placement', 'http://127.0.0.1:%s' % pp)):
    _, svc = call('POST', '/services', {'service': {'type': typ, 'name': name}}, tok)
    for iface in ('public', 'internal', 'admin'):
        call('POST', '/endpoints', {'endpoint': {'service_id': svc['service']['id'],
             'interface': iface, 'url': url, 'region_id': 'RegionOne'}}, tok)
_, ac = call('POST', '/users/%s/application_credentials' % user,
             {'application_credential': {'name': 'defib-tests'}}, tok)
with open(out, 'w') as f:
    json.dump({'id': ac['application_credential']['id'],
               'secret': ac['application_credential']['secret']}, f)
PYEOF
  log "keystone catalog: compute :$NOVA_KS_PORT, placement :$PLACEMENT_KS_PORT; application credential written"
}

compute_conf() {  # per-host config + state_path holding the node identity file
  # nova-compute refuses to RE-start without $state_path/compute_id; the fake driver
  # never writes it, so pre-seed it with the uuid RestartableFakeDriver reports.
  mkdir -p $B/data/nova/fake-$1/instances
  python3 -c "import uuid,sys; print(uuid.uuid5(uuid.NAMESPACE_DNS, sys.argv[1]))" fake-$1 \
    > $B/data/nova/fake-$1/compute_id
  printf '[DEFAULT]\nhost = fake-%s\nstate_path = %s\n' "$1" "$B/data/nova/fake-$1" > $B/etc/nova/compute-fake-$1.conf
}

start_compute() {  # start_compute N  -> host fake-N
  nohup $V/bin/nova-compute --config-file $B/etc/nova/nova.conf --config-file $B/etc/nova/compute-fake-$1.conf \
    --log-file $L/nova-compute-fake-$1.log > $L/nova-compute-fake-$1.out 2>&1 &
  record $! nova-compute-fake-$1
}

# ---------------------------------------------------------------- libvirt computes
# Besides the fake hosts, a test may run hosts whose nova-compute has Nova's real libvirt
# driver, each against a libvirtd of the test's own (tests/src/hypervisor.rs) whose host
# name (its UTS namespace's) is the compute's node name: two such computes on one machine
# need two node names, Placement's resource providers are named after them.

# Debian's libvirt bindings (Nova's driver imports `libvirt`), linked into the venv: the
# venv's Python is Debian's, so its extension module loads.
libvirt_bindings() {
  if ! dpkg -s python3-libvirt >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
      --no-install-recommends python3-libvirt
  fi
  local sp f
  sp=$($V/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for f in /usr/lib/python3/dist-packages/libvirt*.py /usr/lib/python3/dist-packages/libvirtmod*.so; do
    ln -sf "$f" "$sp/"
  done
  $V/bin/python -c 'import libvirt' || { log "the venv cannot import libvirt"; return 1; }
}

# The compute services of HOST (ids), whatever their state.
service_ids() {
  nova_api GET "/os-services?binary=nova-compute&host=$1" | python3 -c \
    'import sys,json; print(" ".join(s["id"] for s in json.load(sys.stdin)["services"]))'
}
compute_up() {
  nova_api GET "/os-services?binary=nova-compute&host=$1" | python3 -c \
    'import sys,json; sys.exit(0 if any(s["state"]=="up" for s in json.load(sys.stdin)["services"]) else 1)'
}
hypervisor_listed() {
  nova_api GET "/os-hypervisors?hypervisor_hostname_pattern=$1" | python3 -c \
    'import sys,json; sys.exit(0 if json.load(sys.stdin)["hypervisors"] else 1)'
}

# start-libvirt-compute HOST URI: a new host HOST (its state and instances under
# $B/data/nova/HOST, wiped; a service of that name an earlier run left is deleted first)
# whose nova-compute drives the libvirtd at URI; waits until Nova lists its hypervisor.
start_libvirt_compute() {
  local host=$1 uri=$2 id
  libvirt_bindings
  if [ -n "$(service_ids "$host")" ]; then
    log "removing the host $host an earlier run left"
    remove_compute "$host"
    [ -z "$(service_ids "$host")" ] || { log "cannot remove the earlier $host"; return 1; }
  fi
  local d=$B/data/nova/$host
  rm -rf "$d"; mkdir -p "$d/instances"
  cat > $B/etc/nova/compute-$host.conf <<EOF
[DEFAULT]
host = $host
state_path = $d
instances_path = $d/instances
compute_driver = libvirt.LibvirtDriver
[libvirt]
virt_type = kvm
connection_uri = $uri
# PVM's KVM runs real-mode guests (the boot sector); no host CPU model to copy.
cpu_mode = none
[nova_sys_admin]
helper_command = $V/bin/privsep-helper --config-file $B/etc/nova/nova.conf --config-file $B/etc/nova/compute-$host.conf
[privsep_osbrick]
helper_command = $V/bin/privsep-helper --config-file $B/etc/nova/nova.conf --config-file $B/etc/nova/compute-$host.conf
EOF
  restart_libvirt_compute "$host"
  wait_for 180 "$host's nova-compute up" compute_up "$host" || { tail -20 $L/nova-compute-$host.log >&2; return 1; }
  $V/bin/nova-manage "${NOVA_CONF[@]}" cell_v2 discover_hosts >> $L/discover_hosts.log 2>&1
  wait_for 120 "$host's hypervisor" hypervisor_listed "$host"
  log "$host: nova-compute with the libvirt driver up"
}

# restart-libvirt-compute HOST: starts HOST's nova-compute again with the configuration and
# state it had (a host that returns). Does not wait: a host that was forced down reads
# "down" until it is unforced.
restart_libvirt_compute() {
  local host=$1
  nohup $V/bin/nova-compute --config-file $B/etc/nova/nova.conf --config-file $B/etc/nova/compute-$host.conf \
    --log-file $L/nova-compute-$host.log > $L/nova-compute-$host.out 2>&1 &
  record $! nova-compute-$host
}

# The ids of the servers on HOST.
servers_on() {
  nova_api GET "/servers?all_tenants=1&host=$1" | python3 -c \
    'import sys,json; print(" ".join(s["id"] for s in json.load(sys.stdin)["servers"]))'
}
no_servers_on() { [ -z "$(servers_on "$1")" ]; }

# The pid of HOST's running nova-compute: a recorded one whose command line is still
# that compute's (a pid recorded long ago may belong to another process now).
compute_pid() {
  local pid name found=
  [ -s $PIDS ] || return 1
  while read -r pid name; do
    [ "$name" = "nova-compute-$1" ] && grep -qa "compute-$1.conf" /proc/$pid/cmdline 2>/dev/null && found=$pid
  done < $PIDS
  [ -n "$found" ] && echo "$found"
}

# remove-compute HOST: deletes the servers on HOST, stops its nova-compute (by its
# recorded pid) and deletes its service (Nova deletes its node and resource provider with
# it). A HOST whose compute does not run (a test that failed half-way) is forced down
# first, so that Nova deletes its servers itself instead of waiting for the compute.
remove_compute() {
  local host=$1 pid id
  [ -n "$(service_ids "$host")" ] || return 0
  if ! compute_pid "$host" >/dev/null; then
    for id in $(service_ids "$host"); do
      nova_api PUT "/os-services/$id" '{"forced_down": true}' >/dev/null || true
    done
  fi
  for id in $(servers_on "$host"); do
    nova_api DELETE "/servers/$id" >/dev/null || true
  done
  wait_for 120 "the servers on $host deleted" no_servers_on "$host" || true
  while pid=$(compute_pid "$host"); do
    kill "$pid" 2>/dev/null || true
    for i in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  done
  for id in $(service_ids "$host"); do
    nova_api DELETE "/os-services/$id" >/dev/null || log "could not delete the service $id of $host"
  done
}

# hbguest-image BOOT_SECTOR: the project's boot-sector guest as a 16 MiB raw Glance image
# (once; its id in $B/data/hbguest_image_id, printed). Glance (and Nova, Cinder) inspect
# an upload: a sector ending in 55 AA is taken for an MBR and must define a partition,
# else "Image failed safety checks"; one entry (type 0x83, LBA 64..end) is written at
# 0x1BE, which the guest never reads.
hbguest_image() {
  local f=$B/data/hbguest_image_id img
  if [ -s $f ] && curl -sf -m 10 http://127.0.0.1:$GLANCE_PORT/v2/images/$(cat $f) | grep -q '"status": *"active"'; then
    cat $f; return 0
  fi
  truncate -s 0 $B/data/hbguest.raw; truncate -s 16M $B/data/hbguest.raw
  dd if="$1" of=$B/data/hbguest.raw conv=notrunc status=none
  python3 - "$B/data/hbguest.raw" <<'EOF'
import struct, sys
with open(sys.argv[1], 'r+b') as f:
    f.seek(0x1be)
    f.write(bytes([0x00, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack('<II', 64, 32768 - 64))
EOF
  img=$(curl -sf -m 30 -X POST http://127.0.0.1:$GLANCE_PORT/v2/images -H 'Content-Type: application/json' \
    -d '{"name":"hbguest","disk_format":"raw","container_format":"bare","visibility":"public"}' \
    | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])')
  curl -sf -m 60 -X PUT http://127.0.0.1:$GLANCE_PORT/v2/images/$img/file \
    -H 'Content-Type: application/octet-stream' --data-binary @$B/data/hbguest.raw
  echo "$img" > $f
  cat $f
}

start_rpc_server() {  # Neutron's RPC server: agent state reports, the L3 plugin's RPC
  nohup $V/bin/neutron-rpc-server --config-file $B/etc/neutron/neutron.conf \
    --config-file $B/etc/neutron/plugins/ml2/ml2_conf.ini \
    --log-file $L/neutron-rpc-server.log > $L/neutron-rpc-server.out 2>&1 &
  record $! neutron-rpc-server
}

start_l3_agent() {  # start_l3_agent N  -> the L3 agent of lab host fake-N
  nohup $V/bin/python $B/etc/neutron/l3_agent_lab.py fake-$1 $B/etc/neutron/neutron.conf \
    $B/data/neutron/l3-agent-fake-$1.json > $L/l3-agent-fake-$1.log 2>&1 &
  record $! l3-agent-fake-$1
}

# the pid of a recorded process NAME that still runs (the newest record)
recorded_pid() {
  local pid name found=
  [ -s $PIDS ] || return 1
  while read -r pid name; do
    [ "$name" = "$1" ] && kill -0 "$pid" 2>/dev/null && found=$pid
  done < $PIDS
  [ -n "$found" ] && echo "$found"
}

l3_agents_alive() {
  local n
  n=$(curl -sf -m 5 "http://127.0.0.1:$NEUTRON_PORT/v2.0/agents?agent_type=L3%20agent" | python3 -c \
    'import sys,json; print(sum(1 for a in json.load(sys.stdin)["agents"] if a["alive"]))') || return 1
  [ "$n" -ge "$1" ]
}

# Neutron's RPC server and the lab's L3 agents run (a novabed started by an earlier
# version of this script has neither, and a neutron-api without their settings: it is
# restarted once, which takes seconds).
ensure_neutron_agents() {
  if ! recorded_pid neutron-rpc-server >/dev/null; then
    do_configure
    local api; api=$(recorded_pid neutron-api || true)
    if [ -n "$api" ]; then
      log "restarting neutron-api $api with the agents' settings"
      kill "$api"; wait_for 30 "neutron-api $api to stop" bash -c "! kill -0 $api"
      start_gunicorn neutron-api OS_NEUTRON_CONFIG_DIR=$B/etc/neutron
      wait_for 120 neutron-api curl -sf -m 5 http://127.0.0.1:$NEUTRON_PORT/v2.0/networks
    fi
    start_rpc_server
  fi
  for h in $(seq 1 "$NCOMPUTE"); do
    recorded_pid l3-agent-fake-$h >/dev/null || start_l3_agent $h
  done
  wait_for 120 "$NCOMPUTE L3 agents alive" l3_agents_alive "$NCOMPUTE"
}

computes_up() {
  local n services id
  services=$(nova_api GET '/os-services?binary=nova-compute') || return 1
  # A compute a test left forced down (it was killed mid-test) reads "down" for ever:
  # this is a test bed, so it starts with every compute trusted again.
  for id in $(echo "$services" | python3 -c \
    'import sys,json; print(" ".join(s["id"] for s in json.load(sys.stdin)["services"] if s.get("forced_down")))'); do
    log "un-forcing compute service $id left forced down"
    nova_api PUT "/os-services/$id" '{"forced_down": false}' > /dev/null || true
  done
  n=$(echo "$services" | python3 -c \
    'import sys,json; print(sum(1 for s in json.load(sys.stdin)["services"] if s["state"]=="up" and not s.get("forced_down")))')
  [ "$n" -ge "$1" ]
}
hypervisors_count() {
  local n
  n=$(nova_api GET /os-hypervisors | python3 -c 'import sys,json; print(len(json.load(sys.stdin)["hypervisors"]))')
  [ "$n" -ge "$1" ]
}

# nova-api answers and every recorded infrastructure process still runs
running() {
  [ -s $PIDS ] || return 1
  local pid name
  while read -r pid name; do
    case $name in nova-compute-*|l3-agent-*) continue ;; esac   # a test may have killed one
    kill -0 "$pid" 2>/dev/null || return 1
  done < $PIDS
  curl -sf -m 5 "${H[@]}" http://127.0.0.1:$NOVA_PORT/v2.1/ >/dev/null &&
    curl -sf -m 5 http://127.0.0.1:$KEYSTONE_PORT/v3 >/dev/null
}

do_status() {
  if ! installed; then echo "novabed: not installed ($B)"; return 3; fi
  if running; then
    echo "novabed: running ($B), nova-api http://127.0.0.1:$NOVA_PORT/v2.1"
    local pid name
    while read -r pid name; do
      if kill -0 "$pid" 2>/dev/null; then echo "  $pid $name"; else echo "  $pid $name (not running)"; fi
    done < $PIDS
    return 0
  fi
  echo "novabed: installed, not running ($B)"; return 3
}

# ---------------------------------------------------------------- stop
do_stop() {
  [ -f $PIDS ] || return 0
  # nova + API services first, then the infrastructure (reverse start order)
  # (an entry of a process that already died, e.g. a SIGKILLed fake compute, is
  # skipped unless the PID now belongs to one of our programs)
  tac $PIDS | while read -r pid name; do
    if grep -qaE "$B|gunicorn: master|epmd|rabbitmq|mariadbd|nova-|masakari" /proc/$pid/cmdline 2>/dev/null; then
      kill "$pid" 2>/dev/null && log "kill $pid ($name)" || true
    fi
  done
  for i in $(seq 1 60); do
    local alive=0
    while read -r pid name; do kill -0 "$pid" 2>/dev/null && alive=1; done < $PIDS
    [ $alive = 0 ] && break
    sleep 0.5
  done
  # whatever ignored SIGTERM for 30 s: SIGKILL (only our recorded, verified pids)
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null && grep -qaE "$B|gunicorn: master|epmd|rabbitmq|mariadbd|nova-|beam" /proc/$pid/cmdline 2>/dev/null; then
      log "still alive after SIGTERM, SIGKILL: $pid $name"; kill -9 "$pid" 2>/dev/null || true
    fi
  done < $PIDS
  rm -f $PIDS
  # the broker (beam) is a child of the recorded wrapper: stop returns once it let go
  wait_for 60 "rabbitmq to let port $RABBIT_PORT go" port_free $RABBIT_PORT || true
}

do_mem() {  # PSS/RSS of each recorded process and its descendants
  python3 - "$PIDS" <<'EOF'
import os, sys
pids = [l.split() for l in open(sys.argv[1]) if l.strip()]
children = {}
for d in os.listdir('/proc'):
    if d.isdigit():
        try:
            ppid = int(open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except Exception:
            pass
def tree(p):
    out = [p]
    for c in children.get(p, []):
        out += tree(c)
    return out
def val(p, key):
    try:
        for line in open(f'/proc/{p}/smaps_rollup'):
            if line.startswith(key + ':'):
                return int(line.split()[1])
    except Exception:
        pass
    return 0
tp = tr = 0
for pid, name in pids:
    ps = tree(int(pid))
    pss = sum(val(p, 'Pss') for p in ps); rss = sum(val(p, 'Rss') for p in ps)
    tp += pss; tr += rss
    print(f'{name:24s} procs={len(ps):2d} PSS={pss/1024:7.1f} MiB RSS={rss/1024:7.1f} MiB')
print(f'{"TOTAL":24s}          PSS={tp/1024:7.1f} MiB RSS={tr/1024:7.1f} MiB')
EOF
}

case "${1:-}" in
  install) do_install ;;
  configure) do_configure ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  mem) do_mem ;;
  start-compute) compute_conf "$2"; start_compute "$2" ;;
  start-l3-agent) start_l3_agent "$2" ;;
  start-libvirt-compute) start_libvirt_compute "$2" "$3" ;;
  restart-libvirt-compute) restart_libvirt_compute "$2" ;;
  remove-compute) remove_compute "$2" ;;
  hbguest-image) hbguest_image "$2" ;;
  env)
    echo "NOVA=http://127.0.0.1:$NOVA_PORT/v2.1  PLACEMENT=http://127.0.0.1:$PLACEMENT_PORT  GLANCE=http://127.0.0.1:$GLANCE_PORT  NEUTRON=http://127.0.0.1:$NEUTRON_PORT"
    echo "nova headers: X-User-Id: admin, X-Project-Id: admin, X-Roles: admin,member,reader, OpenStack-API-Version: compute 2.xx"
    echo "placement header: X-Auth-Token: admin ; image id: $(cat $B/data/image_id 2>/dev/null)"
    echo "KEYSTONE=http://127.0.0.1:$KEYSTONE_PORT/v3 (admin/admin, project admin, domain Default; catalog: nova :$NOVA_KS_PORT, placement :$PLACEMENT_KS_PORT)"
    echo "application credential of admin: $B/data/keystone/appcred.json" ;;
  *) echo "usage: $0 install|start|stop|status|mem|env|start-compute N|start-l3-agent N|start-libvirt-compute HOST URI|restart-libvirt-compute HOST|remove-compute HOST|hbguest-image BOOT_SECTOR" >&2; exit 2 ;;
esac
