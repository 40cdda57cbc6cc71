"""Training: optax SGD-Nesterov, data-parallel pure steps, orbax checkpoints, resume.

``fit(config, workdir, train_feed, test_feed)`` trains one model on the batches
of two ``data.loader.Feed`` and is resumable: a checkpoint is written (atomically,
by orbax, with the sha256 of each of its arrays: ``store/checkpoints.py``) after every epoch, and a re-run with
the same work directory continues from the last checkpoint that reads back
with those checksums; one that does not is named in an error log and
deleted. Each epoch's shuffling and augmentation keys derive from
``(seed, epoch)`` only, so a run that was killed and resumed ends with the
same parameters as one that was not. A non-finite training loss, or one that explodes
(``LossGuard``: a window's mean above ``config.runtime.loss_explosion_factor`` × the
first step's loss or chance level), stops the run (``FloatingPointError`` naming the
epoch, the steps and ``config.train.lr``), keeping the last checkpoint.

The step functions are pure and compiled once; the batch is split over the
data axis of ``sharding.data_mesh()`` and the state replicated, so the same
code runs on 1 CPU or many accelerators (XLA inserts the gradient all-reduce;
batch-norm statistics are over the global batch, as on one device).
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from overinterp_jax import cpu_budget, memory, precision, sharding
from overinterp_jax.data import augment, loader
from overinterp_jax.models import InputDropout, create_model, torch_weights
from overinterp_jax.models.batch_norm import DEFAULT_MOMENTUM
from overinterp_jax.progress import progress_bar
from overinterp_jax.store import atomic, checkpoints

# Key of the input-dropout stream at evaluation: fixed, so evaluation (and SIS,
# docs/method.md §6.4) is deterministic.
EVAL_INPUT_DROPOUT_KEY = 0


class TrainState(struct.PyTreeNode):
  """Everything a training step reads and writes (a pytree)."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


SCHEDULES = ("multistep", "onecycle", "cosine")


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Per-step learning rate.

  ``config.train.schedule``: ``"multistep"`` (the paper: ``train.lr`` × ``train.lr_decay``
  at each epoch in ``train.lr_milestones``), ``"onecycle"`` (cosine one-cycle peaking at
  ``train.lr``, for short budgets) or ``"cosine"`` (cosine decay from ``train.lr``).
  ``steps_per_epoch`` counts steps of ``config.train.batch_size``; epochs with a larger
  batch (``cpu_budget.epoch_batch_multipliers``) follow ``cpu_budget.scale_schedule``.
  """
  return cpu_budget.scale_schedule(_base_schedule(config, steps_per_epoch), config,
                                   steps_per_epoch)


def _base_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  total = config.train.num_epochs * steps_per_epoch
  if config.train.schedule == "multistep":
    boundaries = {int(e) * steps_per_epoch: float(config.train.lr_decay)
                  for e in config.train.lr_milestones}
    return optax.piecewise_constant_schedule(config.train.lr, boundaries)
  if config.train.schedule == "onecycle":
    return optax.cosine_onecycle_schedule(total, config.train.lr,
                                          pct_start=config.train.warmup_fraction,
                                          div_factor=25.0, final_div_factor=1e3)
  if config.train.schedule == "cosine":
    return optax.cosine_decay_schedule(config.train.lr, total)
  raise ValueError(f"config.train.schedule must be one of {list(SCHEDULES)}, got "
                   f"{config.train.schedule!r}.")


def config_augment_fn(config) -> Callable:
  """The ``augment_fn`` of ``config``: random crop with ``config.train.augment.padding``
  pixels of padding and a random flip, or the crop alone when ``config.train.augment.flip ==
  "alternating"`` (the input pipeline mirrors: ``cpu_budget.mirrored``)."""
  return functools.partial(augment.augment_images, padding=int(config.train.augment.padding),
                           flip=cpu_budget.augment_flip(config) == "random")


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and (PyTorch-style, coupled) weight decay on all parameters."""
  return optax.chain(
      optax.add_decayed_weights(config.train.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.train.momentum,
                nesterov=config.train.nesterov))


