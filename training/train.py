"""Multi-task Mod-Squad training, for `accelerate launch`.

    # two processes on one machine; without GPUs, two CPU processes joined by gloo (`--multi_gpu` is Accelerate's
    # torchrun launcher; `--cpu --num_processes 2` would start only one process)
    accelerate launch --multi_gpu --num_processes 2 training/train.py --config training/configs/demo.yaml
    # the same from a config file; training.cpu=true keeps the processes on the CPU where GPUs exist
    accelerate launch --config_file training/accelerate/cpu_2proc.yaml training/train.py \
        --config training/configs/demo.yaml training.cpu=true
    # Accelerate's settings apply unless the recipe sets them: here bf16 mixed precision
    accelerate launch --mixed_precision bf16 training/train.py --config training/configs/demo.yaml

Takes the same arguments as `modsquad train` (recipe overrides, --resume, --output-dir, --max-steps).
"""

import sys

from modsquad.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
