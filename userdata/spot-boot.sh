#!/usr/bin/env bash
# spotsafe boot script: a spot VM on AWS, GCP or Azure that resumes its training run.
#
# One script for the three clouds, delivered whole as the VM's boot script: EC2 user data
# (cloud-init), a GCE instance's startup-script, Azure custom data (cloud-init). On every boot
# (cloud-init runs user data / custom data on the first boot and a copy this script installs
# in its per-boot directory afterwards; GCE runs a startup-script on each boot itself) it:
#   1. finds the cloud from its metadata service (SPOTSAFE_CLOUD=auto; aws, gcp or azure to say
#      so): EC2 IMDS (an IMDSv2 token), the GCE metadata server (Metadata-Flavor: Google) or
#      Azure IMDS (Metadata: true), asked in that order;
#   2. makes sure a Python with spotsafe[aws|gcp|azure] is there (SPOTSAFE_PYTHON, or a venv
#      it creates and fills from SPOTSAFE_PIP_SPEC: a git URL pinned to a commit, or a wheel
#      with its sha256);
#   3. mounts the run's persistent disk (SPOTSAFE_ATTACH=1; a filesystem is created only on a
#      blank disk, and only with SPOTSAFE_MKFS=1 or, on AWS, the tag spotsafe-new=true):
#        AWS:   attaches the EBS volume itself (found by tag; copied into this zone if it is
#               elsewhere and SPOTSAFE_MOVE=1; created, or restored from its newest snapshot,
#               when none exists and SPOTSAFE_CREATE_SIZE is set);
#        GCP:   the managed instance group's stateful disk, already attached, by its device
#               name (/dev/disk/by-id/google-$SPOTSAFE_DISK_NAME);
#        Azure: the scale set's data disk, already attached, by its LUN
#               (/dev/disk/azure/scsi1/lun$SPOTSAFE_DISK_LUN).
#      With SPOTSAFE_ATTACH=0 the store is s3://, gs:// or az:// and SPOTSAFE_MOUNT is a
#      directory on the boot disk;
#   4. stops there if the run is already complete (and, with SPOTSAFE_SHUTDOWN_WHEN_DONE=1,
#      stops the platform from replacing the VM -- the Auto Scaling group / spot request, the
#      managed instance group, the scale set: to 0, with the VM's own identity -- and shuts down);
#   5. checks out the training code with git: the commit the run started with (pinned on the
#      disk), so a resumed run never changes code mid-way;
#   6. starts the systemd unit spotsafe-train.service, which runs
#        python -m spotsafe.resume --store $SPOTSAFE_STORE -- $SPOTSAFE_TRAIN_COMMAND
#      as the training user (restart policy; logs to journald and to the disk), and on AWS with
#      SPOTSAFE_SNAPSHOT_EVERY>0 a transient unit taking incremental snapshots of the volume.
#
# Every boot ends in one of: training, a complete run (stay up, or finish and shut down),
# or a shut-down VM: when this script fails or the training command keeps crashing
# (SPOTSAFE_SHUTDOWN_ON_FAILURE=1, the default; 0 keeps the VM up to debug it).
#
# The preemption notice: the supervisor's watcher hears EC2's instance-action, GCE's
# instance/preempted and Azure's Scheduled Events (a Preempt event acknowledged once the notice
# checkpoint is durable). On GCP the VM's shutdown-script runs `spotsafe-boot stop` as well,
# which stops the unit: the supervisor gets SIGTERM and the run checkpoints once.
#
# Settings are environment variables, each ${VAR:-default} below, named the same on every
# cloud: edit them here, or set them before this text (what `spotsafe launch` does). The
# phases: spot-boot.sh [boot|settings|train|after-train|snapshots|stop] (the unit runs train
# and after-train, the transient spotsafe-snapshots unit runs snapshots, GCE's
# shutdown-script runs stop).
# Logs: /var/log/spotsafe-boot.log, journalctl -u spotsafe-train, $SPOTSAFE_LOG_DIR/<run>.log.
set -euo pipefail

