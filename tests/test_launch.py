"""launch/: shell syntax, dry runs, argument quoting, log fetching on failure.

Needs only bash and git: gcloud and SLURM are never called (dry runs print,
and the one real-mode run uses a fake gcloud on PATH).
"""

import os
import pathlib
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
NODE = LAUNCH / "gpu_node.sh"

# Spaces, both quotes, a $, a glob, a backslash: all must reach main intact.
NASTY = '--config.data.tokenizer=/tmp/a b/c\'d "e" $HOME *\\x'
MAIN_ARGS = [
    "--config=configs/base.py",
    "--workdir=/shared/eve base",
    NASTY,
    "--config.mesh.expert=8",
]


def sh(script, *args, env=None):
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run(
      ["bash", str(script), *args],
      check=False,
      capture_output=True,
      text=True,
      env=full_env,
      timeout=30,
  )


def bash_words(line):
  """The words bash makes of `line` (no command is run)."""
  out = subprocess.run(
      ["bash", "-c", 'eval "w=($1)"; printf "%s\\0" "${w[@]}"', "_", line],
      capture_output=True,
      text=True,
      check=True,
      timeout=10,
  ).stdout
  return out.split("\0")[:-1]


def tpu_dry_run(*opts):
  r = sh(
      TPU,
      "--name",
      "eve-pod",
      "--zone",
      "us-central2-b",
      *opts,
      "--dry-run",
      "--",
      *MAIN_ARGS,
  )
  assert r.returncode == 0, r.stderr
  return [bash_words(line) for line in r.stdout.splitlines()]


def ssh_command(argv):
  (cmd,) = [a for a in argv if a.startswith("--command=")]
  return cmd[len("--command=") :]


def step(argv):
  """A printed command's kind: create, archive, scp, install, run, fetch."""
  if "eve_jax.compile" in argv:
    return "preflight"
  if argv[0] == "git":
    return "archive"
  if argv[0] == "mkdir":
    return "mkdir"
  assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], argv
  if argv[4] in ("create", "scp"):
    return argv[4]
  assert argv[4] == "ssh", argv
  cmd = ssh_command(argv)
  if "eve_jax.main" in cmd:
    return "run"
  if "pip install" in cmd:
    return "install"
  if "cat ~/eve_jax.log" in cmd:
    return "fetch"
  raise AssertionError(argv)


@pytest.mark.parametrize(
    "script",
    sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch")),
)
def test_bash_syntax(script):
  r = subprocess.run(
      ["bash", "-n", str(LAUNCH / script)],
      check=False,
      capture_output=True,
      text=True,
      timeout=10,
  )
  assert r.returncode == 0, r.stderr


def test_tpu_dry_run_creates_then_copies_installs_runs_fetches():
  cmds = tpu_dry_run("--accelerator", "v4-32", "--spot", "--project", "p1")
  assert [step(c) for c in cmds] == [
      "preflight",
      "create",
      "archive",
      "scp",
      "install",
      "run",
      "mkdir",
      "fetch",
  ]
  # The run's own arguments, compiled for the slice before it is created.
  assert cmds[0] == [
      "python3",
      "-m",
      "eve_jax.compile",
      "--topology=v4-32",
      *MAIN_ARGS,
  ]
  cmds = cmds[1:]
  create = cmds[0]
  assert create[5] == "eve-pod"
  for flag in (
      "--zone=us-central2-b",
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
      "--spot",
      "--project=p1",
  ):
    assert flag in create
  for c in cmds:
    if c[0] == "gcloud":
      assert "--zone=us-central2-b" in c and "--project=p1" in c
      if c[4] != "create":
        assert "--worker=all" in c
  archive, scp = cmds[1], cmds[2]
  assert archive[-1] == "HEAD" and str(REPO) in archive
  tarball = archive[archive.index("-o") + 1]
  assert scp[5:7] == [tarball, "eve-pod:eve_jax.tar.gz"]
  assert "pip install -q -e '.[tpu]'" in ssh_command(cmds[3])
  assert cmds[-1][-1] == "--output-directory=./tpu_logs/eve-pod"


def test_tpu_dry_run_v5p_runtime_and_logs_dir(tmp_path):
  cmds = tpu_dry_run(
      "--accelerator", "v5p-64", "--logs", str(tmp_path), "--no-preflight"
  )
  assert "--version=v2-alpha-tpuv5" in cmds[0]
  assert "--spot" not in cmds[0]
  assert cmds[-1][-1] == f"--output-directory={tmp_path}"