def build_model(config) -> nn.Module:
  """``config.model.name`` from the registry, wrapped in input dropout when
  ``config.model.input_keep_prob < 1`` (paper §5: 0.8, active in training and
  evaluation); ``config.model.bn_momentum`` (default 0.9, PyTorch's 0.1) for its batch norm;
  Inception v3's ``transform_input`` from ``config.model.transform_input``
  (``torch_weights.transform_input_for``: "auto" reads a timm ``config.json`` beside
  ``config.model.weights``)."""
  bn_momentum = float(config.model.bn_momentum)
  if not 0 <= bn_momentum < 1:
    raise ValueError(f"config.model.bn_momentum must be in [0, 1), got {bn_momentum}.")
  kwargs = {} if bn_momentum == DEFAULT_MOMENTUM else {"bn_momentum": bn_momentum}
  setting = config.model.transform_input
  if config.model.name == "inception_v3":
    kwargs["transform_input"] = torch_weights.transform_input_for(setting, config.model.weights)
  elif setting != "auto":
    raise ValueError(f"config.model.transform_input={setting!r}: only inception_v3 has "
                     f"transform_input, not config.model.name={config.model.name!r}.")
  try:
    model = create_model(config.model.name, num_classes=config.model.num_classes, **kwargs)
  except TypeError as e:
    if "bn_momentum" not in str(e):
      raise
    raise ValueError(f"config.model.bn_momentum={bn_momentum}: model {config.model.name!r} has no "
                     "batch norm.") from e
  keep_prob = float(config.model.input_keep_prob)
  if not 0 < keep_prob <= 1:
    raise ValueError(f"config.model.input_keep_prob must be in (0, 1], got {keep_prob}.")
  return InputDropout(model, keep_prob=keep_prob) if keep_prob < 1 else model


def create_train_state(model: nn.Module, tx, image_shape, key) -> TrainState:
  variables = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  variables = dict(variables)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    apply_fn=model.apply, tx=tx)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state: TrainState, images, labels, key, augment_fn=None,
               compute_dtype: str = "float32"):
  """One SGD step on a batch. ``images [B, H, W, C]`` float32, ``labels [B]`` int32.

  ``augment_fn(key, images) -> images`` runs on device inside the step; the
  model's ``dropout`` and ``input_dropout`` streams get keys split from ``key``.
  ``compute_dtype`` (``precision.POLICIES``): the forward and backward pass run
  in it; parameters, gradients, optimiser state and batch statistics stay float32.
  Returns the new state and ``{"loss", "accuracy"}`` of the batch.
  """
  augment_key, dropout_key, input_dropout_key = jax.random.split(key, 3)
  if augment_fn is not None:
    images = augment_fn(augment_key, images)
  rngs = {"dropout": dropout_key, "input_dropout": input_dropout_key}

  dtype = precision.compute_dtype(compute_dtype)

  def loss_fn(params):
    variables = precision.cast_floats({"params": params, "batch_stats": state.batch_stats},
                                      dtype)
    logits, updates = state.apply_fn(variables, images.astype(dtype), train=True,
                                     mutable=["batch_stats"], rngs=rngs)
    updates = precision.cast_floats(updates, jnp.float32)
    return cross_entropy(logits.astype(jnp.float32), labels), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, param_updates),
                            batch_stats=updates.get("batch_stats", state.batch_stats),
                            opt_state=opt_state)
  accuracy = (jnp.argmax(logits, -1) == labels).mean()
  return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, images, labels, valid):
  """Sums over a padded batch: ``valid [B]`` bool marks real examples."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          images, train=False,
                          rngs={"input_dropout": jax.random.key(EVAL_INPUT_DROPOUT_KEY)})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  return {"loss_sum": jnp.sum(jnp.where(valid, loss, 0.0)),
          "correct": jnp.sum(correct & valid), "count": jnp.sum(valid)}


@dataclass
class Steps:
  """The compiled steps of one model, sharded over ``mesh``."""
  train: Callable
  eval: Callable
  mesh: Any


def compile_steps(mesh, augment_fn=None, train_height_width=None,
                  compute_dtype: str = "float32") -> Steps:
  """Jitted steps. With ``train_height_width``, the training step resizes each
  (augmented) batch to it (progressive resizing); evaluation is at the input size.
  ``compute_dtype``: of the training step's model evaluation (``train_step``)."""
  data = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  train_augment = augment_fn
  if train_height_width is not None:
    def train_augment(key, images):
      images = images if augment_fn is None else augment_fn(key, images)
      return augment.resize_images(images, *train_height_width)
  train = jax.jit(lambda s, x, y, k: train_step(s, x, y, k, train_augment, compute_dtype),
                  in_shardings=(repl, data, data, repl), out_shardings=(repl, repl),
                  donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(repl, data, data, data), out_shardings=repl)
  return Steps(train=train, eval=evaluate, mesh=mesh)


