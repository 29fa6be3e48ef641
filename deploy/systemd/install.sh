#!/usr/bin/env bash
# Install (or upgrade, or uninstall) gpu-agent as a systemd service on
# Debian/Ubuntu. Safe to run again: every step checks before it changes
# anything, an existing config is never overwritten, and data survives
# --uninstall unless --purge is given. See deploy/systemd/README.md.
set -euo pipefail

# The venv and share/ must be readable by the service user whatever root's umask is.
umask 022

usage() {
    cat <<'EOF'
Usage: install.sh [OPTIONS]

Install gpu-agent from this checkout into /opt/gpu-agent/venv, create the
gpu-agent user (in the docker group), /etc/gpu-agent/config.yaml (only if
absent) and /var/lib/gpu-agent, install the systemd unit, enable and start it.
Running it again upgrades the venv and the units and restarts what changed.

Options:
  --with-scheduler   also install the reference coordinator (gpu-scheduler.service)
  --source SPEC      what pip installs (default: this checkout); e.g. a wheel file
  --pip-arg ARG      extra argument for pip install (repeatable), e.g.
                     --pip-arg=--no-index --pip-arg=--find-links=/srv/wheels
  --python PYTHON    interpreter for the venv (default: python3; needs >= 3.11)
  --uninstall        stop, disable and remove the units and the venv; keeps
                     config, state (node identity, usage outbox) and users
  --purge            with --uninstall: also remove config, state and users.
                     Unreported usage records in the outbox are lost.
  --root DIR         install into DIR instead of / (tests, image builds): users
                     go into DIR/etc/passwd, systemctl only enables offline
  --no-systemctl     never call systemctl (no enable, start or daemon-reload)
  -h, --help         this text
EOF
}

ROOT=/
USE_SYSTEMCTL=1
WITH_SCHEDULER=0
UNINSTALL=0
PURGE=0
PYTHON=python3
SOURCE=
PIP_ARGS=()

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)

say() { printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --with-scheduler) WITH_SCHEDULER=1 ;;
    --source) need_value "$@"; SOURCE=$2; shift ;;
    --source=*) SOURCE=${1#*=} ;;
    --pip-arg) need_value "$@"; PIP_ARGS+=("$2"); shift ;;
    --pip-arg=*) PIP_ARGS+=("${1#*=}") ;;
    --python) need_value "$@"; PYTHON=$2; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --root) need_value "$@"; ROOT=$2; shift ;;
    --root=*) ROOT=${1#*=} ;;
    --no-systemctl) USE_SYSTEMCTL=0 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

[[ $PURGE == 0 || $UNINSTALL == 1 ]] || die "--purge only goes with --uninstall"
[[ -d $ROOT ]] || die "--root $ROOT: no such directory"
ROOT=$(cd "$ROOT" && pwd)
[[ -n $SOURCE ]] || SOURCE=$REPO_DIR

# $(r /etc/x) is /etc/x on the host, DIR/etc/x under --root DIR.
r() { printf '%s%s' "${ROOT%/}" "$1"; }

OPT_DIR=/opt/gpu-agent
VENV=$OPT_DIR/venv
UNIT_DIR=/etc/systemd/system
AGENT_USER=gpu-agent
SCHED_USER=gpu-scheduler
DOCKER_GROUP=docker

# Anything changed in this run: decides whether running services are restarted.
CHANGED=0
changed() {
    CHANGED=1
    say "$*"
}

# --- users -------------------------------------------------------------------
# Under --root the shadow tools edit DIR/etc/{passwd,group,...} via --prefix and
# look-ups read those files; on the host they go through NSS (getent).
if [[ $EUID -eq 0 ]]; then
    MANAGE_USERS=1
elif [[ $ROOT == / ]]; then
    die "run as root (sudo $0 ...)"
else
    MANAGE_USERS=0
    warn "not root: skipping users and file ownership under $ROOT"
