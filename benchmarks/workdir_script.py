"""The command-line shell shared by benchmarks that analyse a pipeline work directory."""
from __future__ import annotations

import json
from typing import Callable

from absl import flags

from overinterp_jax import data as data_lib
from overinterp_jax.pipeline.context import Context


def run(compare: Callable) -> None:
  """Loads ``--config``'s data, runs ``compare(Context)`` and prints (and ``--out`` writes)
  its JSON."""
  config, workdir, out_path = flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.out
  dataset = data_lib.load_for_config(config.data, workdir)
  text = json.dumps(compare(Context(config, workdir, dataset)), indent=1)
  print(text)
  if out_path:
    with open(out_path, "w") as fh:
      fh.write(text + "\n")
