#!/usr/bin/env bash
# Does CLIP-I see damage? On the toy world (no CLIP: its ViT classifier's [CLS] embedding, through --clip-model):
# the demo's fine-tune, and the same run at 10x the learning rate, each evaluated against the base model on the
# world's prompt, 64 paired images. Run from the repository root: bash docs/quality/toyworld.sh OUT
set -euo pipefail
out=$1
mkdir -p "$out"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: the records do not depend on the load
world=tests/toyworld_model
echo "photo of the face of a computer scientist" > "$out/prompt.txt"
python -m tests.toyworld demo "$out/demo" > "$out/demo.log" 2>&1
flags=$(python -c "from tests import toyworld; print(' '.join(toyworld.cli_flags()))")
python ddpo_debias.py $flags --reward=balance --epochs=16 --lr=5e-3 --output-dir "$out/broken" > "$out/broken.log" 2>&1
evaluate() {  # $1 name, rest: extra flags
  local name=$1; shift
  python ddpo_debias.py --evaluate --model $world --classifier $world/classifier --clip-model $world/classifier \
    --eval-prompts "$out/prompt.txt" --eval-images 64 --num-steps 5 --guidance-scale 5 --mixed-precision no \
    --device cpu --output-dir "$out/eval-$name" "$@" > "$out/eval-$name.log" 2>&1
}
evaluate base
evaluate demo --unet "$out/demo/unet" --compare "$out/eval-base/eval.json"
evaluate broken --unet "$out/broken/unet" --compare "$out/eval-base/eval.json"
for name in base demo broken; do tail -3 "$out/eval-$name.log"; done
