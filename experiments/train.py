"""Train an MSA model on synthetic memory tasks.

  python experiments/train.py --config=experiments/configs/demo.py --workdir=out/demo

Resumable: rerunning the command continues from the last checkpoint with the same data order.
Writes <workdir>/metrics.jsonl, <workdir>/tb (TensorBoard), <workdir>/checkpoints (Orbax) and,
at the end, <workdir>/model (HF-format checkpoint: config.json + model.safetensors).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from msa_jax.train import recipe  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop after this many steps in this call.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  recipe.run(_CONFIG.value, _WORKDIR.value, stop_after=_STOP_AFTER.value,
             log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint operation at INFO
  app.run(main)
