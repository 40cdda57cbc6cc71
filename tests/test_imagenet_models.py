"""ImageNet models (Inception v3, ResNet-50) and their torch weights.

Parameter counts against torchvision's; logits of weights loaded from a
torch-layout ``.safetensors`` file against a NumPy forward pass with torch's
semantics (NCHW, OIHW) that walks the torch key names itself; the loader's
round trip and errors; one forward+backward pass at full resolution on real
ImageNet photographs.
"""
import io
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.numpy import save_file

from overinterp_jax.models import create_model, torch_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "..", "shared", "data", "imagenet_samples.tar.gz")
MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)

# torchvision's inception_v3 has 27,161,264 parameters with its auxiliary head:
# conv0 768->128 1×1 + bn, conv1 128->768 5×5 + bn, fc 768->1000 (bn: weight + bias).
AUX_HEAD = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)


def param_count(name, num_classes=1000):
  return sum(a.size for a in jax.tree.leaves(
      torch_weights.variables_template(name, num_classes)["params"]))


def test_parameter_counts_match_torchvision():
  assert AUX_HEAD == 3_326_696
  assert param_count("inception_v3") == 27_161_264 - AUX_HEAD == 23_834_568
  assert param_count("resnet50") == 25_557_032


def test_inception_rejects_too_small_images():
  model = create_model("inception_v3", 10)
  with pytest.raises(ValueError, match="at least 75×75.*74×80"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 74, 80, 3))))


# ---------------------------------------------------------------------------
# NumPy reference (torch semantics, float64)
# ---------------------------------------------------------------------------


class State:
  """The torch state dict as float64, recording which keys the reference read."""

  def __init__(self, state):
    self.state, self.used = state, set()

  def __call__(self, key):
    self.used.add(key)
    return self.state[key].astype(np.float64)

  def has(self, key):
    return key in self.state


def conv2d(x, w, stride=1, padding=(0, 0)):
  """``x [N, C, H, W]``, ``w [O, C, kh, kw]`` -> ``[N, O, H', W']`` (torch's Conv2d, no bias)."""
  ph, pw = padding
  kh, kw = w.shape[2:]
  x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
  return np.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)


def batch_norm(S, name, x, eps):
  scale = S(f"{name}.weight") / np.sqrt(S(f"{name}.running_var") + eps)
  shift = S(f"{name}.bias") - S(f"{name}.running_mean") * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def max_pool(x, k=3, stride=2, padding=0):
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
             constant_values=-np.inf)
  return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(4, 5))


def avg_pool_3x3_pad1(x):
  """3×3, stride 1, padding 1, count_include_pad=True: always divides by 9."""
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  return sliding_window_view(x, (3, 3), axis=(2, 3)).sum(axis=(4, 5)) / 9.0


def linear(S, name, x):
  return x @ S(f"{name}.weight").T + S(f"{name}.bias")


relu = lambda x: np.maximum(x, 0.0)


def basic(S, name, x, stride=1, padding=(0, 0)):
  """torchvision's BasicConv2d: conv (no bias), bn eps 1e-3, ReLU."""
  padding = (padding, padding) if isinstance(padding, int) else padding
  return relu(batch_norm(S, f"{name}.bn", conv2d(x, S(f"{name}.conv.weight"), stride, padding),
                         1e-3))


def inception_a(S, n, x):
  b1 = basic(S, f"{n}.branch1x1", x)
  b5 = basic(S, f"{n}.branch5x5_2", basic(S, f"{n}.branch5x5_1", x), padding=2)
  b3 = basic(S, f"{n}.branch3x3dbl_1", x)
  b3 = basic(S, f"{n}.branch3x3dbl_3", basic(S, f"{n}.branch3x3dbl_2", b3, padding=1), padding=1)
  bp = basic(S, f"{n}.branch_pool", avg_pool_3x3_pad1(x))
  return np.concatenate([b1, b5, b3, bp], axis=1)


def inception_b(S, n, x):
  b3 = basic(S, f"{n}.branch3x3", x, stride=2)
  bd = basic(S, f"{n}.branch3x3dbl_1", x)
  bd = basic(S, f"{n}.branch3x3dbl_3", basic(S, f"{n}.branch3x3dbl_2", bd, padding=1), stride=2)
  return np.concatenate([b3, bd, max_pool(x)], axis=1)


