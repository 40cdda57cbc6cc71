"""One process of the two-process test (tests/test_multiprocess.py).

Usage: python tests/multiprocess_worker.py PORT PROCESS_ID OUT.npz
Process count 2, one CPU device each; with PROCESS_ID = -1 it runs alone
with two CPU devices (the single-process reference). Two devices in all: every
cross-device sum (gradients, batch-norm statistics) then adds two terms, which
rounds the same in any order, so the two runs can be compared bit for bit. (With
2 × 2 devices against 4 in one process, the cross-process all-reduce groups its
four terms differently and parameters differ in the last bits, ~3e-7 relative.)
"""
import os
import sys

import jax

port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_platforms", "cpu")
if pid >= 0:
  jax.config.update("jax_num_cpu_devices", 1)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
else:
  jax.config.update("jax_num_cpu_devices", 2)

import jax.numpy as jnp  # noqa: E402
from overinterp_jax.config_schema import base_config  # noqa: E402
import numpy as np  # noqa: E402

from overinterp_jax import sharding, sis, train  # noqa: E402
from overinterp_jax.models import create_model  # noqa: E402

assert len(jax.devices()) == 2, jax.devices()
rng = np.random.default_rng(0)
images = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
w1 = jnp.asarray(rng.normal(size=(48, 8)), jnp.float32)
w2 = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
predict = lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p[0]) @ p[1]
exact = sis.batched_backselect(predict, images, params=(w1, w2), eval_batch_size=8)
grad = sis.gradient_backselect(predict, images, params=(w1, w2), remove_per_step=3)

config = base_config()
config.train.update(dict(lr=0.1, schedule="cosine", num_epochs=1))
model = create_model("cnn3", num_classes=10)
tx = train.make_optimizer(config, steps_per_epoch=4)
mesh = sharding.data_mesh()
state = jax.device_put(train.create_train_state(model, tx, (8, 8, 3), jax.random.key(0)),
                       sharding.replicated(mesh))
steps = train.compile_steps(mesh)
x = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
y = np.arange(8, dtype=np.int32)
mine = sharding.process_slice(8)
state, metrics = steps.train(state, sharding.global_batch(mesh, x[mine]),
                             sharding.global_batch(mesh, y[mine]), jax.random.key(1))
loss = float(sharding.to_host(metrics["loss"]))
kernel = sharding.to_host(jax.tree.leaves(state.params)[0])
# Two epochs through the input pipeline: each process feeds its own share of every
# global batch (loader.train_plan), made global by jax.make_array_from_process_local_data.
from configs import smoke  # noqa: E402
from overinterp_jax import data as data_lib  # noqa: E402

cfg = smoke.get_config()
cfg.train.num_epochs, cfg.train.batch_size, cfg.runtime.checkpoint_every_steps = 2, 16, 5
ds = data_lib.load_for_config(cfg.data, "/tmp/unused")
workdir = os.path.join(os.path.dirname(out), "fit_2_processes" if pid >= 0 else "fit_1_process")
fitted, fit_metrics = train.fit(cfg, workdir, ds.feed("train"), ds.feed("test"),
                                augment_fn=train.config_augment_fn(cfg))
fit_params = [sharding.to_host(p) for p in jax.tree.leaves(fitted.params)]
# Stage backselect's Batched Gradient SIS (config.backselect: k = 16 pixels per step) of
# the 64 test images with that model, 3 shards (the last one partial); process 0 writes.
from overinterp_jax.pipeline import backselect_stage, trained  # noqa: E402

module = train.build_model(cfg)
variables = {"params": fitted.params}
cfg.backselect.shard_size = 24
records = backselect_stage.backselect_split(
    os.path.join(os.path.dirname(out), "bgsis_2_processes" if pid >= 0 else "bgsis_1_process"),
    trained.Trained(module, variables, {}, 0.0).apply, variables, ds.feed("test"),
    cfg.backselect, "key", seed=0, progress=False)
stage = records.everything() if pid <= 0 else {}
np.savez(out, exact_order=exact.order, exact_values=exact.values, grad_order=grad.order,
         grad_values=grad.values, loss=loss, kernel=kernel,
         fit_accuracy=fit_metrics["accuracy"],
         **{f"fit_param_{i}": p for i, p in enumerate(fit_params)},
         **{f"stage_{k}": v for k, v in stage.items()})
print("done", pid)
