#!/bin/bash
# Runs on the host (Vagrant trigger after the last node is up): the playbooks against the
# VMs, in order. Usage: run-playbooks.sh SSH_CONFIG HOSTS [PYTHON]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
ssh_config=$1
hosts=$2
python=${3:-$repo/.venv/bin/python}
cd "$repo"
pb() { echo "==> playbooks $1"; "$python" -m playbooks "$@" --ssh-config "$ssh_config" --hosts "$hosts"; }
pb deploy --ini "$here/DTSetup.ini" --retry-file "$here/.dtake/deploy.retry"
pb cluster --spec "$here/cluster.yaml"
pb resources --spec "$here/cluster.yaml"
pb verify --spec "$here/cluster.yaml"
