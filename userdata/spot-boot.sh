#!/usr/bin/env bash
# spotsafe boot script: EC2 user data for a spot instance that resumes its training run.
#
# On every boot (the first through cloud-init user data, later ones through a copy it
# installs in cloud-init's per-boot directory) it:
#   1. makes sure a Python with spotsafe[aws] is there (SPOTSAFE_PYTHON, or a venv it creates);
#   2. attaches the run's persistent EBS volume (found by tag; copied into this zone if it
#      is elsewhere and SPOTSAFE_MOVE=1) and mounts it (a filesystem is created only on a
#      blank volume, and only with SPOTSAFE_MKFS=1 or the tag spotsafe-new=true);
#   3. stops there if the run is already complete (and, if SPOTSAFE_SHUTDOWN_WHEN_DONE=1,
#      tells the Auto Scaling group / spot request to stop replacing it and shuts down);
#   4. clones or updates the training code with git;
#   5. starts the systemd unit spotsafe-train.service, which runs
#        python -m spotsafe.resume --store $SPOTSAFE_STORE -- $SPOTSAFE_TRAIN_COMMAND
#      as the training user (restart policy; logs to journald and to the volume).
#
# Edit the settings below, or set them in the environment: each is ${VAR:-default}.
# Phases (what the systemd unit calls): spot-boot.sh [boot|train|after-train].
# Logs: /var/log/spotsafe-boot.log, journalctl -u spotsafe-train, $SPOTSAFE_LOG_DIR/<run>.log.
set -euo pipefail

# ----------------------------------------------------------------- settings
: "${SPOTSAFE_RUN:=mnist}"                                 # the run's name: volume tag value, store directory
: "${SPOTSAFE_VOLUME_TAG:=spotsafe-run=${SPOTSAFE_RUN}}"   # KEY=VALUE that finds the volume
: "${SPOTSAFE_VOLUME_ID:=}"                                # or its id (wins over the tag)
: "${SPOTSAFE_REGION:=}"                                   # empty: this instance's region, from IMDS
: "${SPOTSAFE_MOVE:=1}"                                    # 1: snapshot-copy the volume here if it is in another zone
: "${SPOTSAFE_MKFS:=0}"                                    # 1: allow creating a filesystem on a BLANK volume
: "${SPOTSAFE_DEVICE:=}"                                   # device name for attach; empty: first free /dev/sdf..sdp
: "${SPOTSAFE_MOUNT:=/mnt/spotsafe}"                       # mount point of the volume
: "${SPOTSAFE_FSTAB:=1}"                                   # 1: add an fstab entry (UUID, nofail)
: "${SPOTSAFE_USER:=ubuntu}"                               # the training user: owns the mount, runs training
: "${SPOTSAFE_REPO:=}"                                     # git URL of the training code; empty: no fetch
: "${SPOTSAFE_REF:=main}"                                  # branch, tag or commit to run
: "${SPOTSAFE_CODE_DIR:=${SPOTSAFE_MOUNT}/code/${SPOTSAFE_RUN}}"  # checkout (on the volume: survives instances)
: "${SPOTSAFE_REQUIREMENTS:=}"                             # e.g. requirements.txt (in the checkout): pip-installed
: "${SPOTSAFE_TRAIN_COMMAND:=python train.py}"             # run in the checkout by python -m spotsafe.resume
: "${SPOTSAFE_STORE:=${SPOTSAFE_MOUNT}/${SPOTSAFE_RUN}}"   # checkpoint store of the run
: "${SPOTSAFE_LOG_DIR:=${SPOTSAFE_MOUNT}/logs}"            # <run>.log here: the training output
: "${SPOTSAFE_MAX_RESTARTS:=3}"                            # crashes python -m spotsafe.resume retries
: "${SPOTSAFE_PYTHON:=}"                                   # a python with spotsafe[aws]; empty: SPOTSAFE_VENV
: "${SPOTSAFE_VENV:=/opt/spotsafe/venv}"                   # created when SPOTSAFE_PYTHON is empty
: "${SPOTSAFE_PIP_SPEC:=spotsafe[aws]}"                    # pip-installed where spotsafe is missing (a git URL works)
: "${SPOTSAFE_SHUTDOWN_WHEN_DONE:=0}"                      # 1: when the run is complete, stop replacement + shut down
: "${SPOTSAFE_SHUTDOWN_ON_FAILURE:=0}"                     # 1: shut down when this script fails (no idle GPU)
: "${SPOTSAFE_SHUTDOWN_CMD:=shutdown -h now}"
: "${SPOTSAFE_SKIP_SYSTEMD:=0}"                            # 1: run training in the foreground instead of systemd
: "${SPOTSAFE_VOLUME_ARGS:=}"                              # extra arguments to python -m spotsafe.volume
# Where things are installed (the unit file names the first two).
: "${SPOTSAFE_ETC:=/etc/spotsafe}"
: "${SPOTSAFE_INSTALL_PATH:=/usr/local/sbin/spotsafe-boot}"
: "${SPOTSAFE_UNIT_DIR:=/etc/systemd/system}"
: "${SPOTSAFE_PER_BOOT_DIR:=/var/lib/cloud/scripts/per-boot}"
: "${SPOTSAFE_BOOT_LOG:=/var/log/spotsafe-boot.log}"