fi
PREFIX_OPT=()
[[ $ROOT == / ]] || PREFIX_OPT=(--prefix "$ROOT")

db_entry() { # db_entry passwd|group NAME -> the line, or nothing
    if [[ $ROOT == / ]]; then
        getent "$1" "$2" || true
    elif [[ -f $(r "/etc/$1") ]]; then
        grep -E "^$2:" "$(r "/etc/$1")" || true
    fi
}
uid_of() { db_entry passwd "$1" | cut -d: -f3; }
gid_of() { db_entry group "$1" | cut -d: -f3; }

ensure_group() {
    [[ -z $(db_entry group "$1") ]] || return 0
    groupadd "${PREFIX_OPT[@]}" --system "$1"
    changed "created group $1"
}

ensure_user() { # ensure_user NAME HOME COMMENT
    [[ -z $(db_entry passwd "$1") ]] || return 0
    useradd "${PREFIX_OPT[@]}" --system --gid "$1" --home-dir "$2" --no-create-home \
        --shell /usr/sbin/nologin --comment "$3" "$1"
    changed "created user $1"
}

ensure_member() { # ensure_member USER GROUP
    local members
    members=$(db_entry group "$2" | cut -d: -f4)
    [[ ,$members, != *",$1,"* ]] || return 0
    usermod "${PREFIX_OPT[@]}" --append --groups "$2" "$1"
    changed "added $1 to group $2"
}

remove_user() {
    if [[ -n $(db_entry passwd "$1") ]]; then
        userdel "${PREFIX_OPT[@]}" "$1"
        say "removed user $1"
    fi
    # userdel drops a user's private group on Debian (USERGROUPS_ENAB); not always.
    if [[ -n $(db_entry group "$1") ]]; then
        groupdel "${PREFIX_OPT[@]}" "$1"
        say "removed group $1"
    fi
}

# --- files -------------------------------------------------------------------
# owner_ids USER GROUP -> "uid:gid" (numeric, valid under --root too); root when
# users are not managed.
owner_ids() {
    if [[ $MANAGE_USERS == 1 ]]; then
        printf '%s:%s' "$(uid_of "$1")" "$(gid_of "$2")"
    else
        printf '%s:%s' "$(id -u)" "$(id -g)"
    fi
}

# ensure_dir PATH MODE UID:GID
ensure_dir() {
    local path mode=$2 owner=$3
    path=$(r "$1")
    if [[ -d $path && $(stat -c '%a %u:%g' "$path") == "${mode#0} $owner" ]]; then
        return 0
    fi
    mkdir -p "$path"
    chmod "$mode" "$path"
    [[ $MANAGE_USERS == 0 ]] || chown "$owner" "$path"
    changed "prepared $1 (mode $mode)"
}

# install_file SRC DEST MODE UID:GID: copies only when content, mode or owner differ.
install_file() {
    local src=$1 dest mode=$3 owner=$4
    dest=$(r "$2")
    if [[ -f $dest ]] && cmp -s "$src" "$dest" &&
        [[ $(stat -c '%a %u:%g' "$dest") == "${mode#0} $owner" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    cp "$src" "$dest.tmp.$$"
    chmod "$mode" "$dest.tmp.$$"
    [[ $MANAGE_USERS == 0 ]] || chown "$owner" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    changed "installed $2"
}

# install_config SRC DEST GROUP: a config is the provider's once it exists.
install_config() {
    if [[ -e $(r "$2") ]]; then
        say "keeping existing $2"
        return 0
    fi
    install_file "$1" "$2" 0640 "$(owner_ids root "$3")"
}

# --- systemd -----------------------------------------------------------------
systemctl_run() {
    if [[ $ROOT == / ]]; then
        systemctl "$@"
    else
        systemctl --root="$ROOT" "$@"
    fi
}

# Only enabling works offline under --root; start/stop/reload need the host.
host_systemd() { [[ $USE_SYSTEMCTL == 1 && $ROOT == / ]]; }

# --- prerequisites -----------------------------------------------------------
check_host() {
    [[ $ROOT == / ]] || return 0
    [[ -f /etc/debian_version ]] || warn "not Debian/Ubuntu: untested, continuing"
    command -v docker >/dev/null || warn "docker CLI not found: install Docker Engine first"
    command -v nvidia-smi >/dev/null ||
        warn "nvidia-smi not found: install the NVIDIA driver (the agent preflight will fail)"
    local ctk
    if ! command -v nvidia-ctk >/dev/null; then
        warn "nvidia-ctk not found: install NVIDIA Container Toolkit >= 1.16.2"
    else
        ctk=$(nvidia-ctk --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1 || true)
        if [[ -z $ctk ]] || ! dpkg --compare-versions "$ctk" ge 1.16.2; then
            warn "NVIDIA Container Toolkit ${ctk:-of unknown version} found; >= 1.16.2 is required"
        fi
    fi
}

check_python() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt-get install python3)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); gpu-agent needs Python >= 3.11 (pass --python)"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        die "$PYTHON cannot create venvs: apt-get install python3-venv"
}

