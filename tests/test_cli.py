"""The command line as a user meets it: an ordinary error ends in its message alone, a
finished work directory on read-only storage still gives its results, logs redirected to
a file get no progress bars, and --help names every config with its variants."""
import errno
import glob
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

from overinterp_jax import main
from overinterp_jax.progress import progress_bar
from smoke_pipeline import REPO, command, env
from test_data import make_tree


def _run(workdir, *args, prefix=()):
  return subprocess.run([*prefix, *command(workdir, *args)], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=env())


def _fatal(proc) -> str:
  """The one ``FATAL:`` line of a run that failed with a message and no traceback."""
  assert proc.returncode != 0, proc.stdout
  assert "Traceback" not in proc.stderr and '  File "' not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  fatal = [line for line in lines if line.startswith("FATAL: ")]
  assert len(fatal) == 1 and len(lines) <= 10, proc.stderr  # log lines, then the message
  return fatal[0]


# ---------------------------------------------------------------- errors in one line


@pytest.mark.parametrize("args,message", [
    (("--config.sis.threshold=1.5",), "config.sis.threshold must be in (0, 1], got 1.5."),
    (("--config.data.source=image_folder", "--config.data.path=/nonexistent/cifar10"),
     "config.data.path='/nonexistent/cifar10' does not exist"),
])
def test_a_bad_value_or_missing_data_ends_in_its_message_alone(tmp_path, args, message):
  assert message in _fatal(_run(tmp_path, *args))
  assert not os.listdir(tmp_path)  # before any work


@pytest.mark.parametrize("arg,message", [
    ("--config.lr=0.05", "config.lr moved to config.train.lr."),
    ("--config.train_seed=1", "config.train_seed moved to config.train.seed."),
    ("--config.augment.flip=alternating",
     "config.augment.flip moved to config.train.augment.flip."),
    ("--config.pretrained=resnet20_cifar10", "config.pretrained moved to config.model.pretrained."),
    ("--noconfig.nesterov", "config.nesterov moved to config.train.nesterov."),
    ("--config.precision=bfloat16", "config.precision moved to config.model.precision."),
])
def test_a_moved_config_key_names_its_new_place(arg, message):
  from overinterp_jax import config_checks, config_schema
  assert config_checks.unknown_override(config_schema.base_config(), [arg]) == message


def test_every_moved_key_exists_at_its_new_place_and_not_at_its_old():
  from overinterp_jax import config_checks, config_schema
  config = config_schema.base_config()
  for old, new in config_schema.MOVED_KEYS.items():
    assert old not in config, old
    assert config_checks.unknown_override(config, [f"--config.{new}=1"]) is None, new
  assert config_schema.moved_path("augment.padding") == "train.augment.padding"
  assert config_schema.moved_path("train.lr") is None
  config.lr = 0.05  # a config file setting the old key: nothing would read it
  with pytest.raises(ValueError, match=r"config\.lr moved to config\.train\.lr"):
    config_checks.validate_config(config, num_devices=1)


def test_an_old_flat_key_on_the_command_line_ends_in_one_line(tmp_path):
  message = _fatal(_run(tmp_path, "--config.lr=0.05"))
  assert message == "FATAL: config.lr moved to config.train.lr.", message
  assert not os.listdir(tmp_path)


def test_an_unknown_config_variant_ends_in_one_line_naming_the_known_ones(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "overinterp_jax.main",
                         "--config=configs/cifar10_cpu.py:nope", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env())
  message = _fatal(proc)
  assert "Unknown variant 'nope'" in message and "analyze" in message, message


def test_verbosity_1_shows_the_traceback_of_an_error(tmp_path):
  proc = _run(tmp_path, "--config.sis.threshold=1.5", "--verbosity=1")
  assert proc.returncode != 0 and "Traceback" in proc.stderr
  assert "ValueError: config.sis.threshold must be in (0, 1], got 1.5." in proc.stderr


