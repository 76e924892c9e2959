#!/usr/bin/env bash
# Container entrypoint: one image, two roles.
#
#   serve [FLAGS]     the inference API: exec hf-serve (configured by HF_SERVE_* variables). Default.
#   --flag ...        same as `serve --flag ...`
#   train ARGS        exec accelerate launch training/finetune.py ARGS, e.g.
#                       train --recipe training/recipes/bert-sentiment.yaml --output_dir models/bert-sentiment
#                     ACCELERATE_LAUNCH_ARGS adds launcher flags, e.g. "--mixed_precision bf16".
#                     Without them accelerate uses every visible GPU (one process each).
#   anything else     exec'd as is: bash, python ..., nvidia-smi, accelerate env, ...
#
# `exec` everywhere: the server or launcher replaces this shell, so the SIGTERM sent by
# `docker stop` reaches it directly and it can drain in-flight requests.
set -euo pipefail

app_home="${APP_HOME:-/app}"

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    serve)
        shift
        exec hf-serve "$@"
        ;;
    -*)
        exec hf-serve "$@"
        ;;
    train)
        shift
        if [ "$#" -eq 0 ]; then
            echo "entrypoint: 'train' needs arguments, e.g. train --recipe training/recipes/NAME.yaml" >&2
            usage >&2
            exit 2
        fi
        # Split ACCELERATE_LAUNCH_ARGS on whitespace into separate launcher flags.
        read -r -a launch_args <<< "${ACCELERATE_LAUNCH_ARGS:-}"
        # Relative paths in ARGS (recipes, --output_dir models/NAME) resolve against the working
        # directory, /app in the image.
        exec accelerate launch "${launch_args[@]}" "$app_home/training/finetune.py" "$@"
        ;;
    help)
        usage
        ;;
    *)
        exec "$@"
        ;;
esac