# ----------------------------------------------------------------- settings
: "${SPOTSAFE_CLOUD:=auto}"                                # auto (from the metadata services), aws, gcp or azure
: "${SPOTSAFE_RUN:=mnist}"                                 # the run's name: volume tag value / disk name, store directory
: "${SPOTSAFE_ATTACH:=1}"                                  # 0: no disk (an s3://, gs://, az:// store); SPOTSAFE_MOUNT is a boot-disk directory
: "${SPOTSAFE_MKFS:=0}"                                    # 1: allow creating a filesystem on a BLANK disk
: "${SPOTSAFE_MOUNT:=/mnt/spotsafe}"                       # mount point of the disk
: "${SPOTSAFE_FSTAB:=1}"                                   # 1: add an fstab entry (UUID, nofail)
# AWS: the EBS volume this script attaches.
: "${SPOTSAFE_VOLUME_TAG:=spotsafe-run=${SPOTSAFE_RUN}}"   # KEY=VALUE that finds the volume
: "${SPOTSAFE_VOLUME_ID:=}"                                # or its id (wins over the tag)
: "${SPOTSAFE_REGION:=}"                                   # empty: this instance's region, from IMDS
: "${SPOTSAFE_MOVE:=1}"                                    # 1: snapshot-copy the volume here if it is in another zone
: "${SPOTSAFE_KEEP_OLD:=0}"                                # 1: after a move, keep the old volume and snapshot
: "${SPOTSAFE_CREATE_SIZE:=}"                              # GiB: no volume? restore the newest snapshot, else create blank
: "${SPOTSAFE_CREATE_TYPE:=gp3}"                           # volume type for SPOTSAFE_CREATE_SIZE
: "${SPOTSAFE_SNAPSHOT_EVERY:=0}"                          # seconds between incremental snapshots while training (0: none)
: "${SPOTSAFE_SNAPSHOT_KEEP:=2}"                           # completed periodic snapshots kept
: "${SPOTSAFE_DEVICE:=}"                                   # device name for attach; empty: first free /dev/sdf..sdp
: "${SPOTSAFE_SECRETS:=}"                                  # NAME=ssm:/path NAME=secretsmanager:ID: read with the role into training's env
# GCP and Azure: the disk the platform attached before boot.
: "${SPOTSAFE_DISK_NAME:=spotsafe-${SPOTSAFE_RUN}}"        # GCP: the stateful disk's device name
: "${SPOTSAFE_DISK_LUN:=0}"                                # Azure: the data disk's LUN
: "${SPOTSAFE_DISK_DIR:=}"                                 # empty: /dev/disk/by-id (GCP), /dev/disk/azure/scsi1 (Azure)
: "${SPOTSAFE_DISK_DEVICE:=}"                              # empty: from the three above
: "${SPOTSAFE_DISK_WAIT:=120}"                             # seconds to wait for the disk's device link
# The training.
: "${SPOTSAFE_OS_RELEASE:=/etc/os-release}"                # read to pick the default user on AWS
: "${SPOTSAFE_USER:=}"                                     # the training user (created when missing); empty: on AWS ec2-user
#                                                            on Amazon Linux, else ubuntu/admin; on GCP and Azure spotsafe
: "${SPOTSAFE_REPO:=}"                                     # git URL of the training code; empty: no fetch
: "${SPOTSAFE_REF:=main}"                                  # branch, tag or commit to start the run with
: "${SPOTSAFE_CODE_DIR:=${SPOTSAFE_MOUNT}/code/${SPOTSAFE_RUN}}"  # checkout (on the disk: survives VMs)
: "${SPOTSAFE_CODE_PIN:=1}"                                # 1: a resumed run keeps the commit it started with
: "${SPOTSAFE_CODE_PIN_FILE:=${SPOTSAFE_MOUNT}/.spotsafe/${SPOTSAFE_RUN}.code}"  # "<ref> <commit>" of the run
: "${SPOTSAFE_REQUIREMENTS:=}"                             # e.g. requirements.txt (in the checkout): pip-installed
: "${SPOTSAFE_TRAIN_COMMAND:=python train.py}"             # run in the checkout by python -m spotsafe.resume
: "${SPOTSAFE_STORE:=${SPOTSAFE_MOUNT}/${SPOTSAFE_RUN}}"   # checkpoint store of the run (a path, s3://, gs://, az://)
: "${SPOTSAFE_LOG_DIR:=${SPOTSAFE_MOUNT}/logs}"            # <run>.log here: the training output
: "${SPOTSAFE_MAX_RESTARTS:=3}"                            # crashes python -m spotsafe.resume retries
: "${SPOTSAFE_PYTHON:=}"                                   # a python with spotsafe[aws|gcp|azure]; empty: SPOTSAFE_VENV
: "${SPOTSAFE_VENV:=/opt/spotsafe/venv}"                   # created when SPOTSAFE_PYTHON is empty
: "${SPOTSAFE_PIP_SPEC:=}"                                 # where spotsafe is missing: git+https://…@<commit> or a .whl URL
: "${SPOTSAFE_PIP_SHA256:=}"                               # the wheel's sha256 (required for a .whl)
: "${SPOTSAFE_PIP_ARGS:=}"                                 # extra pip arguments (e.g. --index-url of a mirror)
: "${SPOTSAFE_SHUTDOWN_WHEN_DONE:=0}"                      # 1: when the run is complete, stop replacement + shut down
: "${SPOTSAFE_SHUTDOWN_ON_FAILURE:=1}"                     # 1: a failed boot or a crash-looping run shuts down
: "${SPOTSAFE_SHUTDOWN_CMD:=shutdown -h now}"
: "${SPOTSAFE_SKIP_SYSTEMD:=0}"                            # 1: run training in the foreground instead of systemd
: "${SPOTSAFE_VOLUME_ARGS:=}"                              # extra arguments to every python -m spotsafe.volume call
: "${SPOTSAFE_MOUNT_ARGS:=}"                               # extra arguments to python -m spotsafe.volume mount only
# Where things are installed (the unit file and GCE's shutdown-script name the first two).
: "${SPOTSAFE_ETC:=/etc/spotsafe}"
: "${SPOTSAFE_INSTALL_PATH:=/usr/local/sbin/spotsafe-boot}"
: "${SPOTSAFE_UNIT_DIR:=/etc/systemd/system}"
: "${SPOTSAFE_PER_BOOT_DIR:=/var/lib/cloud/scripts/per-boot}"  # cloud-init (AWS, Azure); GCE reruns its startup-script itself
: "${SPOTSAFE_BOOT_LOG:=/var/log/spotsafe-boot.log}"