# --- install -----------------------------------------------------------------
venv_fingerprint() {
    # The RECORD files list every installed file with its hash, so this changes
    # when any package, or the code of a same-version reinstall, changes.
    find "$(r "$VENV")/lib" -path '*.dist-info/RECORD' -print0 2>/dev/null |
        sort -z | xargs -0 -r cat | sha256sum
}

install_venv() {
    local venv_path before
    venv_path=$(r "$VENV")
    if [[ ! -x $venv_path/bin/python ]]; then
        check_python
        "$PYTHON" -m venv "$venv_path"
        changed "created venv $VENV"
    fi
    before=$(venv_fingerprint)
    # No cache: it would go to root's home and outlive an --uninstall --purge.
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 "$venv_path/bin/python" -m pip install --quiet \
        --upgrade "${PIP_ARGS[@]}" "$SOURCE" || die "pip install $SOURCE failed (see above)"
    [[ $(venv_fingerprint) == "$before" ]] || changed "installed $SOURCE into $VENV"
}

# validate NAME CONFIG: the service's own `config check`, so a bad file is
# reported here with its key paths rather than as a start failure.
validate() {
    if "$(r "$VENV")/bin/$1" config check "$(r "$2")"; then
        return 0
    fi
    warn "$2 is not valid: fix it, then: systemctl restart $1"
    return 1
}

# enable_and_start UNIT: returns non-zero (never exits) when the unit fails to
# start, so the caller decides what else still gets installed and started.
enable_and_start() {
    if [[ $USE_SYSTEMCTL == 0 ]]; then
        return 0
    fi
    if ! systemctl_run is-enabled --quiet "$1" 2>/dev/null; then
        systemctl_run enable --quiet "$1" || return 1
        say "enabled $1"
    fi
    host_systemd || return 0
    if [[ $CHANGED == 1 ]] && systemctl is-active --quiet "$1"; then
        # Lease containers are Docker's and keep running; the agent re-adopts them.
        systemctl restart "$1" || return 1
        say "restarted $1"
    else
        systemctl start "$1" || return 1
        say "started $1 (systemctl status $1)"
    fi
}

# The coordinator's generated CA (scheduler/tlsgen.py), beside its database.
SCHED_CA=/var/lib/gpu-scheduler/tls/ca.pem
AGENT_CA=/etc/gpu-agent/coordinator-ca.pem

# install_scheduler_ca: the scheduler writes its CA on first start, into a 0700
# directory the agent cannot read; the agent gets a copy it may read.
install_scheduler_ca() {
    if [[ ! -f $(r "$SCHED_CA") ]]; then
        # Under --root or --no-systemctl nothing started the scheduler yet.
        warn "no $SCHED_CA yet (the scheduler writes it on first start); run this" \
            "installer again after starting gpu-scheduler to give the agent a copy"
        return 0
    fi
    install_file "$(r "$SCHED_CA")" "$AGENT_CA" 0640 "$(owner_ids root "$AGENT_USER")"
}

