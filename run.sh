#!/bin/sh
# The authors' four examples (their run.sh): two concepts, two prompts each, DDIM 50 steps, eta 0, guidance 10, with
# their released adapters and uc.pt (models/authors/) and their sampler (txt2img --authors: x_T on the device, JPEG q75).
# Without the SD v1.5 weights it says how to get them and runs a small example on the toy world's model instead.
# Every setting below can be overridden from the environment, e.g. `TOY_STEPS=2 OUTDIR=/tmp/out sh run.sh`.
# Relative paths are relative to this folder (the repository root).
set -e
cd "$(dirname "$0")"

SD_CKPT="${SD_CKPT:-models/sd/v1-5.ckpt}"
TEAPOT_ADAPTER="${TEAPOT_ADAPTER:-models/authors/adapters/colorful_teapot}"  # their adapter_gs-999
TEDDYBEAR_ADAPTER="${TEDDYBEAR_ADAPTER:-models/authors/adapters/teddybear}"
OUTDIR="${OUTDIR:-outputs/txt2img-samples}"
UC_DIR="${UC_DIR:-models/uc}"
PYTHON="${PYTHON:-python}"
# The toy fallback: its checkpoint (shipped), its number of DDIM steps, and the demo's adapter
# (default: the newest logs/*_demo/checkpoints/adapter, i.e. what `python scripts/demo.py` trained).
TOY_CKPT="${TOY_CKPT:-models/toy/toy-sd.ckpt}"
TOY_STEPS="${TOY_STEPS:-50}"
TOY_ADAPTER="${TOY_ADAPTER:-}"
LOGDIR="${LOGDIR:-logs}"  # where the demo put its run (its --logdir)

txt2img() {
    "$PYTHON" scripts/txt2img.py --ddim_eta 0.0 --n_samples 1 --n_iter 1 --scale 10 --outdir "$OUTDIR" --uc_dir "$UC_DIR" "$@"
}

# example ADAPTER CLASS_WORD PROMPT SEED
example() {
    if [ ! -e "$1" ]; then
        echo "Skipping \"$3\": no adapter at $1. Train the $2 concept first:"
        echo "  python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --actual_resume $SD_CKPT -n $2 --gpus 0, --data_root data/$2 --init_word $2"
        echo "then point this script at it: e.g. $(echo "$2" | tr '[:lower:]' '[:upper:]' | tr -d _)_ADAPTER=logs/<run folder>/checkpoints/adapter sh run.sh"
        return 0
    fi
    txt2img --authors --ddim_steps 50 --ckpt_path "$SD_CKPT" --embedding_path "$1" --prompt "$3" --seed "$4"
}

if [ -f "$SD_CKPT" ]; then
    example "$TEAPOT_ADAPTER" colorful_teapot "colorful_teapot bicycle" 857
    example "$TEAPOT_ADAPTER" colorful_teapot "colorful_teapot cake" 545
    example "$TEDDYBEAR_ADAPTER" teddybear "teddybear on swimming pool" 231
    example "$TEDDYBEAR_ADAPTER" teddybear "teddybear on the beach" 78
    exit 0
fi

cat <<EOF
Stable Diffusion v1.5 weights not found at $SD_CKPT.
To run the authors' four examples, get the real weights (about 4 GB; accept the license on the model card):
  download v1-5-pruned-emaonly.safetensors (or .ckpt) from the stable-diffusion-v1-5/stable-diffusion-v1-5 model
  card on Hugging Face (the runwayml copy was removed in 2024) and save it as models/sd/v1-5.ckpt (a .ckpt) or
  pass SD_CKPT=models/sd/v1-5.safetensors (a .safetensors keeps its extension)
Meanwhile, a small example on the toy world's model (64x64, $TOY_STEPS steps; docs/toy-world.md).
EOF

if [ -z "$TOY_ADAPTER" ]; then
    TOY_ADAPTER=$(ls -dt "$LOGDIR"/*_demo/checkpoints/adapter 2>/dev/null | head -n 1)
fi
if [ -n "$TOY_ADAPTER" ]; then
    echo "Using the demo's adapter $TOY_ADAPTER (concept word: circle)."
    set -- --embedding_path "$TOY_ADAPTER"
else
    echo "No demo adapter found ($LOGDIR/*_demo/checkpoints/adapter; python scripts/demo.py makes one): sampling the toy model without an adapter."
    set --
fi
txt2img --config configs/toy/v1-inference.yaml --ckpt_path "$TOY_CKPT" --H 64 --W 64 --ddim_steps "$TOY_STEPS" \
    --prompt "circle on a green background" --seed 857 "$@"