def evaluate(steps: Steps, state: TrainState, feed: loader.Feed, batch_size: int) -> dict:
  """Loss and accuracy over every example of ``feed`` once (the last batch padded and
  masked out)."""
  ndev = steps.mesh.devices.size  # a multiple of the process count
  batch_size = -(-batch_size // ndev) * ndev
  totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
  plan, valid = loader.eval_plan(len(feed), batch_size)
  for (x, y), ok in zip(feed.batches(plan), valid):
    x, y, ok = (sharding.global_batch(steps.mesh, a) for a in (x, y, ok))
    out = jax.device_get(steps.eval(state, x, y, ok))
    for k in totals:
      totals[k] += out[k]
  count = max(int(totals["count"]), 1)
  return {"loss": float(totals["loss_sum"]) / count, "accuracy": int(totals["correct"]) / count,
          "count": int(totals["count"])}


def _write_jsonl(path: str, records: list[dict]) -> None:
  """Replaces ``path`` atomically with one JSON object per line."""
  atomic.write_atomic(path, lambda fh: fh.writelines(json.dumps(r) + "\n" for r in records))


def read_metrics(path: str) -> list[dict]:
  """Per-epoch records of ``metrics.jsonl`` (empty if the file does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def restore_trained(config, workdir: str, image_shape, num_train: int,
                    mesh=None) -> TrainState | None:
  """The final state of a finished ``fit`` run in ``workdir`` (verified
  against its stored checksums), else None."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  manager = checkpoints.manager(directory, config.train.checkpoints_to_keep)
  try:
    if manager.latest_step() != config.train.num_epochs:
      return None
    tx = make_optimizer(config, max(1, num_train // config.train.batch_size))
    state = create_train_state(build_model(config), tx, image_shape,
                               jax.random.key(config.train.seed))
    step, state = checkpoints.restore_latest(manager, workdir, state)
  finally:
    manager.close()
  if step != config.train.num_epochs:
    return None
  mesh = mesh if mesh is not None else sharding.data_mesh()
  return jax.device_put(state, sharding.replicated(mesh))


@dataclass
class LossGuard:
  """What stops a diverging run (``check``): a non-finite training loss, or a window of
  steps whose mean loss exceeds ``factor`` × ``reference`` (``factor`` 0: no limit).

  ``reference`` is the larger of chance level, ``ln(num_classes)`` (a fresh model's loss),
  and the first training step's loss (``initial``, kept in ``metrics.jsonl`` so a resumed
  run has the same limit). ``lr`` says what the message names: ``config.train.lr`` and the
  schedule (``step -> learning rate``).
  """
  workdir: str
  num_classes: int
  factor: float
  lr: float
  schedule: Callable
  initial: float | None = None

  @property
  def reference(self) -> float:
    chance = float(np.log(self.num_classes))
    return chance if self.initial is None else max(chance, self.initial)

  def check(self, losses, first_step: int, epoch: int, num_steps: int, global_step: int
            ) -> None:
    """Raises ``FloatingPointError`` at the first non-finite value of ``losses`` (the
    training losses of steps ``first_step, first_step + 1, ...`` of ``epoch``, 1-based;
    ``global_step``: the optimiser's step after the last of them), or when their mean
    exceeds the limit. Notes the first step's loss of a fresh run as ``initial``."""
    losses = np.asarray(losses, np.float64)
    kept = (f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1
            else "no checkpoint was written")
    rate = (f"config.train.lr={self.lr:g} (the learning rate at this step: "
            f"{float(self.schedule(max(global_step - 1, 0))):.4g})")
    bad = np.flatnonzero(~np.isfinite(losses))
    finite = losses[:bad[0]] if bad.size else losses  # the steps before the first bad one
    if self.initial is None and epoch == 1 and first_step == 1 and finite.size:
      self.initial = float(finite[0])
    mean = float(finite.mean()) if finite.size else 0.0
    then = "" if not bad.size else (f", then {float(losses[bad[0]])} at step "
                                    f"{first_step + int(bad[0])}")
    if self.factor and mean > self.factor * self.reference:
      raise FloatingPointError(
          f"Training {self.workdir} stopped: the loss diverged. Its mean over steps "
          f"{first_step}-{first_step + finite.size - 1} of {num_steps} in epoch {epoch} is "
          f"{mean:.4g}{then}, more than {self.factor:g} × {self.reference:.4g} (the larger of "
          f"the first step's loss and chance level ln {self.num_classes}); {kept}. The "
          f"learning rate is too high for this model and batch: lower {rate} "
          "(config.runtime.loss_explosion_factor sets this limit; 0 turns it off).")
    if bad.size:
      raise FloatingPointError(
          f"Training {self.workdir} stopped: the loss is {float(losses[bad[0]])} at epoch "
          f"{epoch}, step {first_step + int(bad[0])} of {num_steps}; {kept}. Lower {rate}, "
          "or check config.model.num_classes and the data.")


def check_batch(config, *, num_devices: int | None = None, num_train: int | None = None
                ) -> None:
  """Raises ValueError unless ``config.train.batch_size`` splits over ``num_devices`` and every
  epoch's batch (``epoch_batch_multipliers``) fits in ``num_train`` examples."""
  if num_devices is not None and config.train.batch_size % num_devices:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} must be divisible by the "
                     f"{num_devices} devices (config.runtime.host_devices on a CPU).")
  largest = max(cpu_budget.epoch_batch_multipliers(config))
  if num_train is not None and num_train < config.train.batch_size * largest:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} (× {largest} in "
                     f"config.train.progressive_resizing) exceeds the {num_train} training "
                     "examples.")