# agent_config_example OUT: the example config; with --with-scheduler it
# verifies the local scheduler with the copied CA. Only ever used for a config
# this run creates: an existing one is the provider's (so is its ca_file).
agent_config_example() {
    if [[ $WITH_SCHEDULER == 1 ]]; then
        sed -E "0,/^  ca_file: null/s||  ca_file: $AGENT_CA|" "$REPO_DIR/config.example.yaml" >"$1"
    else
        cp "$REPO_DIR/config.example.yaml" "$1"
    fi
}

do_install() {
    check_host
    [[ -f $REPO_DIR/config.example.yaml ]] ||
        die "$REPO_DIR/config.example.yaml not found: run install.sh from a gpu-agent checkout"

    if [[ $MANAGE_USERS == 1 ]]; then
        [[ -n $(db_entry group "$DOCKER_GROUP") ]] ||
            die "no '$DOCKER_GROUP' group: install Docker Engine first (README.md, Prerequisites)"
        ensure_group "$AGENT_USER"
        ensure_user "$AGENT_USER" /var/lib/gpu-agent "GPU provider agent"
        ensure_member "$AGENT_USER" "$DOCKER_GROUP"
        if [[ $WITH_SCHEDULER == 1 ]]; then
            ensure_group "$SCHED_USER"
            ensure_user "$SCHED_USER" /var/lib/gpu-scheduler "GPU reference coordinator"
        fi
    fi

    local root_ids
    root_ids=$(owner_ids root root)
    ensure_dir "$OPT_DIR" 0755 "$root_ids"
    install_venv
    install_file "$SCRIPT_DIR/README.md" "$OPT_DIR/share/README.md" 0644 "$root_ids"

    ensure_dir /etc/gpu-agent 0755 "$root_ids"
    local example
    example=$(mktemp)
    agent_config_example "$example"
    install_config "$example" /etc/gpu-agent/config.yaml "$AGENT_USER"
    rm -f "$example"
    ensure_dir /var/lib/gpu-agent 0700 "$(owner_ids "$AGENT_USER" "$AGENT_USER")"

    local units_before=$CHANGED
    CHANGED=0
    install_file "$SCRIPT_DIR/gpu-agent.service" "$UNIT_DIR/gpu-agent.service" 0644 "$root_ids"
    if [[ $WITH_SCHEDULER == 1 ]]; then
        install_file "$SCRIPT_DIR/gpu-scheduler.service" "$UNIT_DIR/gpu-scheduler.service" \
            0644 "$root_ids"
        ensure_dir /etc/gpu-scheduler 0755 "$root_ids"
        if [[ ! -e $(r /etc/gpu-scheduler/config.yaml) ]]; then
            # No example file for the coordinator: its defaults, written out by
            # itself, with a clean environment so no GPU_SCHEDULER_* leaks in.
            local tmp
            tmp=$(mktemp)
            env -i PATH=/usr/bin:/bin "$(r "$VENV")/bin/gpu-scheduler" config show >"$tmp"
            install_config "$tmp" /etc/gpu-scheduler/config.yaml "$SCHED_USER"
            rm -f "$tmp"
        else
            say "keeping existing /etc/gpu-scheduler/config.yaml"
        fi
        ensure_dir /var/lib/gpu-scheduler 0700 "$(owner_ids "$SCHED_USER" "$SCHED_USER")"
    fi
    if [[ $CHANGED == 1 ]] && host_systemd; then
        systemctl daemon-reload
    fi
    [[ $units_before == 0 ]] || CHANGED=1

    local valid=1
    validate gpu-agent /etc/gpu-agent/config.yaml || valid=0
    if [[ $WITH_SCHEDULER == 1 ]]; then
        validate gpu-scheduler /etc/gpu-scheduler/config.yaml || valid=0
    fi
    [[ $valid == 1 ]] || exit 1

    # The scheduler first: the agent dials it, and its CA only exists once it
    # has started. A unit that fails to start does not stop the other one from
    # being installed and started; the exit status still reports it.
    local failed=()
    if [[ $WITH_SCHEDULER == 1 ]]; then
        if enable_and_start gpu-scheduler.service; then
            install_scheduler_ca
        else
            failed+=(gpu-scheduler.service)
        fi
    fi
    enable_and_start gpu-agent.service || failed+=(gpu-agent.service)
    if [[ ${#failed[@]} -gt 0 ]]; then
        local unit
        for unit in "${failed[@]}"; do
            warn "$unit did not start: journalctl -u $unit -b; systemctl status $unit"
        done
        exit 1
    fi
    if [[ $CHANGED == 0 ]]; then
        say "already up to date"
    fi
    say "done; check the node with: sudo -u $AGENT_USER $VENV/bin/gpu-agent doctor"
}

# --- uninstall ---------------------------------------------------------------
# Mounts the agent made under its state dir (the scratch root's nosuid bind from an
# earlier config, loop scratch of leases still running): detach them, deepest first,
# before the files go.
unmount_below() {
    local dir=$1 point
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo \
        | sort -r | while read -r point; do
            umount -l "$point" && say "unmounted $point"
        done
}

do_uninstall() {
    local unit
    for unit in gpu-agent.service gpu-scheduler.service; do
        [[ -e $(r "$UNIT_DIR/$unit") ]] || continue
        if [[ $USE_SYSTEMCTL == 1 ]]; then
            if host_systemd; then
                systemctl disable --now --quiet "$unit" || warn "could not stop $unit"
            else
                systemctl_run disable --quiet "$unit" || true
            fi
        fi
        rm -f "$(r "$UNIT_DIR/$unit")"
        say "removed $UNIT_DIR/$unit"
    done
    if host_systemd; then
        systemctl daemon-reload
    fi
    # The egress policy's iptables rules outlive agent restarts on purpose (leases
    # keep running); on uninstall they go, while the agent's venv is still here.
    if [[ $ROOT == / && -x $VENV/bin/gpu-agent ]]; then
        local config=()
        [[ -f /etc/gpu-agent/config.yaml ]] && config=(--config /etc/gpu-agent/config.yaml)
        "$VENV/bin/gpu-agent" "${config[@]}" firewall remove || warn "could not remove the firewall rules"
        # The unit's pre-start bind of the scratch root onto itself (nosuid,nodev).
        "$VENV/bin/gpu-agent" "${config[@]}" scratch-mount --remove \
            || warn "could not unmount the scratch root"
    fi
    if [[ -e $(r "$OPT_DIR") ]]; then
        rm -rf "$(r "$OPT_DIR")"
        say "removed $OPT_DIR"
    fi
    if [[ $PURGE == 0 ]]; then
        say "kept /etc/gpu-agent and /var/lib/gpu-agent (node identity, usage outbox) and the" \
            "gpu-agent user; remove them with --uninstall --purge"
        return 0
    fi
    local dir
    [[ $ROOT == / ]] && unmount_below /var/lib/gpu-agent
    # Drop-ins (`systemctl edit`) are the provider's settings for the units:
    # kept by --uninstall, like the config, and gone with --purge.
    for dir in /etc/gpu-agent /var/lib/gpu-agent /etc/gpu-scheduler /var/lib/gpu-scheduler \
        "$UNIT_DIR/gpu-agent.service.d" "$UNIT_DIR/gpu-scheduler.service.d"; do
        if [[ -e $(r "$dir") ]]; then
            rm -rf "$(r "$dir")"
            say "removed $dir"
        fi
    done
    if [[ $MANAGE_USERS == 1 ]]; then
        remove_user "$AGENT_USER"
        remove_user "$SCHED_USER"
    fi
}

if [[ $UNINSTALL == 1 ]]; then
    do_uninstall
else
    do_install
fi