# Everything above reaches the python steps and the unit's environment file.
SETTINGS=(
  SPOTSAFE_CLOUD SPOTSAFE_RUN SPOTSAFE_ATTACH SPOTSAFE_MKFS SPOTSAFE_MOUNT SPOTSAFE_FSTAB
  SPOTSAFE_VOLUME_TAG SPOTSAFE_VOLUME_ID SPOTSAFE_REGION SPOTSAFE_MOVE SPOTSAFE_KEEP_OLD SPOTSAFE_CREATE_SIZE
  SPOTSAFE_CREATE_TYPE SPOTSAFE_SNAPSHOT_EVERY SPOTSAFE_SNAPSHOT_KEEP SPOTSAFE_DEVICE SPOTSAFE_SECRETS
  SPOTSAFE_DISK_NAME SPOTSAFE_DISK_LUN SPOTSAFE_DISK_DIR SPOTSAFE_DISK_DEVICE SPOTSAFE_DISK_WAIT
  SPOTSAFE_OS_RELEASE SPOTSAFE_USER SPOTSAFE_REPO SPOTSAFE_REF SPOTSAFE_CODE_DIR SPOTSAFE_CODE_PIN
  SPOTSAFE_CODE_PIN_FILE SPOTSAFE_REQUIREMENTS SPOTSAFE_TRAIN_COMMAND SPOTSAFE_STORE SPOTSAFE_LOG_DIR
  SPOTSAFE_MAX_RESTARTS SPOTSAFE_PYTHON SPOTSAFE_VENV SPOTSAFE_PIP_SPEC SPOTSAFE_PIP_SHA256 SPOTSAFE_PIP_ARGS
  SPOTSAFE_SHUTDOWN_WHEN_DONE SPOTSAFE_SHUTDOWN_ON_FAILURE SPOTSAFE_SHUTDOWN_CMD SPOTSAFE_SKIP_SYSTEMD
  SPOTSAFE_VOLUME_ARGS SPOTSAFE_MOUNT_ARGS
  SPOTSAFE_ETC SPOTSAFE_INSTALL_PATH SPOTSAFE_UNIT_DIR SPOTSAFE_PER_BOOT_DIR SPOTSAFE_BOOT_LOG
)
# Where the metadata services and APIs are: unset on a real VM; a test or a private endpoint sets
# them, and the unit's phases must reach the same ones.
PASSED_ON=(
  AWS_ENDPOINT_URL AWS_ENDPOINT_URL_EC2 AWS_ENDPOINT_URL_AUTO_SCALING AWS_EC2_METADATA_SERVICE_ENDPOINT
  GCE_METADATA_HOST GCE_METADATA_IP SPOTSAFE_GCP_COMPUTE_ENDPOINT SPOTSAFE_AZURE_METADATA_ENDPOINT
  AZURE_POD_IDENTITY_AUTHORITY_HOST AZURE_CLIENT_ID SPOTSAFE_AZURE_ARM_ENDPOINT REQUESTS_CA_BUNDLE SPOTSAFE_SOURCES
  AZURE_STORAGE_ACCOUNT_NAME
)
# Without a disk there is nothing to snapshot.
if [ "${SPOTSAFE_ATTACH}" != 1 ]; then SPOTSAFE_SNAPSHOT_EVERY=0; fi
# shellcheck disable=SC2163  # exporting the variables the array names
for _name in "${SETTINGS[@]}"; do export "${_name}"; done

# Lower case: never clobber a variable of the same name in the environment.
phase="${1:-boot}"
cloud=""

log() { printf '%s spot-boot[%s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${phase}" "$*" >&2; }
# A failed boot: shut down rather than leave a GPU idling (unless SPOTSAFE_SHUTDOWN_ON_FAILURE=0).
shutdown_on_failure() {
  if [ "${SPOTSAFE_SHUTDOWN_ON_FAILURE}" = 1 ]; then
    log "SPOTSAFE_SHUTDOWN_ON_FAILURE=1: shutting down rather than idling ($1)"
    sync || true
    # shellcheck disable=SC2086  # the command is meant to be split into words
    ${SPOTSAFE_SHUTDOWN_CMD} || true
  else
    log "SPOTSAFE_SHUTDOWN_ON_FAILURE=0: staying up for you to look ($1)"
  fi
}

die() {
  local rc=1
  if [ "$#" -gt 1 ] && [[ "$1" =~ ^[0-9]+$ ]]; then rc=$1; shift; fi
  log "error: $*"
  trap - ERR
  if [ "${phase}" = boot ]; then shutdown_on_failure "boot failed"; fi
  exit "${rc}"
}

on_error() {
  local rc=$? line=$1
  # In a subshell (a command substitution inherits the trap with set -E): the main shell reports.
  if [ "${BASHPID}" != "$$" ]; then exit "${rc}"; fi
  trap - ERR
  log "failed (exit ${rc}) at line ${line}; see the messages above"
  if [ "${phase}" = boot ]; then shutdown_on_failure "boot failed with exit ${rc}"; fi
  exit "${rc}"
}

# ----------------------------------------------------------------- the cloud

# One metadata request: $1 the URL, then curl's other arguments. Never through a proxy.
metadata() {
  local url=$1
  shift
  curl --noproxy '*' -fsS -m 3 "$@" "${url}" 2> /dev/null
}

# An IMDSv2 session token (EC2), empty when IMDS does not answer.
imds_token() {
  metadata "${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}/latest/api/token" \
    -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' || true
}

gce_zone() {
  metadata "http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/zone" \
    -H 'Metadata-Flavor: Google'
}

azure_compute() {
  metadata "${SPOTSAFE_AZURE_METADATA_ENDPOINT:-http://169.254.169.254}/metadata/instance/compute?api-version=2021-02-01" \
    -H 'Metadata: true'
}

# The cloud, from SPOTSAFE_CLOUD or its metadata service (EC2 first: its IMDS is the oldest
# user of this script), then what depends on it: the training user's default, the python
# modules, the command that stops the platform from replacing this VM. Once per process.
resolve_cloud() {
  if [ -n "${cloud}" ]; then return 0; fi
  case "${SPOTSAFE_CLOUD}" in
    aws | gcp | azure) cloud=${SPOTSAFE_CLOUD} ;;
    auto)
      if [ -n "$(imds_token)" ]; then
        cloud=aws
      elif gce_zone > /dev/null; then
        cloud=gcp
      elif azure_compute > /dev/null; then
        cloud=azure
      else
        die "no metadata service answered (EC2 IMDS at ${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}, the GCE metadata server at ${GCE_METADATA_HOST:-metadata.google.internal}, Azure IMDS at ${SPOTSAFE_AZURE_METADATA_ENDPOINT:-http://169.254.169.254}): set SPOTSAFE_CLOUD=aws, gcp or azure"
      fi
      ;;
    *) die "SPOTSAFE_CLOUD=${SPOTSAFE_CLOUD}: use auto, aws, gcp or azure" ;;
  esac
  SPOTSAFE_CLOUD=${cloud}
  case "${cloud}" in
    aws) CLOUD_MODULES="boto3" FINISH_MODULE="spotsafe.volume" ;;
    gcp) CLOUD_MODULES="google.cloud.compute_v1, google.auth" FINISH_MODULE="spotsafe.cloud.gcp.finish" ;;
    azure) CLOUD_MODULES="azure.mgmt.compute, azure.identity" FINISH_MODULE="spotsafe.cloud.azure.finish" ;;
  esac
  if [ "${cloud}" != aws ]; then
    if [ -n "${SPOTSAFE_SECRETS}" ]; then
      die "SPOTSAFE_SECRETS names AWS SSM parameters and Secrets Manager secrets: not readable on ${cloud}"
    fi
    if [ "${SPOTSAFE_SNAPSHOT_EVERY}" != 0 ]; then
      log "SPOTSAFE_SNAPSHOT_EVERY: periodic snapshots are of an EBS volume (AWS): none on ${cloud}"
      SPOTSAFE_SNAPSHOT_EVERY=0
    fi
  fi
  if [ -z "${SPOTSAFE_USER}" ]; then SPOTSAFE_USER=$(default_user); fi
  volume_args
}