def inception_c(S, n, x):
  b1 = basic(S, f"{n}.branch1x1", x)
  b7 = basic(S, f"{n}.branch7x7_1", x)
  b7 = basic(S, f"{n}.branch7x7_2", b7, padding=(0, 3))
  b7 = basic(S, f"{n}.branch7x7_3", b7, padding=(3, 0))
  bd = basic(S, f"{n}.branch7x7dbl_1", x)
  for i, pad in ((2, (3, 0)), (3, (0, 3)), (4, (3, 0)), (5, (0, 3))):
    bd = basic(S, f"{n}.branch7x7dbl_{i}", bd, padding=pad)
  bp = basic(S, f"{n}.branch_pool", avg_pool_3x3_pad1(x))
  return np.concatenate([b1, b7, bd, bp], axis=1)


def inception_d(S, n, x):
  b3 = basic(S, f"{n}.branch3x3_2", basic(S, f"{n}.branch3x3_1", x), stride=2)
  b7 = basic(S, f"{n}.branch7x7x3_1", x)
  b7 = basic(S, f"{n}.branch7x7x3_2", b7, padding=(0, 3))
  b7 = basic(S, f"{n}.branch7x7x3_3", b7, padding=(3, 0))
  b7 = basic(S, f"{n}.branch7x7x3_4", b7, stride=2)
  return np.concatenate([b3, b7, max_pool(x)], axis=1)


def inception_e(S, n, x):
  b1 = basic(S, f"{n}.branch1x1", x)
  b3 = basic(S, f"{n}.branch3x3_1", x)
  b3 = np.concatenate([basic(S, f"{n}.branch3x3_2a", b3, padding=(0, 1)),
                       basic(S, f"{n}.branch3x3_2b", b3, padding=(1, 0))], axis=1)
  bd = basic(S, f"{n}.branch3x3dbl_2", basic(S, f"{n}.branch3x3dbl_1", x), padding=1)
  bd = np.concatenate([basic(S, f"{n}.branch3x3dbl_3a", bd, padding=(0, 1)),
                       basic(S, f"{n}.branch3x3dbl_3b", bd, padding=(1, 0))], axis=1)
  bp = basic(S, f"{n}.branch_pool", avg_pool_3x3_pad1(x))
  return np.concatenate([b1, b3, bd, bp], axis=1)


def reference_inception_v3(S, x_nhwc):
  """torchvision's Inception3 in eval mode, transform_input=True, without AuxLogits."""
  x = x_nhwc.transpose(0, 3, 1, 2).astype(np.float64)
  x = x * (STD / 0.5)[None, :, None, None] + ((MEAN - 0.5) / 0.5)[None, :, None, None]
  x = basic(S, "Conv2d_1a_3x3", x, stride=2)
  x = basic(S, "Conv2d_2a_3x3", x)
  x = max_pool(basic(S, "Conv2d_2b_3x3", x, padding=1))
  x = basic(S, "Conv2d_3b_1x1", x)
  x = max_pool(basic(S, "Conv2d_4a_3x3", x))
  for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = inception_a(S, n, x)
  x = inception_b(S, "Mixed_6a", x)
  for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = inception_c(S, n, x)
  x = inception_d(S, "Mixed_7a", x)
  x = inception_e(S, "Mixed_7c", inception_e(S, "Mixed_7b", x))
  return linear(S, "fc", x.mean(axis=(2, 3)))


def reference_resnet50(S, x_nhwc):
  """torchvision's resnet50 (v1.5) in eval mode."""
  x = x_nhwc.transpose(0, 3, 1, 2).astype(np.float64)
  x = relu(batch_norm(S, "bn1", conv2d(x, S("conv1.weight"), 2, (3, 3)), 1e-5))
  x = max_pool(x, padding=1)
  for layer in range(1, 5):
    block = 0
    while S.has(f"layer{layer}.{block}.conv1.weight"):
      n = f"layer{layer}.{block}"
      stride = 2 if layer > 1 and block == 0 else 1
      y = relu(batch_norm(S, f"{n}.bn1", conv2d(x, S(f"{n}.conv1.weight")), 1e-5))
      y = relu(batch_norm(S, f"{n}.bn2", conv2d(y, S(f"{n}.conv2.weight"), stride, (1, 1)), 1e-5))
      y = batch_norm(S, f"{n}.bn3", conv2d(y, S(f"{n}.conv3.weight")), 1e-5)
      if S.has(f"{n}.downsample.0.weight"):
        x = batch_norm(S, f"{n}.downsample.1",
                       conv2d(x, S(f"{n}.downsample.0.weight"), stride), 1e-5)
      x = relu(y + x)
      block += 1
  return linear(S, "fc", x.mean(axis=(2, 3)))