def memory_fitted_batch_size(config, image_shape, *, num_devices: int, num_train: int,
                             budget_bytes: int | None = None, cap_per_device: int = 256) -> int:
  """The global batch for ``config.train.batch_size = 0``: per device, the largest power of two
  (at most ``cap_per_device``) whose training step fits the device's memory budget
  (``memory.fit_batch``: XLA's analysis of the compiled step at a probe batch), times
  ``num_devices``; no larger than the training set allows for every epoch's batch.
  The learning rate is not rescaled: ``config.train.lr`` belongs to the batch this gives."""
  model = build_model(config)
  tx = make_optimizer(config, steps_per_epoch=100)
  image_shape = tuple(image_shape)
  state = jax.eval_shape(lambda: create_train_state(model, tx, image_shape, jax.random.key(0)))
  key = jax.random.key(0)
  loss = lambda s, x, y: train_step(s, x, y, key, compute_dtype=config.model.precision)[1]["loss"]
  args_at = lambda b: (state, jax.ShapeDtypeStruct((b,) + image_shape, jnp.float32),
                       jax.ShapeDtypeStruct((b,), jnp.int32))
  cap = min(cap_per_device, max(1, num_train // (max(cpu_budget.epoch_batch_multipliers(config))
                                                  * num_devices)))
  fitted = memory.fit_batch(
      loss, args_at, cap=cap, input_bytes=int(np.prod(image_shape)) * 4,
      budget_bytes=budget_bytes or memory.device_budget_bytes())
  return 2 ** int(np.log2(fitted)) * num_devices


