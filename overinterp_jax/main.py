"""Command line: ``python -m overinterp_jax.main --config=configs/<name>.py --workdir=<dir>``.

Runs the pipeline stages listed in ``config.stages`` (``pipeline/runner.py``):
train → backselect → subsets → retrain → sis → controls → report. Any config
key can be overridden with ``--config.<key>=<value>``; the config is locked,
so a key that does not exist is rejected in one line naming it and the
closest existing keys. Every value is checked before any work starts
(``config_checks.py``). Re-running with the same ``--workdir`` resumes.

Logs show the pipeline's own lines and other libraries' warnings;
``--verbosity=1`` adds the libraries' INFO lines (orbax, JAX). An error a user acts
on (a bad value, missing data, a full disk, a read-only or busy work directory,
``USER_ERRORS``) ends the run with its message alone; ``--verbosity=1`` shows its
traceback too. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import ast
import errno
import glob
import json
import logging as py_logging
import os
import sys
import textwrap

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from overinterp_jax import compile_cache, config_checks
from overinterp_jax import data as data_lib
from overinterp_jax import train
from overinterp_jax.config_checks import validate_config
from overinterp_jax.pipeline import report, runner
from overinterp_jax.store import atomic, locks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def run(config, workdir: str) -> dict:
  """Runs the configured stages in ``workdir``; returns the results written there.

  Nothing is written before the config and the loaded data have passed their checks.
  Then one run at a time holds ``workdir`` (``locks.workdir_lock``). A finished
  ``workdir`` on read-only storage is read as it is (a stage that must run stops).
  """
  validate_config(config)
  compile_cache.use_persistent_cache(bool(config.runtime.compilation_cache))
  dataset = data_lib.load_for_config(config.data, workdir, progress=bool(config.runtime.progress),
                                     workers=int(config.runtime.data_workers),
                                     view=data_lib.view_for_config(config),
                                     bad_files=config.runtime.bad_files,
                                     max_bad_files=int(config.runtime.max_bad_files))
  if int(config.train.batch_size) == 0:
    config.train.batch_size = train.memory_fitted_batch_size(
        config, dataset.image_shape, num_devices=jax.device_count(),
        num_train=dataset.num_examples("train"))
    logging.info("Training batch %d (%d per device): the most that fits the device's "
                 "memory (config.train.batch_size=0); config.train.lr is used as given.",
                 config.train.batch_size, config.train.batch_size // jax.device_count())
  config_checks.validate_with_data(config, dataset)
  with locks.workdir_lock(workdir) as writable:
    if writable:
      atomic.save_json(os.path.join(workdir, "config.json"),
                       json.loads(config.to_json_best_effort()))
    results = runner.run_pipeline(config, workdir, dataset)
    if writable:
      atomic.save_json(os.path.join(workdir, "results.json"), results)
  return results


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_loads(argv) -> None:
  """A config file whose ``get_config`` fails (an unknown variant, say) ends the program
  with one line naming the problem instead of absl's traceback."""
  path = _config_path(argv)
  if not path:
    return
  try:
    FLAGS["config"].parser.parse(path)
  except Exception as e:  # pylint: disable=broad-except  # the config file's own error
    lines = [line for line in str(e).splitlines() if line.strip()]
    sys.exit(f"FATAL: --config={path}: {lines[-1].strip() if lines else type(e).__name__}")


def parse_flags(argv):
  """absl's flag parsing; a config file that fails to load, or an override of a config
  key that does not exist, ends the program with one line naming the problem (and the
  closest existing keys)."""
  _check_config_loads(argv)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    path = _config_path(argv)
    message = path and config_checks.unknown_override(FLAGS["config"].parser.parse(path), argv)
    if not message:
      raise
    sys.exit(f"FATAL: {message}")