REFERENCE = {"inception_v3": reference_inception_v3, "resnet50": reference_resnet50}


def random_torch_state(name, num_classes, seed=0):
  """Random torch-layout weights: He-scaled convs, random affine batch norms and running
  statistics, plus int64 ``num_batches_tracked`` (names and shapes from the model)."""
  rng = np.random.default_rng(seed)
  shapes = jax.tree.map(lambda a: np.zeros(a.shape, np.float32),
                        torch_weights.variables_template(name, num_classes))
  state = {}
  for key, a in torch_weights.to_torch_state(shapes, name).items():
    kind = key.rsplit(".", 1)[1]
    if kind == "num_batches_tracked":
      state[key] = np.array(int(rng.integers(1000)), np.int64)
    elif kind == "weight" and a.ndim > 1:
      fan_in = int(np.prod(a.shape[1:]))
      state[key] = (rng.normal(size=a.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif kind == "weight":
      state[key] = rng.uniform(0.8, 1.3, a.shape).astype(np.float32)
    elif kind == "running_var":
      state[key] = rng.uniform(0.8, 1.3, a.shape).astype(np.float32)
    else:  # bias, running_mean
      state[key] = rng.normal(0.0, 0.2, a.shape).astype(np.float32)
  return state


@pytest.mark.parametrize("name,size,num_classes", [("inception_v3", 75, 10),
                                                   ("resnet50", 64, 1000)])
def test_loaded_weights_match_numpy_torch_reference(tmp_path, name, size, num_classes):
  state = random_torch_state(name, num_classes)
  path = tmp_path / f"{name}.safetensors"
  save_file(state, str(path))
  variables = torch_weights.load_safetensors(path, name, num_classes)
  x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  model = create_model(name, num_classes)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  S = State(state)
  expected = REFERENCE[name](S, x)
  # The reference read every tensor but the step counters.
  assert S.used == {k for k in state if not k.endswith("num_batches_tracked")}
  assert logits.shape == expected.shape == (2, num_classes)
  scale = np.abs(expected).max()
  assert scale > 1e-3 and np.abs(expected[0] - expected[1]).max() > 1e-3 * scale
  np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-5 * scale)  # seen: 1e-6


# ---------------------------------------------------------------------------
# Round trip and errors
# ---------------------------------------------------------------------------


def random_variables(name, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32),
                      torch_weights.variables_template(name, num_classes))


@pytest.mark.parametrize("name", ["inception_v3", "resnet50"])
def test_round_trip_is_bitwise_identity(name):
  variables = random_variables(name, 1000)
  template = torch_weights.variables_template(name, 1000)
  back = torch_weights.from_torch_state(torch_weights.to_torch_state(variables, name), name,
                                        template)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    assert b.dtype == np.float32 and np.array_equal(np.asarray(b), a)


@pytest.fixture(scope="module")
def inception_state():
  return torch_weights.to_torch_state(random_variables("inception_v3", 10), "inception_v3")


@pytest.fixture(scope="module")
def inception_template():
  return torch_weights.variables_template("inception_v3", 10)


def load_changed(state, template, drop=(), **changes):
  changed = {k: v for k, v in state.items() if k not in drop}
  changed.update({k.replace("__", "."): v for k, v in changes.items()})
  return torch_weights.from_torch_state(changed, "inception_v3", template)


def test_missing_and_unexpected_keys_are_named(inception_state, inception_template):
  with pytest.raises(ValueError, match=r"missing keys 1: \['Mixed_6b.branch7x7_2.conv.weight'\]"):
    load_changed(inception_state, inception_template, drop=["Mixed_6b.branch7x7_2.conv.weight"])
  with pytest.raises(ValueError, match=r"unexpected keys 1: \['head.weight'\]"):
    load_changed(inception_state, inception_template, head__weight=np.zeros(3, np.float32))
  many = [k for k in inception_state if k.startswith("Mixed_7c")]
  with pytest.raises(ValueError, match=r"missing keys 45: .* and 35 more"):
    load_changed(inception_state, inception_template, drop=many)


