"""Every config key, declared once with its default: ``base_config()``.

An experiment (``configs/*.py``) is ``base_config()`` with a few keys changed;
the library reads ``config.<key>`` and never restates a default. The defaults
are the paper's recipe (Carter et al. 2021) wherever it has one. Keys under
``runtime`` say how a run executes (progress bars, devices, hosts), never what
it computes: they never enter a fingerprint (``config_reads``). Values are
checked in ``config_checks``.
"""
import ml_collections

# Keys that change how a run executes, not its results (kept out of every fingerprint).
RUNTIME = "runtime"

# The values that keys naming a choice accept (checked in config_checks; the stages that
# read the keys take them from here, so the checks import no stage).
BACKSELECT_METHODS = ("exact", "gradient", "hybrid", "coarse_to_fine")  # backselect.method
RETRAIN_KINDS = ("bs", "random", "border", "mask_only", "full")   # retrain.kinds
SUBSET_KINDS = ("bs", "random", "border")  # the pixel-subset masks stage subsets writes
SIS_SELECTIONS = ("exact", "coarse_to_fine", "backselect")        # sis.selection
SIS_MODELS = ("single", "ensemble", "input_dropout")               # sis.models
MASKING_VALUES = ("mean", "blur", "noise")                        # controls.masking_values

# Keys that moved into a section, old path -> new path: an old key on the command
# line fails naming its new place (config_checks.unknown_override), and the training
# settings of exported model records, written with old paths, are read at the new ones
# (pipeline/shipped_base.py). A moved section moves every key under it.
_TRAIN_KEYS = ("num_epochs", "batch_size", "eval_every", "schedule", "lr", "lr_milestones",
               "lr_decay", "warmup_fraction", "progressive_resizing", "momentum", "nesterov",
               "weight_decay", "checkpoints_to_keep", "augment")
_MODEL_KEYS = ("num_classes", "bn_momentum", "input_keep_prob", "pretrained", "precision")
MOVED_KEYS = {"train_seed": "train.seed", **{k: f"train.{k}" for k in _TRAIN_KEYS},
              **{k: f"model.{k}" for k in _MODEL_KEYS}}


def moved_path(path: str):
  """The path that old dotted ``path`` (e.g. ``"lr"``, ``"augment.flip"``) has now; None
  when it did not move."""
  head, _, rest = path.partition(".")
  if head not in MOVED_KEYS:
    return None
  return MOVED_KEYS[head] + (f".{rest}" if rest else "")