def _mid_epoch_template(state: TrainState) -> dict:
  return {"train_state": state, "loader": _loader_position(0, 0, 0.0, 0.0)}


def _loader_position(epoch: int, batch: int, loss_sum: float, accuracy_sum: float) -> dict:
  """Where the input pipeline stands in a mid-epoch checkpoint (0-d arrays, for orbax)."""
  return {"epoch": np.array(epoch, np.int64), "batch": np.array(batch, np.int64),
          "loss_sum": np.array(loss_sum, np.float64),
          "accuracy_sum": np.array(accuracy_sum, np.float64)}


def fit(config, workdir: str, train_feed: loader.Feed, test_feed: loader.Feed, *,
        augment_fn=None, mesh=None, max_epochs_this_run: int | None = None,
        max_steps_this_run: int | None = None) -> tuple[TrainState, dict]:
  """Trains ``config.model.name`` on the batches of ``train_feed``; returns the final state and
  the test metrics on ``test_feed``.

  Args:
    config: ``model`` (its name, classes, batch norm, input dropout, precision), all of
      ``train`` (recipe, seed, augmentation, ``cpu_budget`` keys), ``eval_batch_size``
      and ``runtime.checkpoint_every_steps``.
    workdir: checkpoints go to ``workdir/checkpoints`` (one per epoch) and
      ``workdir/checkpoints_mid`` (every ``runtime.checkpoint_every_steps`` steps, with the
      input pipeline's position), per-epoch metrics to ``workdir/metrics.jsonl``.
      The newest checkpoint that verifies is resumed, mid-epoch ones at the batch
      they stopped before.
    train_feed, test_feed: ``data.loader.Feed``; epoch ``e`` trains on the batches of
      ``loader.train_plan(config.train.seed, e, ...)``.
    augment_fn: ``(key, images) -> images`` applied on device in each step.
    max_epochs_this_run, max_steps_this_run: stop after this many epochs / steps in
      this call (tests simulate a killed run with them).
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh if mesh is not None else sharding.data_mesh()
  n = len(train_feed)
  check_batch(config, num_devices=mesh.devices.size, num_train=n)
  steps_per_epoch = n // config.train.batch_size  # at config.train.batch_size
  multipliers = cpu_budget.epoch_batch_multipliers(config)
  scales = cpu_budget.epoch_scales(config)
  tx = make_optimizer(config, steps_per_epoch)
  state = jax.device_put(create_train_state(build_model(config), tx, train_feed.image_shape,
                                            jax.random.key(config.train.seed)),
                         sharding.replicated(mesh))
  steps = compile_steps(mesh, augment_fn, compute_dtype=config.model.precision)
  train_fns = {1.0: steps.train}  # per image scale, compiled when first needed
  run = _resume(config, workdir, state, mesh)
  state = run.state
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  # Records are written before their checkpoint; drop any past the checkpoint.
  history = [r for r in read_metrics(metrics_path) if r["epoch"] <= run.start_epoch]
  guard = _loss_guard(config, workdir, steps_per_epoch, history)
  test_metrics = {}
  end_epoch = config.train.num_epochs if max_epochs_this_run is None else min(
      config.train.num_epochs, run.start_epoch + max_epochs_this_run)
  steps_left = max_steps_this_run
  for epoch in range(run.start_epoch, end_epoch):
    scale = scales[epoch]
    train_hw = cpu_budget.scaled_height_width(train_feed.image_shape[:2], scale)
    if scale not in train_fns:
      train_fns[scale] = compile_steps(mesh, augment_fn, train_hw, config.model.precision).train
    batch_size = config.train.batch_size * multipliers[epoch]
    plan = loader.train_plan(config.train.seed, epoch, n, batch_size)
    num_steps = len(plan)
    first = run.start_batch if epoch == run.start_epoch else 0
    bar, batches = _epoch_batches(config, train_feed, plan, first, epoch, scale, train_hw,
                                  augment_fn is not None)
    t0 = time.perf_counter()
    sums = dict(run.sums) if first else {"loss": 0.0, "accuracy": 0.0}
    state, steps_left, last = _train_epoch(
        config, workdir, state, train_fns[scale], batches, mesh, run.mid_manager,
        guard, sums, epoch=epoch, first=first, num_steps=num_steps, batch_size=batch_size,
        t0=t0, bar=bar, steps_left=steps_left)
    if steps_left == 0 and last + 1 < num_steps:
      break  # a run stopped mid-epoch (tests): resumes from its last checkpoint
    seconds = time.perf_counter() - t0
    test_metrics = {}
    if (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == config.train.num_epochs:
      test_metrics = evaluate(steps, state, test_feed, config.eval_batch_size)
    history.append(_epoch_record(config, workdir, epoch, sums, test_metrics, train_hw,
                                 seconds, batch_size, num_steps - first, num_steps,
                                 guard.initial))
    _write_jsonl(metrics_path, history)
    checkpoints.save(run.manager, workdir, epoch + 1, state)
    if steps_left == 0:
      break
  if not test_metrics and not steps_left == 0:
    test_metrics = evaluate(steps, state, test_feed, config.eval_batch_size)
  run.manager.close()
  run.mid_manager.close()
  return state, test_metrics


def _loss_guard(config, workdir: str, steps_per_epoch: int, history: list) -> LossGuard:
  """``fit``'s ``LossGuard``, its initial loss that of the first epoch in ``history``."""
  return LossGuard(workdir, int(config.model.num_classes),
                   float(config.runtime.loss_explosion_factor),
                   float(config.train.lr), learning_rate_schedule(config, steps_per_epoch),
                   history[0].get("initial_loss") if history else None)


