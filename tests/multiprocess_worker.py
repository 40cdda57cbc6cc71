"""One process of the two-process test (tests/test_multiprocess.py).

Usage: python tests/multiprocess_worker.py PORT PROCESS_ID OUT.npz
Process count 2, two CPU devices each; with PROCESS_ID = -1 it runs alone
with four CPU devices (the single-process reference).
"""
import sys

import jax

port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_platforms", "cpu")
if pid >= 0:
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
else:
  jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
from overinterp_jax.config_schema import base_config  # noqa: E402
import numpy as np  # noqa: E402

from overinterp_jax import sharding, sis, train  # noqa: E402
from overinterp_jax.models import create_model  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
rng = np.random.default_rng(0)
images = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
w1 = jnp.asarray(rng.normal(size=(48, 8)), jnp.float32)
w2 = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
predict = lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p[0]) @ p[1]
exact = sis.batched_backselect(predict, images, params=(w1, w2), eval_batch_size=8)
grad = sis.gradient_backselect(predict, images, params=(w1, w2), remove_per_step=3)

config = base_config()
config.update(dict(lr=0.1, schedule="cosine", num_epochs=1))
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
np.savez(out, exact_order=exact.order, exact_values=exact.values, grad_order=grad.order,
         grad_values=grad.values, loss=loss, kernel=kernel)
print("done", pid)