class _OwnLinesAndWarnings(py_logging.Filter):
  """Passes this package's log records, and other modules' at WARNING and above."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


# Errors whose message says what to change (a value, a path, the disk, the work directory,
# a diverging run): the message alone ends the program. Others are bugs: traceback kept.
USER_ERRORS = (ValueError, OSError, FloatingPointError, locks.WorkdirInUse)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def error_message(error: BaseException, workdir: str) -> str:
  """What a user is told of ``error`` (one of ``USER_ERRORS``): its message; for an
  operating-system error naming a file, ``<what>: <file>``, and for a file under
  ``workdir`` that cannot be written, that ``workdir`` is not writable; a full disk
  (which names no file) names ``workdir``."""
  if not (isinstance(error, OSError) and error.strerror):
    return str(error) or type(error).__name__
  if error.filename is None:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
      return f"{error.strerror} while writing: free space for the work directory {workdir}."
    return str(error)
  message = f"{error.strerror}: {error.filename}"
  if error.filename2 is not None:
    message += f" -> {error.filename2}"
  inside = isinstance(error.filename, (str, bytes)) and os.path.abspath(
      os.fsdecode(error.filename)).startswith(os.path.join(os.path.abspath(workdir), ""))
  if error.errno in _NOT_WRITABLE and inside:
    message += (f". The work directory {workdir} is not writable: give a writable --workdir "
                "(a copy of this one keeps its results).")
  return message


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.verbosity < 1:
    logging.get_absl_handler().addFilter(_OwnLinesAndWarnings())
  try:
    _main(FLAGS.config, FLAGS.workdir)
  except USER_ERRORS as e:
    if FLAGS.verbosity >= 1:
      raise
    sys.exit(f"FATAL: {error_message(e, FLAGS.workdir)}")


def _main(config, workdir: str) -> None:
  """Sets up JAX's devices for ``config``, runs it in ``workdir`` and prints the headline."""
  # Before any JAX operation initialises the CPU backend; a negative value is left to
  # validate_config, which names it.
  if int(config.runtime.host_devices) > 0:
    jax.config.update("jax_num_cpu_devices", int(config.runtime.host_devices))
  if config.runtime.distributed:
    jax.distributed.initialize()
  logging.info("Devices: %s", jax.devices())
  results = run(config, workdir)
  if atomic.is_writer():
    workdir = os.path.abspath(workdir)
    where = ("report.md" if "report" in results else "results.json")
    print(f"Done: {len(results)} stages. Results in {os.path.join(workdir, where)}")
    for line in report.headline(results, config):
      print(line)


USAGE = """\
python -m overinterp_jax.main --config=FILE[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...]

  --config=FILE[:VARIANT]  the experiment, e.g. configs/cifar10_cpu.py:analyze (the quick start)
  --workdir=DIR            where checkpoints, results and report.md go; the same DIR resumes
  --config.KEY=VALUE       override one key of the config, e.g. --config.train.num_epochs=5
  --verbosity=N            log level: 0 = INFO (default), -1 = warnings, 1 = all + tracebacks
  --helpfull               every flag, absl's and JAX's included

{configs} Every key with its default: overinterp_jax/config_schema.py. Docs: README.md and
docs/."""


def config_variants(path: str) -> tuple[str, ...]:
  """The named variants of config file ``path``: its module-level ``VARIANTS`` (``""``,
  the default, left out), read from the source without importing it; () if it has none."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "VARIANTS" for t in node.targets):
      return tuple(v for v in ast.literal_eval(node.value) if v)
  return ()


def configs_line(directory: str | None = None) -> str:
  """``Configs: configs/a.py, configs/b.py[:v1|:v2], ...``: every config file of
  ``directory`` (default ``./configs``, else the one beside the package) with its variants."""
  if directory is None:
    directory = next((d for d in ("configs", os.path.join(os.path.dirname(_PACKAGE_DIR),
                                                          "configs")) if os.path.isdir(d)), "")
  names = []
  for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
    if not os.path.basename(path).startswith("_"):
      variants = "|".join(f":{v}" for v in config_variants(path))
      names.append(f"configs/{os.path.basename(path)}" + (f"[{variants}]" if variants else ""))
  return ("Configs: " + ", ".join(names) + ".") if names else "Configs: configs/*.py."


def usage() -> str:
  """The text of ``--help``: the flags, every config file with its variants, the docs."""
  head, tail = USAGE.split("{configs}")
  return head + textwrap.fill(configs_line() + tail.replace("\n", " "), 92,
                              break_on_hyphens=False)

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


if __name__ == "__main__":
  if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
    print(usage())
    sys.exit(0)
  app.run(main, flags_parser=parse_flags)