def test_tpu_dry_run_without_accelerator_does_not_create():
  cmds = tpu_dry_run()
  assert [step(c) for c in cmds] == [
      "archive",
      "scp",
      "install",
      "run",
      "mkdir",
      "fetch",
  ]


def test_tpu_run_command_passes_arguments_intact(tmp_path):
  (run,) = [c for c in tpu_dry_run() if step(c) == "run"]
  remote = ssh_command(run)
  # shlex, as a POSIX shell would split it: the args follow eve_jax.main.
  words = shlex.split(remote)
  i = words.index("eve_jax.main") + 1
  assert words[i : i + len(MAIN_ARGS)] == MAIN_ARGS
  # And bash itself runs the exact remote command, with a fake venv python
  # in a fake home that records its argv and fails: the args arrive intact,
  # the log is written, and the failure is the command's exit status.
  home = tmp_path / "home"
  (home / "eve_jax").mkdir(parents=True)
  py = home / "eve_jax_venv" / "bin" / "python"
  py.parent.mkdir(parents=True)
  py.write_text(
      '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$HOME/argv"\n'
      "echo training\nexit 7\n"
  )
  py.chmod(0o755)
  r = subprocess.run(
      ["bash", "-c", remote],
      check=False,
      capture_output=True,
      text=True,
      env=dict(os.environ, HOME=str(home)),
      timeout=10,
  )
  assert r.returncode == 7
  argv = (home / "argv").read_text().split("\0")[:-1]
  assert argv == ["-m", "eve_jax.main", *MAIN_ARGS]
  assert (home / "eve_jax.log").read_text() == "training\n"


def test_tpu_install_command_is_valid_bash():
  (install,) = [c for c in tpu_dry_run() if step(c) == "install"]
  r = subprocess.run(
      ["bash", "-n", "-c", ssh_command(install)],
      check=False,
      capture_output=True,
      text=True,
      timeout=10,
  )
  assert r.returncode == 0, r.stderr


def test_tpu_preflight_topology_option():
  cmds = tpu_dry_run("--topology", "v5p:2x4x4")
  assert cmds[0][3] == "--topology=v5p:2x4x4"
  assert [step(c) for c in cmds][:2] == ["preflight", "archive"]


def fake_python(tmp_path, status):
  """A `python3` that records its argv and exits with `status`."""
  py = tmp_path / "fake_python"
  py.write_text(
      "#!/usr/bin/env bash\n"
      f'printf "%s\\0" "$@" > {shlex.quote(str(tmp_path / "py_argv"))}\n'
      f"exit {status}\n"
  )
  py.chmod(0o755)
  return str(py)


