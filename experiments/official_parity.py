"""Training-path parity with the official PyTorch MSA code, as JSON.

  python experiments/official_parity.py --output out/official_parity.json

For every official fixture (checkpoint + batch + the official outputs), runs `msa-jax forward` and
records the largest differences per output array.
"""

import json
import pathlib

import numpy as np
from absl import app, flags

from msa_jax import cli

_DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "official_msa_tiny"
FIXTURES = {"fixture.npz": "ckpt", "fixture_partial_nodecouple.npz": "ckpt_nodecouple"}

flags.DEFINE_string("data", str(_DATA), "folder with the official fixtures and checkpoints")
flags.DEFINE_string("output", "out/official_parity.json", "where to write the JSON results")
FLAGS = flags.FLAGS


def parity(data: pathlib.Path) -> dict[str, dict[str, str]]:
  results = {}
  for fixture, ckpt in FIXTURES.items():
    with np.load(data / fixture) as f:
      reference = dict(f)
    ours = cli.forward_outputs(str(data / ckpt), reference)
    valid = reference["attention_mask"].astype(bool)
    results[fixture] = dict(cli.compare(ours, reference, valid))
  return results


def main(argv):
  del argv
  results = parity(pathlib.Path(FLAGS.data))
  out = pathlib.Path(FLAGS.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