# Where this VM is, for the log: the availability zone (AWS), the zone (GCP), the location (Azure).
where_am_i() {
  local token
  case "${cloud}" in
    aws)
      token=$(imds_token)
      metadata "${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}/latest/meta-data/placement/availability-zone" \
        -H "X-aws-ec2-metadata-token: ${token}" || echo unknown
      ;;
    gcp) { gce_zone || echo unknown; } | sed 's|.*/||' ;;
    azure) { azure_compute || echo '"location":"unknown"'; } | sed -n 's/.*"location" *: *"\([^"]*\)".*/\1/p' ;;
  esac
}

# The training user when SPOTSAFE_USER is empty. AWS: the image's login user -- ec2-user on
# Amazon Linux (and RHEL-likes), ubuntu on Ubuntu, admin on Debian. GCP and Azure images have
# none of their own (the admin user is whoever created the VM): a user spotsafe, created.
default_user() {
  local os_id u
  if [ "${cloud}" != aws ]; then
    echo spotsafe
    return 0
  fi
  os_id=$(sed -n 's/^\(ID\|ID_LIKE\)=//p' "${SPOTSAFE_OS_RELEASE}" 2> /dev/null | tr -d "\"'" | tr '\n' ' ' || true)
  case " ${os_id} " in
    *" amzn "* | *" rhel "* | *" fedora "* | *" centos "*) echo ec2-user ;;
    *" ubuntu "*) echo ubuntu ;;
    *" debian "*) echo admin ;;
    *)
      for u in ec2-user ubuntu admin; do
        if id -u "${u}" > /dev/null 2>&1; then
          echo "${u}"
          return 0
        fi
      done
      echo root
      ;;
  esac
}

# The training user exists (an image may have none by that name: a plain account with a home).
ensure_user() {
  if ! id -u "${SPOTSAFE_USER}" > /dev/null 2>&1; then
    log "creating the training user ${SPOTSAFE_USER}"
    useradd --create-home --shell /bin/bash "${SPOTSAFE_USER}" || die "cannot create the user ${SPOTSAFE_USER}"
  fi
}

# Run a command as the training user (directly when we already are that user).
as_user() {
  if [ "$(id -un)" = "${SPOTSAFE_USER}" ]; then
    "$@"
  else
    runuser -u "${SPOTSAFE_USER}" -- "$@"
  fi
}

# Arguments to python -m spotsafe.volume: SPOTSAFE_VOLUME_ARGS on every cloud; on AWS the
# region and the volume (by id or tag), which the platform's attached disk needs on no other.
volume_args() {
  VOLUME_ARGS=()
  VOLUME_SELECTOR=()
  if [ "${cloud}" = aws ]; then
    if [ -n "${SPOTSAFE_REGION}" ]; then VOLUME_ARGS+=(--region "${SPOTSAFE_REGION}"); fi
    if [ -n "${SPOTSAFE_VOLUME_ID}" ]; then
      VOLUME_SELECTOR=(--volume-id "${SPOTSAFE_VOLUME_ID}")
    else
      VOLUME_SELECTOR=(--tag "${SPOTSAFE_VOLUME_TAG}")
    fi
  fi
  local extra=()
  read -r -a extra <<< "${SPOTSAFE_VOLUME_ARGS}"
  VOLUME_ARGS+=("${extra[@]}")
}

# Install OS packages with whatever package manager the image has.
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

# Fetch a wheel (s3://, https://, file:// or a path) into $1, checking SPOTSAFE_PIP_SHA256.
fetch_wheel() {
  local dest=$1 url=${SPOTSAFE_PIP_SPEC%%#*} sum
  if ! [[ "${SPOTSAFE_PIP_SHA256}" =~ ^[0-9a-f]{64}$ ]]; then
    die "SPOTSAFE_PIP_SPEC is a wheel (${url}): set SPOTSAFE_PIP_SHA256 to its sha256 (sha256sum FILE) so only that build is installed"
  fi
  case "${url}" in
    s3://*)
      command -v aws > /dev/null || die "cannot fetch ${url}: no aws command (install the AWS CLI, or use an https URL)"
      aws s3 cp --only-show-errors "${url}" "${dest}" || die "cannot fetch ${url} (is s3:GetObject allowed to the instance role?)"
      ;;
    https://* | http://*)
      curl --fail --silent --show-error --location --retry 3 -o "${dest}" "${url}" || die "cannot fetch ${url}"
      ;;
    *)
      cp "${url#file://}" "${dest}" || die "cannot read ${url}"
      ;;
  esac
  sum=$(sha256sum "${dest}" | cut -d' ' -f1)
  if [ "${sum}" != "${SPOTSAFE_PIP_SHA256}" ]; then
    die "${url} has sha256 ${sum}, not SPOTSAFE_PIP_SHA256=${SPOTSAFE_PIP_SHA256}: refusing to install it"
  fi
}

