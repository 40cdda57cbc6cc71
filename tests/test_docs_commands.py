"""Every ``python -m overinterp_jax.main`` command in README.md and docs/**/*.md names config
keys that exist today, so a renamed key cannot leave a page whose command the CLI rejects.

A page that records a run made with older keys says so with a line ``Ran at commit <sha>``
(``RAN_AT``); its commands are not checked.
"""
import glob
import os
import re
import shlex

from overinterp_jax import config_checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = "python -m overinterp_jax.main"
RAN_AT = re.compile(r"^Ran at commit [0-9a-f]{7,40}\b", re.M)


def doc_pages() -> list[str]:
  """README.md and docs/**/*.md, relative to the repository."""
  pages = ["README.md"] + glob.glob("docs/**/*.md", root_dir=REPO, recursive=True)
  return sorted(pages)


def commands(text: str) -> list[str]:
  """The ``python -m overinterp_jax.main ...`` commands of a markdown text: in a fenced
  block to the end of the line (``\\`` continues it on the next line, ``#`` starts a
  comment), in inline code to the closing backtick (across lines)."""
  found = []
  for m in re.finditer(re.escape(PROGRAM), text):
    fenced = text.count("```", 0, m.start()) % 2 == 1
    if fenced:
      end = m.start()
      while True:
        end = text.find("\n", end)
        end = len(text) if end < 0 else end
        if not text[:end].rstrip().endswith("\\"):
          break
        end += 1
      cmd = text[m.start():end].replace("\\\n", " ")
      cmd = " ".join(shlex.split(cmd, comments=True))
    else:
      end = text.find("`", m.start())
      cmd = text[m.start():len(text) if end < 0 else end]
    found.append(" ".join(cmd.split()))
  return found


def config_and_overrides(cmd: str) -> tuple[str | None, list[str]]:
  """``(config file argument, the --config.<key> arguments)`` of one command."""
  args = shlex.split(cmd.replace("\\\n", " "))
  config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  return config, [a for a in args if re.match(r"^--?(?:no)?config\.", a)]


def _checked_commands():
  for page in doc_pages():
    with open(os.path.join(REPO, page), encoding="utf-8") as fh:
      text = fh.read()
    if RAN_AT.search(text):
      continue
    for cmd in commands(text):
      config, overrides = config_and_overrides(cmd)
      if config and os.path.exists(os.path.join(REPO, config.split(":")[0])):
        yield page, cmd, config, overrides


def test_commands_are_found_in_fences_and_inline_code():
  text = ("Run `python -m overinterp_jax.main --config=c.py\n --config.a=1` then\n\n```\n"
          "python -m overinterp_jax.main --config=c.py \\\n  --config.b.c=2  # comment\n"
          "ls\n```\n")
  assert commands(text) == ["python -m overinterp_jax.main --config=c.py --config.a=1",
                            "python -m overinterp_jax.main --config=c.py --config.b.c=2"]
  assert config_and_overrides(commands(text)[1]) == ("c.py", ["--config.b.c=2"])


def test_every_documented_command_uses_existing_config_keys():
  from overinterp_jax import main  # defines the --config flag and its file parser
  cases = list(_checked_commands())
  assert len(cases) >= 10, cases  # the extraction still finds the documented commands
  cwd = os.getcwd()
  os.chdir(REPO)  # config files are named relative to the repository
  try:
    problems = []
    for page, cmd, config, overrides in cases:
      message = config_checks.unknown_override(main.FLAGS["config"].parser.parse(config),
                                               overrides)
      if message:
        problems.append(f"{page}: {message} in: {cmd}")
  finally:
    os.chdir(cwd)
  assert not problems, "\n".join(problems)