# Everything above reaches the python steps and the unit's environment file.
SETTINGS=(
  SPOTSAFE_RUN SPOTSAFE_VOLUME_TAG SPOTSAFE_VOLUME_ID SPOTSAFE_REGION SPOTSAFE_MOVE SPOTSAFE_MKFS
  SPOTSAFE_DEVICE SPOTSAFE_MOUNT SPOTSAFE_FSTAB SPOTSAFE_USER SPOTSAFE_REPO SPOTSAFE_REF
  SPOTSAFE_CODE_DIR SPOTSAFE_REQUIREMENTS SPOTSAFE_TRAIN_COMMAND SPOTSAFE_STORE SPOTSAFE_LOG_DIR
  SPOTSAFE_MAX_RESTARTS SPOTSAFE_PYTHON SPOTSAFE_VENV SPOTSAFE_PIP_SPEC SPOTSAFE_SHUTDOWN_WHEN_DONE
  SPOTSAFE_SHUTDOWN_ON_FAILURE SPOTSAFE_SHUTDOWN_CMD SPOTSAFE_SKIP_SYSTEMD SPOTSAFE_VOLUME_ARGS
  SPOTSAFE_ETC SPOTSAFE_INSTALL_PATH SPOTSAFE_UNIT_DIR SPOTSAFE_PER_BOOT_DIR SPOTSAFE_BOOT_LOG
)
# shellcheck disable=SC2163  # exporting the variables the array names
for _name in "${SETTINGS[@]}"; do export "${_name}"; done

# Lower case: never clobber a variable of the same name in the environment.
phase="${1:-boot}"

log() { printf '%s spot-boot[%s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${phase}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

on_error() {
  local rc=$? line=$1
  log "failed (exit ${rc}) at line ${line}; see the messages above"
  if [ "${SPOTSAFE_SHUTDOWN_ON_FAILURE}" = 1 ] && [ "${phase}" = boot ]; then
    log "SPOTSAFE_SHUTDOWN_ON_FAILURE=1: shutting down rather than idling"
    # shellcheck disable=SC2086  # the command is meant to be split into words
    ${SPOTSAFE_SHUTDOWN_CMD} || true
  fi
  exit "${rc}"
}

# Run a command as the training user (directly when we already are that user).
as_user() {
  if [ "$(id -un)" = "${SPOTSAFE_USER}" ]; then
    "$@"
  else
    runuser -u "${SPOTSAFE_USER}" -- "$@"
  fi
}

# Arguments common to every python -m spotsafe.volume call.
aws_args() {
  AWS_ARGS=()
  if [ -n "${SPOTSAFE_REGION}" ]; then AWS_ARGS+=(--region "${SPOTSAFE_REGION}"); fi
  local extra=()
  read -r -a extra <<< "${SPOTSAFE_VOLUME_ARGS}"
  AWS_ARGS+=("${extra[@]}")
  VOLUME_SELECTOR=()
  if [ -n "${SPOTSAFE_VOLUME_ID}" ]; then
    VOLUME_SELECTOR=(--volume-id "${SPOTSAFE_VOLUME_ID}")
  else
    VOLUME_SELECTOR=(--tag "${SPOTSAFE_VOLUME_TAG}")
  fi
}

# Install OS packages with whatever package manager the AMI has.
install_packages() {
  log "installing $*"
  if command -v apt-get > /dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }
  elif command -v dnf > /dev/null; then
    dnf install -y -q "$@"
  elif command -v yum > /dev/null; then
    yum install -y -q "$@"
  else
    die "cannot install $*: no apt-get, dnf or yum on this image"
  fi
}

