"""One plot of several NIAH runs (e.g. RULER's haystacks, the filler-needle setting, real text).

  python experiments/plot_settings.py --runs=faithful=out/study/faithful,filler_needles=out/study/filler,real_text=out/study/realtext --output=docs/niah_settings.png

Each run is a `experiments/niah.py` workdir (its niah.json); the plot shows accuracy over all
variants asked (MSA solid, BM25 top-1 dashed), over the single-needle variants, and the router's
recall@1, against memory size.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from msa_jax.studies import plots  # noqa: E402

_RUNS = flags.DEFINE_list("runs", None, "name=workdir pairs.", required=True)
_OUTPUT = flags.DEFINE_string("output", "out/niah_settings.png", "The PNG to write.")


def main(argv):
  del argv
  runs = {}
  for item in _RUNS.value:
    name, _, workdir = item.partition("=")
    if not workdir:
      raise app.UsageError(f"--runs entries are name=workdir, got {item!r}")
    with open(os.path.join(workdir, "niah.json")) as f:
      runs[name] = json.load(f)
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  plots.settings(runs, _OUTPUT.value)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