# Install spotsafe[${cloud}] for SPOTSAFE_PYTHON from code the user controls, pinned: a git URL at
# a full commit id, or a wheel checked against its sha256. A bare package name is refused:
# cloud-init runs this as root, and a name on a public index can be anyone's code.
install_spotsafe() {
  local spec=${SPOTSAFE_PIP_SPEC} pip_args=() target wheel_dir
  read -r -a pip_args <<< "${SPOTSAFE_PIP_ARGS}"
  case "${spec}" in
    "")
      die "${SPOTSAFE_PYTHON} has no spotsafe: set SPOTSAFE_PYTHON to a python that has spotsafe[${cloud}], or SPOTSAFE_PIP_SPEC to git+https://…/spotsafe@<commit> or a wheel URL with SPOTSAFE_PIP_SHA256"
      ;;
    *git+*)
      if ! [[ "${spec%%#*}" =~ @[0-9a-f]{40}$ ]]; then
        die "SPOTSAFE_PIP_SPEC=${spec} is not pinned: end the git URL with @<full 40-hex commit id>"
      fi
      target=${spec}
      if [[ "${spec}" != *" @ "* ]]; then target="spotsafe[${cloud}] @ ${spec}"; fi
      ;;
    *.whl | *.whl#*)
      wheel_dir=$(mktemp -d)
      local name=${spec%%#*}
      name=${name##*/}
      fetch_wheel "${wheel_dir}/${name}"
      target="${wheel_dir}/${name}[${cloud}]"
      ;;
    *)
      die "SPOTSAFE_PIP_SPEC=${spec} is not code you control, pinned: use git+https://…/spotsafe@<commit> or a .whl URL with SPOTSAFE_PIP_SHA256"
      ;;
  esac
  log "installing spotsafe from ${spec} for ${SPOTSAFE_PYTHON}"
  "${SPOTSAFE_PYTHON}" -m pip install --quiet "${pip_args[@]}" "${target}" \
    || die "pip could not install ${spec} (see above)"
  if [ -n "${wheel_dir:-}" ]; then rm -rf "${wheel_dir}"; fi
}

# A python that has spotsafe[${cloud}]: SPOTSAFE_PYTHON (e.g. a Deep Learning AMI's conda env),
# else a venv made once at SPOTSAFE_VENV, filled from SPOTSAFE_PIP_SPEC.
ensure_python() {
  if [ -z "${SPOTSAFE_PYTHON}" ]; then
    SPOTSAFE_PYTHON="${SPOTSAFE_VENV}/bin/python"
    if [ ! -x "${SPOTSAFE_PYTHON}" ]; then
      log "creating a virtual environment at ${SPOTSAFE_VENV}"
      python3 -m venv "${SPOTSAFE_VENV}" 2> /dev/null \
        || { install_packages python3-venv && python3 -m venv "${SPOTSAFE_VENV}"; } \
        || die "cannot create a virtual environment at ${SPOTSAFE_VENV}"
    fi
  fi
  local imports="import spotsafe.volume, ${FINISH_MODULE}, ${CLOUD_MODULES}"
  if ! "${SPOTSAFE_PYTHON}" -c "${imports}" 2> /dev/null; then
    install_spotsafe
  fi
  "${SPOTSAFE_PYTHON}" -c "${imports}" \
    || die "${SPOTSAFE_PYTHON} cannot import spotsafe and ${CLOUD_MODULES}: set SPOTSAFE_PYTHON or SPOTSAFE_PIP_SPEC"
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
  # GCE runs the startup-script on every boot itself: a cloud-init hook too would boot twice.
  if [ -n "${SPOTSAFE_PER_BOOT_DIR}" ] && [ "${cloud}" != gcp ]; then
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
    for name in "${SETTINGS[@]}" "${PASSED_ON[@]}"; do
      if [ -z "${!name+set}" ]; then continue; fi
      value=${!name}
      case "${value}" in
        *"'"* | *$'\n'*) die "${name} may not contain a single quote or a newline" ;;
      esac
      printf "%s='%s'\n" "${name}" "${value}"
    done
  } > "${tmp}"
  # root only: systemd (as root) and the per-boot hook read it; the training user gets it from the unit.
  chmod 0600 "${tmp}"
  mv -f "${tmp}" "${SPOTSAFE_ETC}/spotsafe.env"
}

# AWS: attach the run's EBS volume to this instance (moved, created or restored as the
# settings allow); prints the block device.
attach_volume() {
  local attach_args=()
  if [ "${SPOTSAFE_MOVE}" = 1 ]; then attach_args=(--move); fi
  if [ -n "${SPOTSAFE_DEVICE}" ]; then attach_args+=(--device "${SPOTSAFE_DEVICE}"); fi
  if [ -n "${SPOTSAFE_CREATE_SIZE}" ]; then
    attach_args+=(--create-size "${SPOTSAFE_CREATE_SIZE}" --create-type "${SPOTSAFE_CREATE_TYPE}")
  fi
  log "attaching the volume (${SPOTSAFE_VOLUME_ID:-${SPOTSAFE_VOLUME_TAG}})"
  "${SPOTSAFE_PYTHON}" -m spotsafe.volume attach "${VOLUME_SELECTOR[@]}" "${attach_args[@]}" "${VOLUME_ARGS[@]}"
}