# A python that has spotsafe[aws]: SPOTSAFE_PYTHON (e.g. a Deep Learning AMI's conda env),
# else a venv made once at SPOTSAFE_VENV; SPOTSAFE_PIP_SPEC is installed where missing.
ensure_python() {
  if [ -z "${SPOTSAFE_PYTHON}" ]; then
    SPOTSAFE_PYTHON="${SPOTSAFE_VENV}/bin/python"
    if [ ! -x "${SPOTSAFE_PYTHON}" ]; then
      log "creating a virtual environment at ${SPOTSAFE_VENV}"
      python3 -m venv "${SPOTSAFE_VENV}" 2> /dev/null \
        || { install_packages python3-venv && python3 -m venv "${SPOTSAFE_VENV}"; }
    fi
  fi
  if ! "${SPOTSAFE_PYTHON}" -c 'import spotsafe.volume, boto3' 2> /dev/null; then
    log "installing ${SPOTSAFE_PIP_SPEC} for ${SPOTSAFE_PYTHON}"
    "${SPOTSAFE_PYTHON}" -m pip install --quiet "${SPOTSAFE_PIP_SPEC}"
  fi
  "${SPOTSAFE_PYTHON}" -c 'import spotsafe.volume, boto3' \
    || die "${SPOTSAFE_PYTHON} cannot import spotsafe and boto3: set SPOTSAFE_PYTHON or SPOTSAFE_PIP_SPEC"
  export SPOTSAFE_PYTHON
}

# Keep a copy of this script where the unit and later boots find it.
install_self() {
  local self installed
  self=$(readlink -f "${BASH_SOURCE[0]}")
  installed=$(readlink -f "${SPOTSAFE_INSTALL_PATH}" 2>/dev/null || true)
  if [ "${self}" != "${installed}" ]; then
    install -D -m 0755 "${self}" "${SPOTSAFE_INSTALL_PATH}"
  fi
  if [ -n "${SPOTSAFE_PER_BOOT_DIR}" ]; then
    # cloud-init runs user data on an instance's first boot only; a stopped and
    # restarted spot instance comes back through this per-boot hook.
    mkdir -p "${SPOTSAFE_PER_BOOT_DIR}"
    cat > "${SPOTSAFE_PER_BOOT_DIR}/spotsafe-boot.sh" <<HOOK
#!/bin/sh
set -a
. "${SPOTSAFE_ETC}/spotsafe.env"
set +a
exec "${SPOTSAFE_INSTALL_PATH}" boot
HOOK
    chmod 0755 "${SPOTSAFE_PER_BOOT_DIR}/spotsafe-boot.sh"
  fi
}

# The settings, for the unit (systemd EnvironmentFile) and the per-boot hook (sh).
write_env() {
  local name value tmp
  mkdir -p "${SPOTSAFE_ETC}"
  tmp=$(mktemp "${SPOTSAFE_ETC}/.spotsafe.env.XXXXXX")
  {
    for name in "${SETTINGS[@]}" AWS_ENDPOINT_URL AWS_ENDPOINT_URL_EC2 AWS_ENDPOINT_URL_AUTO_SCALING AWS_EC2_METADATA_SERVICE_ENDPOINT; do
      if [ -z "${!name+set}" ]; then continue; fi
      value=${!name}
      case "${value}" in
        *"'"* | *$'\n'*) die "${name} may not contain a single quote or a newline" ;;
      esac
      printf "%s='%s'\n" "${name}" "${value}"
    done
  } > "${tmp}"
  chmod 0644 "${tmp}"
  mv -f "${tmp}" "${SPOTSAFE_ETC}/spotsafe.env"
}

attach_and_mount() {
  local device mount_args=() move_args=()
  if [ "${SPOTSAFE_MOVE}" = 1 ]; then move_args=(--move); fi
  if [ -n "${SPOTSAFE_DEVICE}" ]; then move_args+=(--device "${SPOTSAFE_DEVICE}"); fi
  log "attaching the volume (${SPOTSAFE_VOLUME_ID:-${SPOTSAFE_VOLUME_TAG}})"
  device=$("${SPOTSAFE_PYTHON}" -m spotsafe.volume attach "${VOLUME_SELECTOR[@]}" "${move_args[@]}" "${AWS_ARGS[@]}")
  mount_args=(--device "${device}" --mountpoint "${SPOTSAFE_MOUNT}" --owner "${SPOTSAFE_USER}")
  if [ "${SPOTSAFE_FSTAB}" = 1 ]; then mount_args+=(--fstab); fi
  if [ "${SPOTSAFE_MKFS}" = 1 ]; then mount_args+=(--mkfs); fi
  log "mounting ${device} at ${SPOTSAFE_MOUNT}"
  "${SPOTSAFE_PYTHON}" -m spotsafe.volume mount "${VOLUME_SELECTOR[@]}" "${mount_args[@]}" "${AWS_ARGS[@]}" > /dev/null
  as_user mkdir -p "${SPOTSAFE_STORE}" "${SPOTSAFE_LOG_DIR}"
}

