"""Multi-task Mod-Squad training, for `accelerate launch`.

    accelerate launch --num_processes 2 --cpu training/train.py --config training/configs/demo.yaml
    accelerate launch --config_file training/accelerate/cpu_2proc.yaml training/train.py --config ...

Takes the same arguments as `modsquad train` (recipe overrides, --resume, --output-dir, --max-steps).
"""

import sys

from modsquad.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