def test_a_directory_in_use_ends_in_one_line(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from overinterp_jax.store import locks\n"
      "with locks.workdir_lock(sys.argv[1]):\n"
      "  print('held', flush=True); time.sleep(600)\n"), str(tmp_path)],
      stdout=subprocess.PIPE, text=True, cwd=REPO, env=env())
  try:
    assert holder.stdout.readline().strip() == "held"
    line = _fatal(_run(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert f"{tmp_path} is in use by another run (pid {holder.pid}," in line


def test_error_messages_of_the_operating_system_name_the_file_and_the_directory(tmp_path):
  workdir = str(tmp_path / "w")
  full = OSError(errno.ENOSPC, "No space left on device")  # a write names no file
  assert main.error_message(full, workdir) == (
      f"No space left on device while writing: free space for the work directory {workdir}.")
  read_only = OSError(errno.EROFS, "Read-only file system", os.path.join(workdir, "a.json"))
  assert main.error_message(read_only, workdir).startswith(
      f"Read-only file system: {workdir}/a.json. The work directory {workdir} is not writable")
  missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.tar.gz")
  assert main.error_message(missing, workdir) == "No such file or directory: /data/x.tar.gz"
  assert main.error_message(ValueError("config.train.lr must be > 0."), workdir) == \
      "config.train.lr must be > 0."
  assert not issubclass(TypeError, main.USER_ERRORS)  # bugs keep their traceback
  assert not issubclass(AttributeError, main.USER_ERRORS)


# ---------------------------------------------------------- storage that cannot be written


def _mount_namespace(setup: str):
  """A command prefix running the command in a private mount namespace after ``setup``
  (mount commands, ``$0`` = the directory); skips the test where none can be made."""
  flags = "-m" if os.geteuid() == 0 else "-rm"
  prefix = ["unshare", flags, "sh", "-c", setup + ' && exec "$@"']
  try:
    probe = subprocess.run(["unshare", flags, "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    probe = None
  if probe is None or probe.returncode != 0:
    pytest.skip("no private mount namespace here (unshare -m, mount)")
  return lambda directory: [*prefix, str(directory)]


def _read_only():
  """``prefix(directory)``: runs a command with ``directory`` mounted read-only."""
  return _mount_namespace('mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0"')


def test_a_finished_run_on_read_only_storage_prints_its_results(finished_run):
  """Read-only storage stops root too (unlike chmod): a read-only bind mount of the
  finished smoke run, private to the command."""
  workdir, first = finished_run
  proc = _run(workdir, prefix=_read_only()(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == first.stdout  # "Done: 7 stages ..." and the headline
  assert proc.stderr.count("already done") == 7 and "is not writable" in proc.stderr


def test_a_run_that_must_write_to_read_only_storage_stops_naming_it(finished):
  proc = _run(finished, "--config.subsets.frac_kept=0.1", prefix=_read_only()(finished))
  line = _fatal(proc)
  assert f"{finished} is not writable, but stage subsets must run" in line


def test_a_full_disk_ends_in_one_line_naming_the_directory(tmp_path):
  prefix = _mount_namespace('mount -t tmpfs -o size=8k tmpfs "$0"')(tmp_path)
  line = _fatal(_run(tmp_path / "w", prefix=prefix))
  assert line.startswith("FATAL: No space left on device") and str(tmp_path / "w") in line


# ------------------------------------------------------------------- logs without bars


def test_a_log_redirected_to_a_file_gets_no_progress_bars(tmp_path):
  """Progress on, decoding an image folder (a bar per split on a terminal), then a value
  the data refutes: stderr, a file here, holds log lines and the message only."""
  make_tree(str(tmp_path / "folder"))
  log = tmp_path / "stderr.log"
  with open(log, "w") as f:
    proc = subprocess.run(
        command(tmp_path / "w", "--config.data.source=image_folder",
                f"--config.data.path={tmp_path / 'folder'}", "--config.runtime.progress=True"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True, timeout=600, env=env())
  text = log.read_text()
  assert proc.returncode != 0 and "FATAL: config.model.num_classes=10, but the data has 2" in text
  assert "\r" not in text and "decoding" not in text and "img/s" not in text, text


def test_progress_bars_show_on_a_terminal_only_and_never_when_turned_off():
  class Terminal(list):
    def write(self, s):
      self.append(s)

    def flush(self):
      pass

    def isatty(self):
      return True

  for show, file, drawn in ((True, Terminal(), True), (False, Terminal(), False)):
    list(progress_bar(range(3), show=show, file=file, desc="xyz"))
    assert ("xyz" in "".join(file)) == drawn
  assert progress_bar(range(3), file=open(os.devnull, "w")).disable  # not a terminal


# ------------------------------------------------------------------------------- --help


def test_help_names_every_config_file_and_each_of_its_variants():
  proc = subprocess.run([sys.executable, "-m", "overinterp_jax.main", "--help"], cwd=REPO,
                        capture_output=True, text=True, timeout=120, env=env())
  assert proc.returncode == 0, proc.stderr
  text = " ".join(proc.stdout.split())
  text = text[text.index("Configs:"):]
  files = sorted(glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))
  assert len(files) >= 4
  for path in files:
    name = os.path.basename(path)
    module = importlib.import_module(f"configs.{name[:-3]}")
    variants = []
    if inspect.signature(module.get_config).parameters:
      # The variants a config knows, as its own error for an unknown one lists them.
      with pytest.raises(ValueError, match="known") as info:
        module.get_config("no_such_variant")
      variants = re.findall(r"\w+", str(info.value).split("known:")[1].split("(")[0])
      assert variants, str(info.value)
    listed = re.search(rf"configs/{re.escape(name)}(\[[^\]]*\])?", text)
    assert listed, name
    for variant in variants:
      assert f":{variant}" in (listed.group(1) or ""), (name, variant)
