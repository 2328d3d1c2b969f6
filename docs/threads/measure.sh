#!/usr/bin/env bash
# Wall time of the toy-world demo (6 epochs) and the README's tiny run at 1 and 2 torch threads, on an idle
# machine and with one busy process on one core (another user's job). Run from the repository root:
#   bash docs/threads/measure.sh > docs/threads/raw.txt
set -u
export HF_HUB_OFFLINE=1
python -m tests.random_sd15 /tmp/threads-tiny --tiny > /dev/null 2>&1
run() {  # $1 label, $2 threads ("" = torch's default), rest: the command
  local label=$1 threads=$2; shift 2
  rm -rf /tmp/threads-run
  local start=$(date +%s.%N)
  if [[ -n $threads ]]; then OMP_NUM_THREADS=$threads "$@" > /dev/null 2>&1; else env -u OMP_NUM_THREADS "$@" > /dev/null 2>&1; fi
  local rc=$?
  echo "$label threads=${threads:-default} rc=$rc seconds=$(echo "$(date +%s.%N) - $start" | bc)"
}
demo=(python -m tests.toyworld demo /tmp/threads-run --epochs 6)
tiny=(python ddpo_debias.py --model /tmp/threads-tiny --classifier /tmp/threads-tiny/classifier --epochs 2 --batch-size 4 --num-steps 4 --mixed-precision no --output-dir /tmp/threads-run)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); torch $(python -c 'import torch; print(torch.__version__, torch.get_num_threads())')"
for load in idle loaded; do
  if [[ $load == loaded ]]; then python -c "while True: pass" & busy=$!; sleep 1; fi
  for threads in "" 1 2; do
    run "$load tiny" "$threads" "${tiny[@]}"
    run "$load demo" "$threads" "${demo[@]}"
  done
  if [[ $load == loaded ]]; then kill $busy; fi
done
