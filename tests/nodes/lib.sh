# What tests/nodes/up and tests/nodes/down share: names, where a cluster keeps its state,
# how its processes are started and found again.

fail() {
  echo "error: $*" >&2
  exit 1
}

check_name() {
  [[ $1 =~ ^[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$ ]] ||
    fail "--name must be 1 to 16 lowercase letters, digits or dashes, not '$1'"
}

# Every cluster's files, mounts and logs live under here.
state_dir() {
  echo "${FERROLB_NODES_DIR:-/var/tmp/ferrolb-nodes}/$1"
}

netns_name() {
  echo "ferrolb-$1-$2"
}

# Every process of cluster NAME carries FERROLB_NODES_CLUSTER=NAME in its environment
# (containerd passes it on to its shims); the containers themselves are found through
# their cgroups and namespaces (tests/nodes/down).
marker() {
  echo "FERROLB_NODES_CLUSTER=$1"
}

cluster_pids() {
  local want pid
  want=$(marker "$1")
  for pid in /proc/[0-9]*; do
    pid=${pid#/proc/}
    [ "$pid" = $$ ] && continue
    if { tr '\0' '\n' <"/proc/$pid/environ" | grep -qx "$want"; } 2>/dev/null; then
      echo "$pid"
    fi
  done
}

# start LOG NETNS MNTNS COMMAND...: COMMAND in the background, in network namespace NETNS
# and mount namespace file MNTNS (empty: this machine's), detached from this shell. The
# command is kept as $state/commands/LOG, so that tests/nodes/node can stop and start it
# again; its pid goes to $state/pids/LOG and its output to $state/logs/LOG.log. $name
# and $state must be set.
start() {
  local log=$1 netns=$2 mntns=$3 enter=()
  shift 3
  [ -n "$netns" ] && enter+=("--net=/run/netns/$netns")
  [ -n "$mntns" ] && enter+=("--mount=$mntns")
  if [ ${#enter[@]} -gt 0 ]; then enter=(nsenter "${enter[@]}"); fi
  mkdir -p "$state/commands" "$state/pids" "$state/logs"
  { echo '#!/bin/bash'; printf 'exec'; printf ' %q' "${enter[@]}" "$@"; echo; } >"$state/commands/$log"
  chmod +x "$state/commands/$log"
  launch "$log"
}
launch() {
  env "$(marker "$name")" setsid "$state/commands/$1" >>"$state/logs/$1.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$1"
}

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 seconds=$2 deadline
  shift 2
  deadline=$(($(date +%s) + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "error: $what not ready within ${seconds}s; logs in $state/logs" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# The image name an OCI archive's index gives (io.containerd.image.name).
archive_image_name() {
  tar -xOf "$1" ./index.json | python3 -c '
import json, sys
names = [m.get("annotations", {}).get("io.containerd.image.name") for m in json.load(sys.stdin)["manifests"]]
names = [n for n in names if n]
if not names: sys.exit("the archive names no image (io.containerd.image.name); build it with image/build")
print(names[0])'
}

# kubelet sets these on the whole machine (not per node) and nothing resets them; the
# first cluster up saves them, the last one down restores them.
machine_sysctls=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)
sysctls_file() {
  echo "${FERROLB_NODES_DIR:-/var/tmp/ferrolb-nodes}/sysctls.saved"
}
save_sysctls() {
  local file s
  file=$(sysctls_file)
  [ -e "$file" ] && return
  for s in "${machine_sysctls[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$file"
}
restore_sysctls() {
  local file
  file=$(sysctls_file)
  [ -e "$file" ] || return 0
  sysctl -q -p "$file" >/dev/null
  rm -f "$file"
}
