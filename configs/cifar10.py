"""The paper's CIFAR-10 experiment (Carter et al. 2021; docs/method.md §5), for accelerators.

  python -m overinterp_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10 \
      --config.data.data_dir=/data/tfds     # CIFAR-10 prepared with TFDS (docs/data.md)

Per architecture and seed, one work directory each (launch/paper_table1.sh runs
ResNet-20 / ResNet-18 / VGG-16 × seeds 0–2; python -m overinterp_jax.collect merges
the rows):
  * train: the paper's recipe — SGD lr 0.1, Nesterov momentum 0.9, weight decay
    5e-4, batch 128, 200 epochs, lr × 0.2 at epochs 60/120/160, ±4 px crops + flips;
  * backselect: exact backward selection of all 60,000 images at pixel level;
  * subsets, retrain: 5% BS, random and mask-only subsets, 200 epochs each (Table 1);
  * sis: exact SISes at τ = 0.99 of 100 test images for the model, a 3-member
    ensemble and an input-dropout (p = 0.8) model; controls: all four.

Cost: not yet run. Exact backward selection dominates: 60,000 × 524,800 ResNet-20
evaluations (3.1e10), ~1 year at the 978 evaluations/s of a 2-core CPU
(docs/benchmarks.md); an accelerator's evaluation rate sets the real cost.
--config.backselect.method=gradient (docs/method.md §4) is far cheaper.
Expected result (not measured here): ~91–92% test accuracy for ResNet-20, the
recipe's usual figure; as in the paper, models trained on 5% BS subsets within a
few points of the full-image model and random 5% subsets far below.
"""
from overinterp_jax.config_schema import base_config


def get_config():
  """The paper's recipe (the schema's defaults) on CIFAR-10 from TFDS."""
  c = base_config()
  c.data.source = "tfds"
  c.data.name = "cifar10"
  c.data.expected_train = 50000     # image counts verified on load
  c.data.expected_test = 10000
  return c