def _epoch_batches(config, train_feed: loader.Feed, plan, first: int, epoch: int, scale,
                   train_hw, augmenting: bool):
  """``(progress bar, iterator of (i, (x, y)))`` over batches ``first:`` of ``plan``."""
  n, num_steps = len(train_feed), len(plan)
  batches = train_feed.batches(plan[first:], epoch,
                               cpu_budget.mirrored(config, epoch, n, augmenting))
  size = "" if scale == 1 else f" at {train_hw[0]}x{train_hw[1]}"
  bar = progress_bar(range(first, num_steps),
                     desc=f"epoch {epoch + 1}/{config.train.num_epochs}{size}", unit="batch",
                     leave=False, show=bool(config.runtime.progress))
  return bar, zip(bar, batches)


class _Resumed(NamedTuple):
  """Where ``fit`` starts: the state, the epoch and batch in it, the sums of the epoch's
  training metrics so far, and the checkpoint managers (per epoch, mid-epoch)."""
  state: TrainState
  start_epoch: int
  start_batch: int
  sums: dict
  manager: Any
  mid_manager: Any


def _resume(config, workdir: str, state: TrainState, mesh) -> _Resumed:
  """The newest checkpoint of ``workdir`` that verifies (a mid-epoch one of the epoch the
  last epoch checkpoint ends, when ``runtime.checkpoint_every_steps``), else ``state``."""
  manager = checkpoints.manager(os.path.join(workdir, "checkpoints"),
                                config.train.checkpoints_to_keep)
  mid_manager = checkpoints.manager(os.path.join(workdir, "checkpoints_mid"), 1)
  start_epoch, restored = checkpoints.restore_latest(manager, workdir, state)
  if restored is not None:
    state = jax.device_put(restored, sharding.replicated(mesh))
    logging.info("Resumed %s from epoch %d.", workdir, start_epoch)
  start_batch, sums = 0, {"loss": 0.0, "accuracy": 0.0}
  if int(config.runtime.checkpoint_every_steps) and mid_manager.all_steps():
    _, mid = checkpoints.restore_latest(mid_manager, workdir, _mid_epoch_template(state),
                                        "checkpoints_mid")
    if mid is not None and int(mid["loader"]["epoch"]) == start_epoch:
      state = jax.device_put(mid["train_state"], sharding.replicated(mesh))
      start_batch = int(mid["loader"]["batch"])
      sums = {"loss": float(mid["loader"]["loss_sum"]),
              "accuracy": float(mid["loader"]["accuracy_sum"])}
      logging.info("Resumed %s in epoch %d at batch %d.", workdir, start_epoch + 1,
                   start_batch)
  return _Resumed(state, start_epoch, start_batch, sums, manager, mid_manager)


