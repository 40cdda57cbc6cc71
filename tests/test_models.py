"""Models: parameter counts, output shapes, registry errors, predict functions,
mean ensembles and input dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax.models import (MODELS, InputDropout, create_model, drop_pixels,
                                   input_dropout_predict_fn, make_ensemble_apply, mean_ensemble,
                                   predict_fn_from)

X32 = jnp.zeros((1, 32, 32, 3), jnp.float32)


pytestmark = pytest.mark.usefixtures("fast_compile")


def abstract_variables(model, x=X32):
  """Variable shapes without computing anything (cheap even for WRN-28-10)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def param_count(name, num_classes=10):
  variables = abstract_variables(create_model(name, num_classes))
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def images(n, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


@pytest.mark.parametrize("name,count", [
    ("resnet20", 269_722),     # He et al. 2016: 0.27M
    ("resnet56", 853_018),     # He et al. 2016: 0.85M
    ("resnet18", 11_173_962),  # kuangliu CIFAR ResNet-18
    ("vgg16", 14_728_266),     # VGG-16-BN, config D, one Linear(512, 10)
    ("wrn28_10", 36_479_194),  # Zagoruyko & Komodakis: 36.5M
])
def test_parameter_counts(name, count):
  assert param_count(name) == count


def test_resnet50_matches_torchvision_parameter_count_and_shapes():
  model = create_model("resnet50", num_classes=1000)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 25_557_032
  # The 3×3 conv of stage 2's first block (v1.5 strides there).
  stage2 = variables["params"]["Bottleneck_3"]
  assert stage2["Conv_1"]["kernel"].shape == (3, 3, 128, 128)
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3))), variables)
  assert logits.shape == (2, 1000)


def test_parameter_count_scales_with_classes():
  # Only the final Dense depends on the number of classes: 64 inputs + 1 bias per class.
  assert param_count("resnet20", 100) - param_count("resnet20", 10) == 90 * 65


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shapes_eval_and_train(name):
  model = create_model(name, num_classes=7)
  side = 75 if name == "inception_v3" else 32  # Inception v3 takes >= 75×75
  x = jax.ShapeDtypeStruct((3, side, side, 3), jnp.float32)
  variables = abstract_variables(model, jnp.zeros((1, side, side, 3)))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out.shape == (3, 7) and out.dtype == jnp.float32
  train_out, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)}), variables, x)
  assert train_out.shape == (3, 7)
  assert jax.tree.structure(updates.get("batch_stats", {})) == jax.tree.structure(
      variables.get("batch_stats", {}))


@pytest.mark.parametrize("name", ["resnet20", "cnn3", "mlp"])
def test_small_models_run(name):
  model = create_model(name, num_classes=5)
  x = images(4, size=8)
  variables = model.init(jax.random.key(0), x, train=False)
  out = model.apply(variables, x, train=False)
  assert out.shape == (4, 5) and bool(jnp.all(jnp.isfinite(out)))
  train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert train_out.shape == (4, 5)
  if "batch_stats" in variables:  # running statistics move in training mode
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg16", "wrn"])
def test_bn_momentum_sets_how_fast_every_running_statistic_moves(name):
  """From zero running means, one training step leaves (1 − momentum) × the batch mean
  in each: momentum 0.99 moves every one a tenth as far as the default 0.9."""
  from overinterp_jax.models import WideResNet
  make = ((lambda **kw: WideResNet(depth=10, widen_factor=1, num_classes=4, **kw))
          if name == "wrn" else (lambda **kw: create_model(name, 4, **kw)))
  x = images(2, size=32)
  variables = make().init(jax.random.key(0), x, train=False)
  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  means = []
  for kw in ({}, {"bn_momentum": 0.99}):
    _, updates = make(**kw).apply({**variables, "batch_stats": zeros}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    means.append([m for path, m in jax.tree_util.tree_leaves_with_path(updates["batch_stats"])
                  if "mean" in jax.tree_util.keystr(path)])
  assert len(means[1]) == len(jax.tree.leaves(variables["batch_stats"])) // 2
  for default, slow in zip(*means):
    np.testing.assert_allclose(slow, 0.1 * default, rtol=1e-4, atol=1e-7)


def test_resnet20_shortcut_has_no_parameters():
  params = abstract_variables(create_model("resnet20", 10))["params"]
  # 1 stem conv + 9 blocks × 2 convs, no 1×1 projection convs anywhere.
  kernels = [x for x in jax.tree.leaves(params) if x.ndim == 4]
  assert len(kernels) == 19 and all(k.shape[:2] == (3, 3) for k in kernels)


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet21'.*resnet20.*wrn28_10"):
    create_model("resnet21", 10)


def test_predict_fn_from_is_eval_mode_and_jittable():
  model = create_model("resnet20", 10)
  x = images(3, size=8)
  variables = model.init(jax.random.key(0), x, train=False)
  predict = jax.jit(predict_fn_from(model, variables))
  np.testing.assert_allclose(predict(x), model.apply(variables, x, train=False), rtol=1e-5,
                             atol=1e-5)


# ----------------------------------------------------------------------------- ensembles


def _members(model, n, x):
  return [model.init(jax.random.key(i), x, train=False) for i in range(n)]


def test_ensemble_of_one_model_is_mean_of_logits():
  model = create_model("cnn3", 4)
  x = images(5, size=16)
  members = _members(model, 3, x)
  logits = [model.apply(v, x, train=False) for v in members]
  predict = jax.jit(make_ensemble_apply(model, members))
  out = predict(x)
  assert out.shape == (5, 4)
  np.testing.assert_allclose(out, sum(logits) / 3, rtol=1e-5, atol=1e-6)
  # Averaging logits is not averaging probabilities; the ensemble returns logits.
  mean_probs = sum(jax.nn.softmax(l) for l in logits) / 3
  assert not np.allclose(jax.nn.softmax(out), mean_probs, atol=1e-4)


def test_ensemble_of_mixed_architectures():
  cnn, mlp = create_model("cnn3", 4), create_model("mlp", 4)
  x = images(2, size=16)
  vc, vm = cnn.init(jax.random.key(0), x), mlp.init(jax.random.key(1), x)
  out = make_ensemble_apply([cnn, mlp.apply], [vc, vm])(x)
  expected = (cnn.apply(vc, x) + mlp.apply(vm, x)) / 2
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mean_ensemble([predict_fn_from(cnn, vc), predict_fn_from(mlp, vm)])(x),
                             expected, rtol=1e-5, atol=1e-6)


