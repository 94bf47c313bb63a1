# Shared by the per-model launchers in scripts/ (sourced, not run). The caller sets CONFIG (train
# config) and PRESET (accelerate config), both relative to the repository root, then sources this.
#
#   scripts/<model>.sh [--gpus N] [--nodes M --node-rank R --master-addr HOST [--master-port P]]
#                      [--dry-run] [key=value ...]
#
# --gpus      GPUs per node (default: every GPU nvidia-smi lists)
# --nodes     machines; run the same command on each, with its own --node-rank (0 on --master-addr)
# --dry-run   print the launch command and validate the train config (with the overrides) exactly
#             as `mftcoder validate` does: keys, values, data paths, and the model (a hub id that is
#             not in the local cache is fine when the hub is reachable, an error with HF_HUB_OFFLINE=1);
#             nothing is launched and no GPU is needed
# key=value   train-config overrides, passed to `mftcoder train` (e.g. learning_rate=1e-4)

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export TOKENIZERS_PARALLELISM=false

usage() { sed -n '4,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
fail() { echo "error: $*" >&2; exit 2; }
whole() { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1 takes a whole number, got '$2'"; }

gpus="" nodes=1 node_rank=0 master_addr="" master_port=29500 dry_run=0 overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus | --nodes | --node-rank | --master-addr | --master-port)
      [ $# -ge 2 ] || fail "$1 needs a value"
      case "$1" in
        --gpus) whole "$1" "$2"; gpus=$2 ;;
        --nodes) whole "$1" "$2"; nodes=$2 ;;
        --node-rank) whole "$1" "$2"; node_rank=$2 ;;
        --master-addr) master_addr=$2 ;;
        --master-port) whole "$1" "$2"; master_port=$2 ;;
      esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *=*) overrides+=("$1"); shift ;;
    *) usage >&2; fail "unknown argument '$1' (train-config overrides are written key=value)" ;;
  esac
done

if [ -z "$gpus" ]; then
  gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$gpus" -gt 0 ] || fail "no GPU found; give the number of GPUs per node with --gpus N"
fi
[ "$gpus" -gt 0 ] && [ "$nodes" -gt 0 ] || fail "--gpus and --nodes must be at least 1"
[ "$node_rank" -lt "$nodes" ] || fail "--node-rank $node_rank is not below --nodes $nodes"

command=(accelerate launch --config_file "$PRESET" --num_machines "$nodes" --num_processes "$((gpus * nodes))")
if [ "$nodes" -gt 1 ]; then
  [ -n "$master_addr" ] || fail "--nodes $nodes needs --master-addr (the address of the node with --node-rank 0)"
  command+=(--machine_rank "$node_rank" --main_process_ip "$master_addr" --main_process_port "$master_port")
  if grep -q '^distributed_type: DEEPSPEED' "$PRESET"; then
    # torchrun on every node instead of DeepSpeed's pdsh launcher (no hostfile or ssh needed)
    command+=(--deepspeed_multinode_launcher standard)
  fi
fi
command+=(-m mftcoder train "$CONFIG" ${overrides[@]+"${overrides[@]}"})

printf '%q ' "${command[@]}"
echo
if [ "$dry_run" = 1 ]; then
  exec python -m mftcoder validate "$CONFIG" ${overrides[@]+"${overrides[@]}"}
fi
exec "${command[@]}"