def test_wrong_shape_names_the_key_and_both_shapes(inception_state, inception_template):
  with pytest.raises(ValueError, match=r"Mixed_5b.branch5x5_2.conv.weight: shape \(64, 48, 3, 3\)"
                                       r".*expects \(64, 48, 5, 5\)"):
    load_changed(inception_state, inception_template,
                 Mixed_5b__branch5x5_2__conv__weight=np.zeros((64, 48, 3, 3), np.float32))
  resnet = torch_weights.to_torch_state(random_variables("resnet50", 10), "resnet50")
  resnet["layer3.0.downsample.1.running_var"] = np.ones(512, np.float32)
  with pytest.raises(ValueError, match=r"layer3.0.downsample.1.running_var: shape \(512,\).*"
                                       r"\(1024,\)"):
    torch_weights.from_torch_state(resnet, "resnet50",
                                   torch_weights.variables_template("resnet50", 10))


def test_wrong_class_count_is_named(inception_state, inception_template):
  with pytest.raises(ValueError, match=r"fc.weight.*1000 classes.*num_classes=10"):
    load_changed(inception_state, inception_template,
                 fc__weight=np.zeros((1000, 2048), np.float32),
                 fc__bias=np.zeros(1000, np.float32))


def test_dtypes_and_ignored_keys(inception_state, inception_template):
  with pytest.raises(ValueError, match=r"fc.bias: dtype int32 is not floating point"):
    load_changed(inception_state, inception_template, fc__bias=np.zeros(10, np.int32))
  half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v)
          for k, v in inception_state.items()}
  half["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # ignored
  out = torch_weights.from_torch_state(half, "inception_v3", inception_template)
  kernel = out["params"]["Mixed_5b"]["branch1x1"]["conv"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(
      np.asarray(kernel),
      half["Mixed_5b.branch1x1.conv.weight"].astype(np.float32).transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match=r"No torch weight layout for model 'vgg16'"):
    torch_weights.to_torch_state({}, "vgg16")


def test_load_safetensors_needs_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
    torch_weights.load_safetensors(tmp_path / "nothing.safetensors", "resnet50", 1000)


# ---------------------------------------------------------------------------
# Full resolution on real photographs
# ---------------------------------------------------------------------------


def imagenet_images(count, resize, crop):
  """``count`` photographs from the sample archive: shorter side to ``resize``, centre
  ``crop``×``crop``, ImageNet-normalised ``[count, crop, crop, 3]`` float32."""
  from PIL import Image
  if not os.path.exists(SAMPLES):
    pytest.skip(f"ImageNet samples not found at {os.path.normpath(SAMPLES)}")
  out = []
  with tarfile.open(SAMPLES, "r:gz") as tar:
    for member in tar:
      if not (member.isfile() and "val/" in member.name and member.name.endswith(".JPEG")):
        continue
      image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
      w, h = image.size
      s = resize / min(w, h)
      image = image.resize((max(crop, round(w * s)), max(crop, round(h * s))),
                           Image.BILINEAR)
      w, h = image.size
      left, top = (w - crop) // 2, (h - crop) // 2
      pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32)
      out.append((pixels / 255.0 - MEAN) / STD)
      if len(out) == count:
        break
  return np.stack(out)


# ~12 s (Inception v3) + ~8 s (ResNet-50) on a 2-core CPU, compile included: not slow.
@pytest.mark.parametrize("name,resize,crop", [("inception_v3", 342, 299),
                                              ("resnet50", 256, 224)])
def test_full_resolution_forward_and_input_gradient(name, resize, crop):
  x = imagenet_images(2, resize, crop)
  assert x.shape == (2, crop, crop, 3)
  model = create_model(name, 1000)
  variables = torch_weights.from_torch_state(random_torch_state(name, 1000), name,
                                             torch_weights.variables_template(name, 1000))

  def objective(x):
    logits = model.apply(variables, x, train=False)
    return jax.nn.log_softmax(logits)[:, 0].sum(), logits

  (_, logits), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(x)
  assert logits.shape == (2, 1000) and bool(jnp.all(jnp.isfinite(logits)))
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad).max()) > 0