def test_ensemble_errors():
  with pytest.raises(ValueError, match="at least one"):
    make_ensemble_apply(create_model("mlp", 2), [])
  with pytest.raises(ValueError, match="2 models but 1 variable"):
    make_ensemble_apply([create_model("mlp", 2)] * 2, [{}])


# ----------------------------------------------------------------------------- input dropout


def test_drop_pixels_keeps_about_keep_prob_and_drops_whole_pixels():
  x = images(64) + 10.0  # no pixel is 0 before dropout
  dropped, keep = drop_pixels(jax.random.key(0), x, keep_prob=0.8)
  assert keep.shape == (64, 32, 32, 1) and keep.dtype == jnp.bool_
  frac = float(keep.mean())
  assert abs(frac - 0.8) < 0.01, frac  # 65,536 pixels: std of the fraction ≈ 0.0016
  zero = dropped == 0
  assert bool(jnp.all(zero.all(-1) == ~keep[..., 0]))  # all channels of a pixel together
  assert bool(jnp.all(jnp.where(keep, dropped == x, True)))
  again, _ = drop_pixels(jax.random.key(0), x, keep_prob=0.8)
  assert bool(jnp.all(again == dropped))


def test_drop_pixels_uses_the_fully_masked_input():
  x = jnp.ones((2, 8, 8, 3))
  fully_masked = jnp.full((8, 8, 3), -5.0)
  dropped, keep = drop_pixels(jax.random.key(1), x, 0.5, fully_masked)
  assert bool(jnp.all(jnp.where(keep, dropped == 1.0, dropped == -5.0)))
  with pytest.raises(ValueError, match="keep_prob"):
    drop_pixels(jax.random.key(1), x, 0.0)


@pytest.fixture(scope="module")
def dropout_model():
  model = InputDropout(create_model("cnn3", 5), keep_prob=0.8, num_samples=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return model, variables


def test_input_dropout_shares_the_wrapped_models_variables(dropout_model):
  model, variables = dropout_model
  base = model.model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert jax.tree.structure(variables) == jax.tree.structure(base)
  # keep_prob = 1 is the plain model.
  x = images(3, size=16)
  full = model.clone(keep_prob=1.0, num_samples=3)
  np.testing.assert_allclose(full.apply(variables, x, rngs={"input_dropout": jax.random.key(9)}),
                             model.model.apply(variables, x), rtol=1e-5, atol=1e-6)


def test_input_dropout_active_and_keyed_in_eval_and_train(dropout_model):
  model, variables = dropout_model
  x = images(4, size=16)
  out = lambda key, train: model.apply(variables, x, train=train, rngs={"input_dropout": key})
  a, b = out(jax.random.key(1), False), out(jax.random.key(2), False)
  assert a.shape == (4, 5)
  assert bool(jnp.all(a == out(jax.random.key(1), False)))  # same key, same output
  assert not np.allclose(a, b)  # dropout is active in evaluation too
  assert not np.allclose(out(jax.random.key(1), True), out(jax.random.key(2), True))
  with pytest.raises(ValueError, match="PRNG stream 'input_dropout'"):
    model.apply(variables, x)


def test_input_dropout_predict_fn_is_deterministic_and_batch_independent(dropout_model):
  model, variables = dropout_model
  x = images(6, size=16)
  predict = jax.jit(input_dropout_predict_fn(model, variables, jax.random.key(3)))
  out = predict(x)
  assert out.shape == (6, 5)
  assert bool(jnp.all(out == predict(x)))
  # Each image's output depends on that image and the key only.
  np.testing.assert_allclose(predict(x[2:5]), out[2:5], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(predict(x[::-1]), out[::-1], rtol=1e-5, atol=1e-6)
  other = input_dropout_predict_fn(model, variables, jax.random.key(4))(x)
  assert not np.allclose(other, out)
  # Usable as an ensemble member.
  ens = mean_ensemble([predict, predict_fn_from(model.model, variables)])(x)
  np.testing.assert_allclose(ens, (out + model.model.apply(variables, x)) / 2, rtol=1e-5,
                             atol=1e-6)


def test_input_dropout_trains_with_batch_norm():
  model = InputDropout(create_model("resnet20", 3), keep_prob=0.8)
  x = images(2, size=8)
  variables = model.init(jax.random.key(0), x)
  out, updates = model.apply(variables, x, train=True, rngs={"input_dropout": jax.random.key(1)},
                             mutable=["batch_stats"])
  assert out.shape == (2, 3) and set(updates) == {"batch_stats"}


def test_input_dropout_predict_fn_rejects_plain_models():
  with pytest.raises(ValueError, match="needs an InputDropout model"):
    input_dropout_predict_fn(create_model("mlp", 2), {}, jax.random.key(0))