# GCP and Azure: the platform attached the run's disk before boot (GCP: the group's stateful
# disk, by its device name; Azure: the scale set's data disk, by its LUN).
disk_link() {
  if [ -n "${SPOTSAFE_DISK_DEVICE}" ]; then
    echo "${SPOTSAFE_DISK_DEVICE}"
  elif [ "${cloud}" = gcp ]; then
    echo "${SPOTSAFE_DISK_DIR:-/dev/disk/by-id}/google-${SPOTSAFE_DISK_NAME}"
  else
    echo "${SPOTSAFE_DISK_DIR:-/dev/disk/azure/scsi1}/lun${SPOTSAFE_DISK_LUN}"
  fi
}

# udev may still be making the disk's link.
wait_for_disk() {
  local device=$1 waited=0
  log "waiting for the run's disk at ${device}"
  while [ ! -b "${device}" ]; do
    if [ "${waited}" -ge "${SPOTSAFE_DISK_WAIT}" ]; then
      die 4 "no disk at ${device} after ${SPOTSAFE_DISK_WAIT} s: is the run's disk attached to this VM (GCP: a stateful disk with device name ${SPOTSAFE_DISK_NAME}; Azure: a data disk at LUN ${SPOTSAFE_DISK_LUN})?"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

# The run's disk, mounted at SPOTSAFE_MOUNT (a filesystem is made only on a blank disk, when allowed).
mount_volume() {
  local device mount_args=() extra=()
  if [ "${cloud}" = aws ]; then
    device=$(attach_volume)
  else
    device=$(disk_link)
    wait_for_disk "${device}"
  fi
  mount_args=(--device "${device}" --mountpoint "${SPOTSAFE_MOUNT}" --owner "${SPOTSAFE_USER}")
  if [ "${SPOTSAFE_FSTAB}" = 1 ]; then mount_args+=(--fstab); fi
  if [ "${SPOTSAFE_MKFS}" = 1 ]; then mount_args+=(--mkfs); fi
  if [ "${SPOTSAFE_KEEP_OLD}" = 1 ]; then mount_args+=(--keep-old); fi
  read -r -a extra <<< "${SPOTSAFE_MOUNT_ARGS}"
  mount_args+=("${extra[@]}")
  log "mounting ${device} at ${SPOTSAFE_MOUNT}"
  "${SPOTSAFE_PYTHON}" -m spotsafe.volume mount "${VOLUME_SELECTOR[@]}" "${mount_args[@]}" "${VOLUME_ARGS[@]}" > /dev/null
  make_run_dirs
}

# SPOTSAFE_ATTACH=0 (the store is s3://, gs:// or az://): no disk; the code checkout and the logs
# live in SPOTSAFE_MOUNT on the boot disk and go with the VM, the checkpoints do not.
prepare_without_volume() {
  log "SPOTSAFE_ATTACH=0: no volume; ${SPOTSAFE_MOUNT} is a directory on the boot disk"
  mkdir -p "${SPOTSAFE_MOUNT}"
  chown "${SPOTSAFE_USER}" "${SPOTSAFE_MOUNT}"
  make_run_dirs
}

make_run_dirs() {
  as_user mkdir -p "${SPOTSAFE_LOG_DIR}"
  case "${SPOTSAFE_STORE}" in
    *://*) ;;
    *) as_user mkdir -p "${SPOTSAFE_STORE}" ;;
  esac
}

# True when the run's store holds a completion mark (python -m spotsafe.resume --status).
is_complete() {
  local status
  status=$(as_user "${SPOTSAFE_PYTHON}" -m spotsafe.resume --store "${SPOTSAFE_STORE}" --status) || return 1
  grep -q '^complete: yes' <<< "${status}"
}

# The training code: the first boot of a run resolves SPOTSAFE_REF to a commit and records
# "<ref> <commit>" on the volume (SPOTSAFE_CODE_PIN_FILE); later boots check out that commit,
# whatever the branch did since, so a resumed run never changes code mid-way. Changing
# SPOTSAFE_REF (in the launch settings) moves the run to the new ref on its next boot.
fetch_code() {
  local pinned_ref="" pinned_commit="" commit
  if [ -z "${SPOTSAFE_REPO}" ]; then return 0; fi
  if ! command -v git > /dev/null; then install_packages git; fi
  if [ -d "${SPOTSAFE_CODE_DIR}/.git" ]; then
    log "updating ${SPOTSAFE_CODE_DIR}"
  else
    log "cloning ${SPOTSAFE_REPO} into ${SPOTSAFE_CODE_DIR}"
    as_user mkdir -p "$(dirname "${SPOTSAFE_CODE_DIR}")"
    as_user git clone --quiet "${SPOTSAFE_REPO}" "${SPOTSAFE_CODE_DIR}"
  fi
  if [ "${SPOTSAFE_CODE_PIN}" = 1 ] && [ -f "${SPOTSAFE_CODE_PIN_FILE}" ]; then
    read -r pinned_ref pinned_commit < "${SPOTSAFE_CODE_PIN_FILE}" || true
  fi
  if [ -n "${pinned_commit}" ] && [ "${pinned_ref}" = "${SPOTSAFE_REF}" ]; then
    if ! as_user git -C "${SPOTSAFE_CODE_DIR}" cat-file -e "${pinned_commit}^{commit}" 2> /dev/null; then
      as_user git -C "${SPOTSAFE_CODE_DIR}" fetch --quiet origin "${pinned_commit}" \
        || die "the run's pinned commit ${pinned_commit} (${SPOTSAFE_CODE_PIN_FILE}) is not in ${SPOTSAFE_REPO}"
    fi
    as_user git -C "${SPOTSAFE_CODE_DIR}" checkout --quiet --force "${pinned_commit}"
    log "code at ${pinned_commit}: pinned when the run started on ${pinned_ref} (delete ${SPOTSAFE_CODE_PIN_FILE} or change SPOTSAFE_REF to move on)"
  else
    if [ -n "${pinned_commit}" ]; then
      log "SPOTSAFE_REF is now ${SPOTSAFE_REF} (the run started on ${pinned_ref}): moving the run to it"
    fi
    as_user git -C "${SPOTSAFE_CODE_DIR}" fetch --quiet origin "${SPOTSAFE_REF}"
    as_user git -C "${SPOTSAFE_CODE_DIR}" checkout --quiet --force FETCH_HEAD
    commit=$(as_user git -C "${SPOTSAFE_CODE_DIR}" rev-parse HEAD)
    if [ "${SPOTSAFE_CODE_PIN}" = 1 ]; then
      mkdir -p "$(dirname "${SPOTSAFE_CODE_PIN_FILE}")"
      printf '%s %s\n' "${SPOTSAFE_REF}" "${commit}" > "${SPOTSAFE_CODE_PIN_FILE}.tmp"
      mv -f "${SPOTSAFE_CODE_PIN_FILE}.tmp" "${SPOTSAFE_CODE_PIN_FILE}"
    fi
    log "code at ${commit} (${SPOTSAFE_REF})"
  fi
  if [ -n "${SPOTSAFE_REQUIREMENTS}" ]; then
    "${SPOTSAFE_PYTHON}" -m pip install --quiet -r "${SPOTSAFE_CODE_DIR}/${SPOTSAFE_REQUIREMENTS}"
  fi
}