# True when the run's store holds a completion mark (python -m spotsafe.resume --status).
is_complete() {
  local status
  status=$(as_user "${SPOTSAFE_PYTHON}" -m spotsafe.resume --store "${SPOTSAFE_STORE}" --status) || return 1
  grep -q '^complete: yes' <<< "${status}"
}

fetch_code() {
  if [ -z "${SPOTSAFE_REPO}" ]; then return 0; fi
  if ! command -v git > /dev/null; then install_packages git; fi
  if [ -d "${SPOTSAFE_CODE_DIR}/.git" ]; then
    log "updating ${SPOTSAFE_CODE_DIR} to ${SPOTSAFE_REF}"
  else
    log "cloning ${SPOTSAFE_REPO} into ${SPOTSAFE_CODE_DIR}"
    as_user mkdir -p "$(dirname "${SPOTSAFE_CODE_DIR}")"
    as_user git clone --quiet "${SPOTSAFE_REPO}" "${SPOTSAFE_CODE_DIR}"
  fi
  as_user git -C "${SPOTSAFE_CODE_DIR}" fetch --quiet origin "${SPOTSAFE_REF}"
  as_user git -C "${SPOTSAFE_CODE_DIR}" checkout --quiet --force FETCH_HEAD
  log "code at $(as_user git -C "${SPOTSAFE_CODE_DIR}" rev-parse HEAD)"
  if [ -n "${SPOTSAFE_REQUIREMENTS}" ]; then
    "${SPOTSAFE_PYTHON}" -m pip install --quiet -r "${SPOTSAFE_CODE_DIR}/${SPOTSAFE_REQUIREMENTS}"
  fi
}

# A completed run: stop the Auto Scaling group / spot request from replacing us, shut down.
finish_run() {
  if [ "${SPOTSAFE_SHUTDOWN_WHEN_DONE}" != 1 ]; then
    log "run ${SPOTSAFE_RUN} is complete (SPOTSAFE_SHUTDOWN_WHEN_DONE=0: staying up)"
    return 0
  fi
  log "run ${SPOTSAFE_RUN} is complete: stopping replacement and shutting down"
  "${SPOTSAFE_PYTHON}" -m spotsafe.volume finish "${AWS_ARGS[@]}" \
    || log "could not stop the group / spot request from replacing this instance (see above); shutting down anyway"
  sync
  # shellcheck disable=SC2086  # the command is meant to be split into words
  ${SPOTSAFE_SHUTDOWN_CMD}
}

install_unit() {
  local unit="${SPOTSAFE_UNIT_DIR}/spotsafe-train.service"
  mkdir -p "${unit}.d"
  # The same text as userdata/spotsafe-train.service (a test keeps them equal).
  cat > "${unit}" <<'UNIT'
# spotsafe: the training run of a spot instance, resumed from its newest checkpoint.
#
# Installed and started by spot-boot.sh on every boot, after the persistent volume is
# mounted. spot-boot.sh also writes /etc/spotsafe/spotsafe.env (the run's settings) and a
# drop-in (spotsafe-train.service.d/spotsafe.conf) with User=, RequiresMountsFor= and the
# paths, so this file itself never needs editing.
#
#   journalctl -u spotsafe-train -f          follow the training log (also on the volume)
#   systemctl stop spotsafe-train            stop it cleanly: the run checkpoints, then exits
[Unit]
Description=spotsafe training run (resumes from its newest checkpoint)
Wants=network-online.target
After=network-online.target
# Crash loops are bounded: python -m spotsafe.resume already restarts the command.
StartLimitIntervalSec=3600
StartLimitBurst=5

[Service]
Type=exec
EnvironmentFile=-/etc/spotsafe/spotsafe.env
# Runs python -m spotsafe.resume --store $SPOTSAFE_STORE -- $SPOTSAFE_TRAIN_COMMAND as the
# training user, its output to journald and to $SPOTSAFE_LOG_DIR on the volume.
ExecStart=/usr/local/sbin/spotsafe-boot train
# As root ("+"): on a completed run, stop the group / spot request from replacing the
# instance and shut it down (when SPOTSAFE_SHUTDOWN_WHEN_DONE=1).
ExecStopPost=+/usr/local/sbin/spotsafe-boot after-train
# SIGTERM goes to the supervisor only, which hands it to the training process (one
# final checkpoint); whatever is left is killed after the timeout.
KillMode=mixed
TimeoutStopSec=110
Restart=on-failure
RestartSec=30
# 75: the state is safe and this instance is being taken away: nothing to restart here.
RestartPreventExitStatus=75
SyslogIdentifier=spotsafe-train

[Install]
WantedBy=multi-user.target
UNIT
  cat > "${unit}.d/spotsafe.conf" <<DROPIN
[Unit]
RequiresMountsFor=${SPOTSAFE_MOUNT}

[Service]
User=${SPOTSAFE_USER}
EnvironmentFile=${SPOTSAFE_ETC}/spotsafe.env
ExecStart=
ExecStart=${SPOTSAFE_INSTALL_PATH} train
ExecStopPost=
ExecStopPost=+${SPOTSAFE_INSTALL_PATH} after-train
DROPIN
  systemctl daemon-reload
  # --no-block: this script runs inside cloud-init's own boot job.
  systemctl start --no-block spotsafe-train.service
  log "started spotsafe-train.service (journalctl -u spotsafe-train -f)"
}

