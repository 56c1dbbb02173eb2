#!/bin/bash
# Run one command against a freshly started local cluster, then ALWAYS take the cluster
# down and check that nothing is left behind (process, mount, loop device, netns, cgroup).
# Exit status: the command's, or 1 when the cluster failed or left something behind.
# pytest's "no tests collected" (5) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
cluster=("${VENV:-.venv}/bin/python" -m localcluster --prefix "${PREFIX:-/opt/shifter-slurm}"
         --sysconfdir "${SYSCONFDIR:-${PREFIX:-/opt/shifter-slurm}/etc}"
         --state-dir "${STATE_DIR:-/var/lib/shifter-cluster}")

status=0
start=$SECONDS
if "${cluster[@]}" up --nodes "${NODES:-2}"; then
    echo "with-cluster: cluster up in $((SECONDS - start)) s; running: $*"
    set -a; source "${STATE_DIR:-/var/lib/shifter-cluster}/cluster.env"; set +a
    "$@"
    status=$?
    if [[ $status == 5 && "$*" == *pytest* ]]; then
        echo "with-cluster: pytest collected no tests: failing" >&2
        status=1
    fi
else
    status=1
    echo "with-cluster: the cluster did not come up" >&2
fi
"${cluster[@]}" down || status=1
if ! "${cluster[@]}" check-clean; then
    echo "with-cluster: cluster-down left the above behind" >&2
    status=1
else
    echo "with-cluster: cluster down, nothing left behind"
fi
exit $status