# A completed run: stop the platform from replacing this VM (AWS: the Auto Scaling group /
# spot request; GCP: the managed instance group to 0; Azure: the scale set to 0), shut down.
finish_run() {
  if [ "${SPOTSAFE_SHUTDOWN_WHEN_DONE}" != 1 ]; then
    log "run ${SPOTSAFE_RUN} is complete (SPOTSAFE_SHUTDOWN_WHEN_DONE=0: staying up)"
    return 0
  fi
  resolve_cloud
  local finish=("${FINISH_MODULE}")
  if [ "${cloud}" = aws ]; then finish+=(finish "${VOLUME_ARGS[@]}"); fi
  log "run ${SPOTSAFE_RUN} is complete: stopping replacement (${cloud}) and shutting down"
  "${SPOTSAFE_PYTHON}" -m "${finish[@]}" \
    || log "could not stop the group / spot request from replacing this VM (see above); shutting down anyway"
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
# Crash loops are bounded: python -m spotsafe.resume already restarts the command. When
# it gives up the instance shuts down (after-train); so it does when systemd's own limit is
# hit (StartLimitAction=poweroff in the drop-in). Both only with SPOTSAFE_SHUTDOWN_ON_FAILURE=1.
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
# 75: the state is safe and this instance is being taken away: a success, nothing to restart.
SuccessExitStatus=75
RestartPreventExitStatus=75
SyslogIdentifier=spotsafe-train

[Install]
WantedBy=multi-user.target
UNIT
  local on_limit=none
  if [ "${SPOTSAFE_SHUTDOWN_ON_FAILURE}" = 1 ]; then on_limit=poweroff; fi
  local requires="# no volume (SPOTSAFE_ATTACH=0): nothing to wait for"
  if [ "${SPOTSAFE_ATTACH}" = 1 ]; then requires="RequiresMountsFor=${SPOTSAFE_MOUNT}"; fi
  cat > "${unit}.d/spotsafe.conf" <<DROPIN
[Unit]
${requires}
StartLimitAction=${on_limit}

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
  if [ "${SPOTSAFE_SNAPSHOT_EVERY}" != 0 ]; then
    # A transient unit for this boot: incremental snapshots while the run trains. Never a
    # reason to fail the boot: training goes on without them.
    if systemctl is-active --quiet spotsafe-snapshots.service; then
      log "spotsafe-snapshots is already running"
    elif systemd-run --unit=spotsafe-snapshots --collect --no-block \
      --property=EnvironmentFile="${SPOTSAFE_ETC}/spotsafe.env" "${SPOTSAFE_INSTALL_PATH}" snapshots; then
      log "started spotsafe-snapshots (every ${SPOTSAFE_SNAPSHOT_EVERY} s, keeping ${SPOTSAFE_SNAPSHOT_KEEP})"
    else
      log "warning: could not start spotsafe-snapshots; training without periodic snapshots"
    fi
  fi
}

# ----------------------------------------------------------------- phases

phase_boot() {
  mkdir -p "$(dirname "${SPOTSAFE_BOOT_LOG}")"
  exec > >(tee -a "${SPOTSAFE_BOOT_LOG}") 2>&1
  resolve_cloud
  log "boot on ${cloud} ($(where_am_i)): run ${SPOTSAFE_RUN}, store ${SPOTSAFE_STORE}"
  install_self
  ensure_user
  ensure_python
  if [ "${SPOTSAFE_ATTACH}" = 1 ]; then
    mount_volume
  else
    prepare_without_volume
  fi
  if is_complete; then
    log "the run in ${SPOTSAFE_STORE} is complete: not restarting it"
    finish_run
    return 0
  fi
  fetch_code
  write_env
  if [ -n "${SPOTSAFE_SECRETS}" ]; then
    # Read now (names only in the log) so a missing parameter or permission fails the boot by name.
    local names
    names=$("${SPOTSAFE_PYTHON}" -m spotsafe.cloud.aws.secrets --check) \
      || die "cannot read the run's secrets (SPOTSAFE_SECRETS=${SPOTSAFE_SECRETS}; see above)"
    log "secrets the instance role can read: ${names}"
  fi
  if [ "${SPOTSAFE_SKIP_SYSTEMD}" = 1 ]; then
    train_in_foreground
    return 0
  fi
  install_unit
}