def test_tpu_preflight_that_fails_stops_before_any_gcloud(tmp_path):
  """eve_jax.compile exits 3 (does not fit): nothing is created, copied or
  run, and the launcher says why."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!/usr/bin/env bash\ntouch {tmp_path / 'called'}\n")
  gcloud.chmod(0o755)
  r = sh(
      TPU,
      "--name",
      "eve-pod",
      "--zone",
      "z",
      "--accelerator",
      "v5p-64",
      "--",
      *MAIN_ARGS,
      env={
          "PATH": f"{bin_dir}:{os.environ['PATH']}",
          "PYTHON": fake_python(tmp_path, 3),
          "TMPDIR": str(tmp_path),
      },
  )
  assert r.returncode != 0
  assert "preflight" in r.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "called").exists()
  argv = (tmp_path / "py_argv").read_text().split("\0")[:-1]
  assert argv == ["-m", "eve_jax.compile", "--topology=v5p-64", *MAIN_ARGS]


def test_tpu_fetches_logs_after_a_failed_run(tmp_path):
  """Real mode with a fake gcloud: the slice is missing (created), the run
  fails, the logs are still fetched and the run's exit status is kept."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(
      "#!/usr/bin/env bash\n"
      f'printf "%s\\0" "$@" >> {shlex.quote(str(calls))}\n'
      f'printf "\\n\\0" >> {shlex.quote(str(calls))}\n'
      'case "$*" in\n'
      "  *' describe '*) exit 1 ;;\n"
      "  *eve_jax.main*) exit 5 ;;\n"
      "esac\n"
  )
  gcloud.chmod(0o755)
  r = sh(
      TPU,
      "--name",
      "eve-pod",
      "--zone",
      "z",
      "--accelerator",
      "v4-32",
      "--logs",
      str(tmp_path / "logs"),
      "--",
      *MAIN_ARGS,
      env={
          "PATH": f"{bin_dir}:{os.environ['PATH']}",
          "PYTHON": fake_python(tmp_path, 0),
          "TMPDIR": str(tmp_path),
      },
  )
  assert r.returncode == 5, r.stderr
  records = calls.read_text().split("\n\0")[:-1]
  argvs = [rec.split("\0")[:-1] for rec in records]
  assert [a[3] for a in argvs] == [
      "describe",
      "create",
      "scp",
      "ssh",
      "ssh",
      "ssh",
  ]
  assert [step(["gcloud", *a]) for a in argvs[1:]] == [
      "create",
      "scp",
      "install",
      "run",
      "fetch",
  ]
  assert (tmp_path / "logs").is_dir()
  assert not (tmp_path / "eve_jax_eve-pod.tar.gz").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--zone", "z", "--", "--workdir=x"], "--name is required"),
        (["--name", "n", "--", "--workdir=x"], "--zone is required"),
        (["--name", "n", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
        (
            [
                "--name",
                "n",
                "--zone",
                "z",
                "--accelerator",
                "tpu9-8",
                "--",
                "a",
            ],
            "pass --version",
        ),
    ],
)
def test_tpu_bad_options_exit_2_with_one_line(args, message):
  r = sh(TPU, "--dry-run", *args)
  assert r.returncode == 2
  assert r.stdout == ""
  assert len(r.stderr.splitlines()) == 1 and message in r.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_slurm_dry_run(how):
  if how == "flag":
    r = sh(SLURM, "--dry-run", *MAIN_ARGS)
  else:
    r = sh(SLURM, *MAIN_ARGS, env={"DRY_RUN": "1"})
  assert r.returncode == 0, r.stderr
  (line,) = r.stdout.splitlines()
  argv = bash_words(line)
  assert argv[0] == "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
  assert argv[1] == "srun" and "--kill-on-bad-exit=1" in argv
  i = argv.index("python")
  assert argv[i:] == ["python", "-m", "eve_jax.main", *MAIN_ARGS]


def test_slurm_dry_run_follows_the_allocation():
  r = sh(
      SLURM,
      "--dry-run",
      "--workdir=w",
      env={
          "SLURM_GPUS_PER_NODE": "h100:4",
          "SLURM_CPUS_PER_TASK": "16",
          "PYTHON": "/venv/bin/python",
      },
  )
  argv = bash_words(r.stdout)
  assert argv[0] == "JAX_LOCAL_DEVICE_IDS=0,1,2,3"
  assert "--cpus-per-task=16" in argv
  assert argv[-4:] == ["/venv/bin/python", "-m", "eve_jax.main", "--workdir=w"]


def test_slurm_header_asks_one_task_per_node_with_8_gpus():
  text = SLURM.read_text()
  for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8"):
    assert f"#SBATCH {directive}\n" in text


def test_gpu_node_dry_run_and_help():
  r = sh(NODE, "--dry-run", *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  (line,) = r.stdout.splitlines()
  assert bash_words(line) == ["python", "-m", "eve_jax.main", *MAIN_ARGS]
  r = sh(NODE, "--help")
  assert r.returncode == 0 and "pip install -e '.[cuda12]'" in r.stdout


@pytest.mark.parametrize("script", [NODE, SLURM])
def test_gpu_preflight_line_comes_first(script):
  r = sh(script, "--dry-run", *MAIN_ARGS, env={"EVE_JAX_PREFLIGHT": "h100x8x4"})
  assert r.returncode == 0, r.stderr
  first, last = r.stdout.strip().splitlines()
  assert bash_words(first) == [
      "python",
      "-m",
      "eve_jax.compile",
      "--topology=h100x8x4",
      *MAIN_ARGS,
  ]
  assert "eve_jax.main" in last


def test_gpu_preflight_that_fails_stops_the_launch(tmp_path):
  py = tmp_path / "py"
  py.write_text(
      "#!/usr/bin/env bash\n"
      '[[ "$2" == eve_jax.compile ]] && exit 3\n'
      f"touch {tmp_path / 'trained'}\n"
  )
  py.chmod(0o755)
  r = sh(
      NODE, *MAIN_ARGS, env={"EVE_JAX_PREFLIGHT": "h100x8", "PYTHON": str(py)}
  )
  assert r.returncode == 3 and "preflight" in r.stderr
  assert not (tmp_path / "trained").exists()