def base_config() -> ml_collections.ConfigDict:
  """The schema: every key with its default."""
  c = ml_collections.ConfigDict()
  # Pipeline stages, run in this order; a finished stage is skipped on re-run.
  c.stages = ("train", "backselect", "subsets", "retrain", "sis", "controls", "report")
  # Images per evaluation pass, shared by every stage (test metrics while training, every
  # model's predictions in backselect, subsets, retrain, sis, controls).
  c.eval_batch_size = 500

  c.data = ml_collections.ConfigDict()
  c.data.source = "image_folder"    # "tfds" | "image_folder" | "synthetic"
  c.data.name = "cifar10"           # TFDS name (cifar10, imagenet2012)
  c.data.data_dir = ""              # TFDS data_dir holding the prepared dataset
  # Image folder or .tar.gz of <split>/<class>/<image> (source=image_folder); "" = the
  # 1,000 CIFAR-10 test images shipped in the package (no train images: analysis only).
  c.data.path = ""
  # Sub-folders of data.path read as the train and test splits (source=image_folder):
  # ("train", "val") for the ILSVRC layout; the same name twice reads one folder as both.
  c.data.folder_splits = ("train", "test")
  c.data.cache_dir = ""             # decoded-array cache; "" = <workdir>/data_cache
  c.data.expected_train = 0         # image counts verified on load (0 = unchecked)
  c.data.expected_test = 0
  # "auto" (CIFAR-10 constants for CIFAR-10, else the train images' statistics) |
  # "cifar10" | "imagenet" (torchvision's constants) | "train".
  c.data.normalization = "auto"
  # Both splits decoded in memory (small data: CIFAR); False streams the images from
  # disk batch by batch (ImageNet; docs/data.md).
  c.data.in_memory = True
  c.data.view_size = 0              # side of the square analysis view; 0 = images as stored
  c.data.view_resize = 0            # shorter side before the view's centre crop; 0 = view_size
  # The analysis view (data/transforms.py): "torchvision" (bit-exact torchvision Resize +
  # CenterCrop at the weights' eval sizes: resnet50 256 -> 224, inception_v3 342 -> 299) |
  # "paper" (the same arithmetic at the paper's sizes: inception_v3 299 -> 299, resnet50
  # 256 -> 224) | "sizes" (view_size/view_resize, long side rounded, offset floored) |
  # "auto": "torchvision" when model.weights is a torchvision/timm file, else "sizes" when
  # view_size is set, else "paper". A set view_size/view_resize replaces a named view's sizes.
  c.data.view = "auto"
  c.data.num_train = 256            # source=synthetic only: train images
  c.data.num_test = 64              # source=synthetic only: test images
  c.data.image_size = 32            # source=synthetic only: image side (pixels)
  c.data.num_classes = 10           # source=synthetic only: classes
  c.data.synthetic_seed = 0         # source=synthetic only: seed of the images

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet20"         # models.registry: resnet20, resnet50, inception_v3, ...
  # Weights of the base model: a .safetensors file in torchvision/timm key layout
  # (models/torch_weights.py) or an orbax checkpoint directory of ours; stage train
  # loads them instead of training. "" = train it.
  c.model.weights = ""
  # inception_v3 only: torchvision's transform_input (ImageNet-normalised input -> [-1, 1]
  # inside the model) "true" | "false" | "auto": from the timm config.json beside
  # model.weights when there is one (mean/std 0.5 -> true, ImageNet's -> false), else true.
  c.model.transform_input = "auto"
  # A model shipped in the package (models.shipped, e.g. "resnet20_cifar10") used as the
  # base model: stage train loads it instead of training. "" = train it.
  c.model.pretrained = ""
  c.model.num_classes = 10
  c.model.bn_momentum = 0.9         # of batch norm's running statistics (PyTorch's 0.1)
  c.model.input_keep_prob = 1.0     # < 1 wraps the model in input dropout (paper: 0.8)
  # Compute dtype of the model's evaluations, in training and in selection (backselect,
  # sis; overinterp_jax/precision.py): "float32" | "bfloat16" (float32 parameters,
  # float32 ranking).
  c.model.precision = "float32"

  # Stage train (and every model trained later: retrain, sis's ensemble and input-dropout
  # models, with their own epochs and seeds): the base model's recipe.
  c.train = ml_collections.ConfigDict()
  c.train.seed = 0                  # initialisation, batch order, augmentation
  c.train.num_epochs = 200
  c.train.batch_size = 128          # 0 = the most per device that fits its memory (lr as given)
  c.train.eval_every = 1            # test metrics every this many epochs (and after the last)
  c.train.schedule = "multistep"    # "multistep" | "onecycle" | "cosine"
  c.train.lr = 0.1
  c.train.lr_milestones = (60, 120, 160)  # multistep only: epochs
  c.train.lr_decay = 0.2            # multistep only: lr factor at each milestone
  c.train.warmup_fraction = 0.15    # onecycle only
  # ((scale of the image side, fraction of the epochs[, batch multiplier]), ...) trained
  # at lower resolution before the full-size epochs (cpu_budget.epoch_scales); () = none.
  c.train.progressive_resizing = ()
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.weight_decay = 5e-4
  c.train.checkpoints_to_keep = 2
  # Training augmentation: random crop (zero padding) + horizontal flip.
  c.train.augment = ml_collections.ConfigDict()
  c.train.augment.enabled = True
  c.train.augment.padding = 4       # pixels of padding before the crop
  c.train.augment.flip = "random"   # "random" | "alternating" (cpu_budget.augment_flip)
  # "device": pad + random crop (+ flip) on the accelerator (CIFAR); "inception":
  # random-resized crop + flip of the view on the host (ImageNet).
  c.train.augment.crop = "device"

  # Coarse-to-fine backward selection (backselect.method or sis.selection "coarse_to_fine";
  # sis.coarse_to_fine_backselect, docs/method.md §4): exact selection on patch_sizes[0]-sided
  # patches of the whole image; each finer level runs exact selection on the coarser level's
  # SIS at sis.threshold (times margin, at least min_pixels pixels) down to pixels.
  c.coarse_to_fine = ml_collections.ConfigDict()
  c.coarse_to_fine.patch_sizes = (4, 2, 1)  # decreasing, each dividing the one before; last 1
  c.coarse_to_fine.margin = 1.0     # >= 1: the next level's start as a multiple of the SIS
  c.coarse_to_fine.min_pixels = 64  # the least pixels a finer level starts with (5% = 52)

  # Stage backselect: rank every pixel of every train and test image.
  c.backselect = ml_collections.ConfigDict()
  # "exact" | "gradient" (Batched Gradient SIS) | "hybrid" (Batched Gradient SIS, then exact
  # backward selection of the last switch_fraction of the pixels: docs/method.md §4) |
  # "coarse_to_fine" (config.coarse_to_fine, levels placed at sis.threshold).
  c.backselect.method = "exact"
  c.backselect.remove_per_step = 1  # gradient and hybrid: pixels removed per gradient step
  c.backselect.noise_std = 0.0      # gradient and hybrid: tie-breaking noise
  # gradient and hybrid: images per gradient pass per device; 0 = fit memory.
  c.backselect.batch_size = 0
  # hybrid only: the last-removed ceil(switch_fraction·d) pixels are ranked exactly, r(r+1)/2
  # evaluations per image (21,115 at 0.2 on CIFAR's 1,024 pixels against 524,800 for exact);
  # the gradient removes the others. In (0, 1]; 1 = exact backward selection.
  c.backselect.switch_fraction = 0.2
  c.backselect.shard_size = 1000    # images per result file
  c.backselect.noise_seed = 0

  # Stage subsets: keep the last-removed ceil(frac_kept·d) pixels; random baseline.
  c.subsets = ml_collections.ConfigDict()
  c.subsets.frac_kept = 0.05        # 52 of 1,024 CIFAR pixels
  c.subsets.random_train_seed = 1234  # the public code's seeds
  c.subsets.random_test_seed = 5678

  # Stage retrain: fresh models on subsets; "mask_only" is the leakage control.
  c.retrain = ml_collections.ConfigDict()
  c.retrain.kinds = ("bs", "random", "mask_only")
  c.retrain.num_epochs = 0          # 0 = train.num_epochs

  # Stage sis: SISes of a sample of test images per model.
  c.sis = ml_collections.ConfigDict()
  # "exact" backward selection | "coarse_to_fine" (per pixel, config.coarse_to_fine; needs
  # patch_size 1) | "backselect": stage backselect's selection (config.backselect, e.g.
  # Batched Gradient SIS at ImageNet size), reusing its test records.
  c.sis.selection = "exact"
  c.sis.threshold = 0.99
  c.sis.num_images = 100            # 0 = every qualifying test image
  c.sis.sample_seed = 0
  c.sis.min_confidence = 0.0        # sample only images the base model gives >= this (0 = any)
  c.sis.only_correct = False        # ... and classifies correctly
  c.sis.sample_all_models = False   # ... every model of sis.models does (the same images)
  c.sis.bootstrap_samples = 2000    # bootstrap resamples of the median SIS size's interval
  c.sis.bootstrap_seed = 0
  c.sis.patch_size = 1              # 1 = pixel features; p = p×p patches
  c.sis.images_per_call = 4         # images per compiled exact call (resume unit); 0 = all
  c.sis.models = ("single", "ensemble", "input_dropout")
  c.sis.ensemble_size = 3           # base model + 2 replicates (train.seed + 1, + 2)
  c.sis.ensemble_epochs = 0         # 0 = train.num_epochs
  c.sis.input_dropout_keep_prob = 0.8
  c.sis.input_dropout_epochs = 0    # 0 = train.num_epochs
  c.sis.input_dropout_samples = 4   # fixed dropout masks averaged at SIS time
  c.sis.input_dropout_seed = 0

  # Stage controls (see overinterp_jax/pipeline/controls.py).
  c.controls = ml_collections.ConfigDict()
  c.controls.smoothed = True
  c.controls.dilation = 3           # k×k neighbourhood
  c.controls.smoothed_images = 0    # backselect (test) SISes checked (seeded sample); 0 = all
  c.controls.targeted = True
  c.controls.target_seed = 0
  c.controls.masking_values = ("mean", "blur", "noise")
  c.controls.masking_test_images = 0  # test images (seeded sample) per masked value; 0 = all
  c.controls.blur_sigma = 2.0       # pixels
  c.controls.noise_scale = 1.0      # uniform in [-s, s] (normalised units)
  c.controls.noise_seed = 0
  c.controls.confidence_rise = True
  # Batched Gradient SIS (k = 1) against exact selection on the SIS sample (sis.selection
  # "exact" only): first-step rankings, orders, kept features (pipeline/gradient_check.py).
  c.controls.gradient_vs_exact = True

  c.report = ml_collections.ConfigDict()
  c.report.num_figure_images = 8

  # How the run executes; never part of a fingerprint.
  c.runtime = ml_collections.ConfigDict()
  c.runtime.progress = True         # progress bars
  c.runtime.distributed = False     # True on multi-host runs: jax.distributed.initialize()
  # CPU only: split the host into this many JAX devices (0 = JAX's default, one).
  # Each device runs its share of every batch concurrently; on a 2-core CPU,
  # 2 devices train ResNet-20 1.2-1.4x faster than one (benchmarks/train.py).
  c.runtime.host_devices = 0
  # Also checkpoint every this many training steps within an epoch, with the input
  # pipeline's position (a killed run resumes at that batch); 0 = at epoch ends only.
  c.runtime.checkpoint_every_steps = 0
  c.runtime.data_workers = 0        # grain worker processes decoding batches (streamed data)
  # Training stops when the mean loss of a window of steps exceeds this many times the
  # larger of the first step's loss and chance level ln(num_classes): the learning rate
  # is too high (train.LossGuard); 0 = only a non-finite loss stops it.
  c.runtime.loss_explosion_factor = 10.0
  # Unreadable image files of streamed data (data.in_memory=False; data/loader.screened):
  # "check": every file's size and headers are checked before any work, and any bad file
  # stops the run naming all of them | "skip": the same check, bad files left out (each
  # named) and images failing to decode later replaced by grey ones, at most
  # max_bad_files in all | "off": no check (a bad file stops the run at its batch).
  # In-memory data is always decoded whole first, naming every bad file.
  c.runtime.bad_files = "check"
  c.runtime.max_bad_files = 100
  # JAX's persistent compilation cache in a user cache directory (overinterp_jax/
  # compile_cache.py): a new run loads compiled programs instead of compiling them again.
  # False turns it off (so does OVERINTERP_JAX_COMPILATION_CACHE=0); never changes a result.
  c.runtime.compilation_cache = True
  return c