# SPOTSAFE_SKIP_SYSTEMD=1: the unit's phases, in this process (and the snapshots beside them).
train_in_foreground() {
  log "SPOTSAFE_SKIP_SYSTEMD=1: training in the foreground"
  local rc=0 snapshots=""
  if [ "${SPOTSAFE_SNAPSHOT_EVERY}" != 0 ]; then
    "${SPOTSAFE_INSTALL_PATH}" snapshots &
    snapshots=$!
    log "periodic snapshots every ${SPOTSAFE_SNAPSHOT_EVERY} s beside training (pid ${snapshots})"
  fi
  as_user "${SPOTSAFE_INSTALL_PATH}" train || rc=$?
  if [ -n "${snapshots}" ]; then
    kill -TERM "${snapshots}" 2> /dev/null || true
    wait "${snapshots}" || true
  fi
  "${SPOTSAFE_INSTALL_PATH}" after-train "${rc}" foreground
  # 75: stopped for the interruption with the state safe: this boot did its job.
  if [ "${rc}" != 0 ] && [ "${rc}" != 75 ]; then exit "${rc}"; fi
}

# AWS: incremental snapshots of the volume every SPOTSAFE_SNAPSHOT_EVERY seconds, until SIGTERM.
phase_snapshots() {
  resolve_cloud
  if [ "${cloud}" != aws ]; then die "snapshots are of an EBS volume: AWS only (this is ${cloud})"; fi
  ensure_python
  exec "${SPOTSAFE_PYTHON}" -m spotsafe.volume snapshot "${VOLUME_SELECTOR[@]}" \
    --every "${SPOTSAFE_SNAPSHOT_EVERY}" --keep "${SPOTSAFE_SNAPSHOT_KEEP}" "${VOLUME_ARGS[@]}"
}

# The settings as this script resolved them (NAME='value' lines, the environment file's format).
phase_settings() {
  local name
  resolve_cloud
  for name in "${SETTINGS[@]}"; do printf "%s='%s'\n" "${name}" "${!name}"; done
}

# GCE's shutdown-script (a preemption, a stop): the unit stops, so the supervisor gets SIGTERM
# and the run checkpoints within the notice, whatever the watcher has heard.
phase_stop() {
  log "the VM is shutting down: stopping spotsafe-train.service (the run checkpoints first)"
  systemctl stop spotsafe-train.service || log "could not stop spotsafe-train.service (not running?)"
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
  local stop_mark="${SPOTSAFE_LOG_DIR}/.${SPOTSAFE_RUN}.stopped" rc=0 pid secrets=()
  rm -f "${stop_mark}"
  # The run's secrets go into the environment of the supervisor and training only (read with the role).
  if [ -n "${SPOTSAFE_SECRETS}" ]; then secrets=("${SPOTSAFE_PYTHON}" -m spotsafe.cloud.aws.secrets --); fi
  "${secrets[@]}" "${SPOTSAFE_PYTHON}" -m spotsafe.resume --store "${SPOTSAFE_STORE}" \
    --max-restarts "${SPOTSAFE_MAX_RESTARTS}" -- /bin/bash -c "exec ${SPOTSAFE_TRAIN_COMMAND}" &
  pid=$!
  # A stop (systemctl stop, a shutdown: KillMode=mixed signals this shell only) is handed to
  # the supervisor, which hands it to the training process for its last checkpoint; the mark
  # tells after-train that this exit is a stop, not a crash loop to shut down for.
  trap 'touch "${stop_mark}"; kill -TERM "${pid}" 2> /dev/null || true' TERM INT
  while true; do
    rc=0
    wait "${pid}" || rc=$?
    if ! kill -0 "${pid}" 2> /dev/null; then break; fi
  done
  exit "${rc}"
}

# As root after the training process ended (the unit's ExecStopPost): finish a completed run.
phase_after_train() {
  # $2: the training's exit status (foreground), else systemd's EXIT_STATUS; $3: "foreground".
  local rc="${2:-${EXIT_STATUS:-}}" how="${3:-systemd}"
  if [ -z "${SPOTSAFE_PYTHON}" ]; then SPOTSAFE_PYTHON="${SPOTSAFE_VENV}/bin/python"; fi
  case "${rc}" in
    0) ;;
    75)
      log "training stopped for the interruption with its state safe (exit 75): the replacement resumes it"
      return 0
      ;;
    *)
      if [ -f "${SPOTSAFE_LOG_DIR}/.${SPOTSAFE_RUN}.stopped" ]; then
        rm -f "${SPOTSAFE_LOG_DIR}/.${SPOTSAFE_RUN}.stopped"
        log "training was stopped (exit ${rc}): not a crash, nothing to do"
      elif [ "${how}" = foreground ] || [ "${EXIT_CODE:-exited}" = exited ]; then
        # python -m spotsafe.resume exits on its own only after SPOTSAFE_MAX_RESTARTS restarts
        # of the command (with the command's status): a GPU idling behind a crash loop bills by the hour.
        log "the training command kept crashing: the supervisor gave up (exit ${rc})"
        shutdown_on_failure "the run crash-loops"
      else
        # The supervisor itself was killed (${EXIT_CODE}: OOM, a signal): systemd restarts the
        # unit, and StartLimitAction=poweroff bounds that.
        log "training ended by ${EXIT_CODE} ${rc} (${SERVICE_RESULT:-}): systemd restarts it"
      fi
      return 0
      ;;
  esac
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
  snapshots) phase_snapshots ;;
  settings) phase_settings ;;
  stop) phase_stop ;;
  *) die "unknown phase ${phase}: use boot, settings, train, after-train, snapshots or stop" ;;
esac
