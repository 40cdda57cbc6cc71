"""Two processes joined by jax.distributed give the single-process results, bit for bit
(SIS records, training through the input pipeline, each process feeding its own
share of every global batch, and stage backselect's Batched Gradient SIS shards)."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.dirname(HERE)}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(pid),
                             str(tmp_path / f"p{pid}.npz")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in (0, 1)]
  single = subprocess.run([sys.executable, WORKER, "0", "-1", str(tmp_path / "single.npz")],
                          env=env, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stdout + single.stderr[-3000:]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  ref = np.load(tmp_path / "single.npz")
  for pid in (0, 1):
    got = np.load(tmp_path / f"p{pid}.npz")
    for key in ("exact_order", "exact_values", "grad_order", "grad_values"):
      np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["kernel"], ref["kernel"], rtol=1e-4, atol=1e-6)
    # Training through the input pipeline, each process feeding its share of every batch:
    # bitwise the single process's parameters.
    params = sorted(k for k in ref.files if k.startswith("fit_param_"))
    assert params and sorted(k for k in got.files if k.startswith("fit_param_")) == params
    for key in params:
      np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    assert got["fit_accuracy"] == ref["fit_accuracy"]
  # Stage backselect (Batched Gradient SIS) over 2 processes: process 0 wrote the same
  # records (3 shard files) as the single process.
  got, ref = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "single.npz")
  stage = sorted(k for k in ref.files if k.startswith("stage_"))
  assert {"stage_order", "stage_values", "stage_targets", "stage_ids"} <= set(stage)
  assert ref["stage_order"].shape == (64, 256)
  for key in stage:
    np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
  for name in ("bgsis_2_processes", "bgsis_1_process"):
    assert sorted(os.listdir(tmp_path / name)) == [f"shard_0000{i}.npz" for i in range(3)]
