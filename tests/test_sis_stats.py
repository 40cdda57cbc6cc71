"""Bootstrap intervals of median SIS sizes and paired differences between models."""
import numpy as np
import pytest

from overinterp_jax.pipeline import report_sections, sis_stats


def test_median_interval_contains_the_median_and_narrows_with_more_images():
  rng = np.random.default_rng(0)
  small = sis_stats.median_interval(rng.normal(100, 20, 20), num=1000)
  large = sis_stats.median_interval(rng.normal(100, 20, 2000), num=1000)
  for m in (small, large):
    assert m["low"] <= m["median"] <= m["high"]
  assert large["high"] - large["low"] < (small["high"] - small["low"]) / 3
  assert 95 < large["low"] < 100 < large["high"] < 105
  # Seeded: the same interval every time.
  assert sis_stats.median_interval(np.arange(50), seed=3) == sis_stats.median_interval(
      np.arange(50), seed=3)
  assert sis_stats.median_interval([])["median"] is None


def test_paired_difference_sees_a_shift_that_unpaired_spread_hides():
  rng = np.random.default_rng(1)
  base = rng.uniform(20, 400, 60)  # widely spread sizes
  d = sis_stats.paired_difference(base + 5, base, num=2000)
  assert d["difference"] == pytest.approx(5) and d["median_paired_difference"] == pytest.approx(5)
  assert d["low"] > 0 and d["fraction_larger"] == 1.0
  same = sis_stats.paired_difference(base, base)
  assert same["difference"] == 0 and same["low"] == same["high"] == 0
  with pytest.raises(ValueError, match="one shape"):
    sis_stats.paired_difference([1, 2], [1, 2, 3])


def test_report_states_each_claim_from_the_interval():
  s = {"differences": {"ensemble": {"difference": 20.0, "low": 8.0, "high": 31.0, "count": 50,
                                    "median_paired_difference": 18.0, "fraction_larger": 0.8},
                       "input_dropout": {"difference": 1.0, "low": -6.0, "high": 9.0,
                                         "count": 50, "median_paired_difference": 0.0,
                                         "fraction_larger": 0.5}}}
  text = "\n".join(report_sections.differences_md(s))
  assert "Ensembles reduce overinterpretation (larger SISes): **supported**" in text
  assert "Input dropout reduces overinterpretation (larger SISes): **not shown**" in text
  assert "20 [8, 31]" in text
  s["differences"]["ensemble"].update(difference=-5.0, low=-9.0, high=-1.0)
  assert "**contradicted**" in "\n".join(report_sections.differences_md(s))
