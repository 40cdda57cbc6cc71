"""Sufficient Input Subsets (SIS) in JAX: backward selection, FindSIS, SIS collections.

Two layers, both pure (no file I/O, no logging):

* **Reference-compatible API** (``reference``, run by ``engines``) — ``find_sis``,
  ``sis_collection``, ``SISResult``, ``make_empty_boolean_mask*``,
  ``produce_masked_inputs`` take the arguments and return the types of the
  ``sufficient_input_subsets`` library (Carter et al. 2019), so switching is a
  change of import. ``f`` maps a batch ``[B, *D]`` to scores ``[B]``: a
  JAX-traceable ``f`` runs compiled, any other (numpy, PyTorch, ...) on the host
  (``score_engine``). Two deliberate differences (docs/method.md §6): the starting
  check ``f >= τ`` is made on the input *with the initial mask applied*, and an
  empty SIS (the fully masked input already scores ``>= τ``) gets an all-False mask.
* **Batched API for models** — ``batched_backselect`` (exact, ``batched``),
  ``gradient_backselect`` (Batched Gradient SIS, ``gradient``) and
  ``hybrid_backselect`` (the gradient, then exact selection of the last features,
  ``hybrid``) and ``coarse_to_fine_backselect`` (exact selection on patches placing exact
  selection on pixels, ``coarse_to_fine``) run backward selection for N images at once, sharded over all local
  devices, and return a ``BackselectResult``; ``sis_from_backselect``,
  ``keep_mask`` and ``apply_feature_mask`` (``subsets``) turn results into SISes
  and pixel-subsets.

Backward selection runs as one compiled program (no Python per step); see
``overinterp_jax/selection/``. ``programs`` holds the compiled programs of the
batched API and their cache (``programs.PROGRAMS``), which benchmarks and tests use
directly. To replace ``steps_on_host`` (tests, benchmarks), replace
``engines.steps_on_host``: the name here is a copy.
"""
from overinterp_jax.sis.batched import BackselectResult, batched_backselect
from overinterp_jax.sis.coarse_to_fine import coarse_to_fine_backselect
from overinterp_jax.sis.engines import (CHEAP_SCORE_FLOPS, ENGINES, STEPS_ON_HOST_ENV,
                                        score_engine, steps_on_host)
from overinterp_jax.sis.gradient import gradient_backselect, gradient_batch_size
from overinterp_jax.sis.hybrid import exact_features, hybrid_backselect
from overinterp_jax.sis.programs import (DEFAULT_MEMORY_BUDGET_BYTES, MAX_EVAL_BATCH,
                                         SELECTION_VERSION, log_target_probability)
from overinterp_jax.sis.reference import (SISResult, backselect, find_sis,
                                          make_empty_boolean_mask,
                                          make_empty_boolean_mask_broadcast_over_axis,
                                          produce_masked_inputs, sis_collection)
from overinterp_jax.sis.subsets import (SISBatch, apply_feature_mask, draw_random_keep_mask,
                                        feature_mask_to_pixels, keep_mask, random_keep_mask,
                                        sis_from_backselect)

__all__ = [
    "BackselectResult", "CHEAP_SCORE_FLOPS", "DEFAULT_MEMORY_BUDGET_BYTES", "ENGINES",
    "MAX_EVAL_BATCH", "SELECTION_VERSION", "SISBatch", "SISResult", "STEPS_ON_HOST_ENV",
    "apply_feature_mask", "backselect", "batched_backselect", "coarse_to_fine_backselect",
    "draw_random_keep_mask",
    "exact_features", "feature_mask_to_pixels", "find_sis", "gradient_backselect",
    "gradient_batch_size", "hybrid_backselect", "keep_mask", "log_target_probability",
    "make_empty_boolean_mask", "make_empty_boolean_mask_broadcast_over_axis",
    "produce_masked_inputs", "random_keep_mask", "score_engine", "sis_collection",
    "sis_from_backselect", "steps_on_host",
]