def _train_epoch(config, workdir: str, state: TrainState, train_fn, batches, mesh, mid_manager,
                 guard, sums: dict, *, epoch: int, first: int, num_steps: int,
                 batch_size: int, t0: float, bar, steps_left: int | None):
  """The steps of epoch ``epoch`` from batch ``first`` (``batches``: ``(i, (x, y))``),
  adding each step's metrics to ``sums`` in place; a mid-epoch checkpoint every
  ``runtime.checkpoint_every_steps`` steps. Stops early when ``steps_left`` reaches 0.
  Returns ``(state, steps_left, index of the last batch trained)``."""
  epoch_key = jax.random.fold_in(jax.random.key(config.train.seed + 1), epoch)
  every = int(config.runtime.checkpoint_every_steps)
  unchecked = []  # losses since the last host sync, checked to be finite there
  i = first - 1
  for i, (x, y) in batches:
    x, y = sharding.global_batch(mesh, x), sharding.global_batch(mesh, y)
    state, m = train_fn(state, x, y, jax.random.fold_in(epoch_key, i))
    unchecked.append(m["loss"])
    if i % 20 == 0 or i == num_steps - 1:
      guard.check(jax.device_get(unchecked), i + 2 - len(unchecked), epoch + 1, num_steps,
                  int(jax.device_get(state.step)))
      unchecked = []
      m = jax.device_get(m)
      bar.set_postfix(loss=f"{float(m['loss']):.3f}",
                      img_s=f"{(i + 1 - first) * batch_size / (time.perf_counter() - t0):.0f}")
    for k in sums:
      sums[k] += m[k]
    if steps_left is not None:
      steps_left -= 1
    if every and (i + 1) % every == 0 and i + 1 < num_steps:
      checkpoints.save(mid_manager, workdir, int(state.step), {
          "train_state": state,
          "loader": _loader_position(epoch, i + 1, float(sums["loss"]),
                                     float(sums["accuracy"]))}, "checkpoints_mid")
    if steps_left == 0:
      break
  return state, steps_left, i


def _epoch_record(config, workdir: str, epoch: int, sums: dict, test_metrics: dict, train_hw,
                  seconds: float, batch_size: int, steps_run: int, num_steps: int,
                  initial_loss) -> dict:
  """Epoch ``epoch``'s line of ``metrics.jsonl`` (train metrics are means over its
  ``num_steps`` steps; ``steps_run`` of them ran in this call, in ``seconds``), logged."""
  record = {"epoch": epoch + 1, "train_loss": float(sums["loss"]) / num_steps,
            "train_accuracy": float(sums["accuracy"]) / num_steps,
            "test_loss": test_metrics.get("loss"),
            "test_accuracy": test_metrics.get("accuracy"),
            "train_height_width": list(train_hw), "epoch_seconds": seconds,
            "batch_size": batch_size,
            "train_images_per_second": steps_run * batch_size / seconds,
            "initial_loss": initial_loss}
  logging.info("%s: epoch %d/%d, train loss %.4f, test accuracy %s, %.1f s (%.0f img/s)",
               workdir, epoch + 1, config.train.num_epochs, record["train_loss"],
               "-" if record["test_accuracy"] is None
               else f"{100 * record['test_accuracy']:.2f}%",
               seconds, record["train_images_per_second"])
  return record