# ----------------------------------------------------------------- phases

phase_boot() {
  mkdir -p "$(dirname "${SPOTSAFE_BOOT_LOG}")"
  exec > >(tee -a "${SPOTSAFE_BOOT_LOG}") 2>&1
  log "boot: run ${SPOTSAFE_RUN}, store ${SPOTSAFE_STORE}"
  install_self
  ensure_python
  aws_args
  attach_and_mount
  if is_complete; then
    log "the run in ${SPOTSAFE_STORE} is complete: not restarting it"
    finish_run
    return 0
  fi
  fetch_code
  write_env
  if [ "${SPOTSAFE_SKIP_SYSTEMD}" = 1 ]; then
    log "SPOTSAFE_SKIP_SYSTEMD=1: training in the foreground"
    local rc=0
    as_user "${SPOTSAFE_INSTALL_PATH}" train || rc=$?
    "${SPOTSAFE_INSTALL_PATH}" after-train "${rc}"
    return "${rc}"
  fi
  install_unit
}

# As the training user (the unit's ExecStart): the supervisor, output to journald and the volume.
phase_train() {
  if [ -z "${SPOTSAFE_PYTHON}" ]; then SPOTSAFE_PYTHON="${SPOTSAFE_VENV}/bin/python"; fi
  # "python" in the training command is the one that has spotsafe.
  PATH="$(dirname "${SPOTSAFE_PYTHON}"):${PATH}"
  export PATH
  mkdir -p "${SPOTSAFE_LOG_DIR}"
  cd "${SPOTSAFE_CODE_DIR}" 2>/dev/null || cd "${SPOTSAFE_MOUNT}"
  exec > >(tee -a "${SPOTSAFE_LOG_DIR}/${SPOTSAFE_RUN}.log") 2>&1
  log "python -m spotsafe.resume --store ${SPOTSAFE_STORE} -- ${SPOTSAFE_TRAIN_COMMAND} (in $(pwd))"
  exec "${SPOTSAFE_PYTHON}" -m spotsafe.resume --store "${SPOTSAFE_STORE}" \
    --max-restarts "${SPOTSAFE_MAX_RESTARTS}" -- /bin/bash -c "exec ${SPOTSAFE_TRAIN_COMMAND}"
}

# As root after the training process ended (the unit's ExecStopPost): finish a completed run.
phase_after_train() {
  local rc="${2:-${EXIT_STATUS:-}}"
  if [ -z "${SPOTSAFE_PYTHON}" ]; then SPOTSAFE_PYTHON="${SPOTSAFE_VENV}/bin/python"; fi
  aws_args
  if [ "${rc}" != 0 ]; then
    log "training ended with ${rc:-unknown status} (${SERVICE_RESULT:-}): not finishing"
    return 0
  fi
  if is_complete; then
    finish_run
  else
    log "training exited 0 but the run is not marked complete: not finishing"
  fi
}

set -E
trap 'on_error ${LINENO}' ERR
case "${phase}" in
  boot) phase_boot ;;
  train) phase_train ;;
  after-train) phase_after_train "$@" ;;
  *) die "unknown phase ${phase}: use boot, train or after-train" ;;
esac
