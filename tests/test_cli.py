"""The command line ``krflows fit``: help, config printing, a run directory, resumption."""

import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from krflows.cli import PROGRESS_EVERY, KRFlowCLI, main

TINY = ["--model.layers", "1", "--model.hidden", "[8]", "--model.batch_size", "64", "--model.warmup", "2",
        "--report.n_samples", "500", "--plots.n_samples", "200", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _cli_process_state(monkeypatch):
    """main() sets torch's thread count (``--threads``); give the other tests theirs back."""
    monkeypatch.setattr(sys, "argv", ["krflows"])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(*args: str) -> None:
    main(["fit", *args])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "fit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("Common options", "--model.target", "--model.family", "--model.nan", "--trainer.max_steps",
                   "--name", "--root_dir", "--ckpt_path", "bimodal2d", "twomoons", "--model.dim",
                   "path/file.py:NAME", "package.module:NAME", "Pyro model"):
        assert option in out, option
    assert "--optimizer" not in out  # Adam + cosine schedule are the module's


def test_print_config_shows_the_embedded_default(capsys):
    with pytest.raises(SystemExit):
        run("--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]
    assert model["target"] == "bimodal2d" and model["anneal"] > 0
    assert model["target_options"] == {"separation": 7.0, "weights": [0.3, 0.7]}
    assert config["trainer"]["max_steps"] >= 1000 and config["trainer"]["gradient_clip_val"] > 0
    assert config["checkpoint"]["save_last"] is True


def test_fit_writes_a_run_directory_and_resumes(tmp_path, capsys):
    run(*TINY, "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2", "--root_dir",
        str(tmp_path), "--name", "smoke", "--model.target", "banana")
    out = capsys.readouterr().out
    run_dir = tmp_path / "smoke"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert list(run_dir.glob("events.out.tfevents.*")) and last.exists()
    assert (run_dir / "report.md").exists() and (run_dir / "report.json").exists()
    assert (run_dir / "config.yaml").exists()
    assert f"tensorboard --logdir {run_dir}" in out and "ESS/N" in out and "Pareto k" in out
    assert torch.load(last, weights_only=False)["global_step"] == 5  # saved at the end, not only at 4

    # resume: the hyperparameters and the run directory come from the checkpoint
    run(*TINY, "--trainer.max_steps", "8", "--ckpt_path", str(last))
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["hyper_parameters"]["target"] == "banana"
    assert f"tensorboard --logdir {run_dir}" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--model.layers", "-1", "layers must be an int >= 0, got -1"),
    ("--model.family_options", "{bound: 0}", "bound must be a finite number > 0, got 0"),
])
def test_bad_model_option_is_a_usage_error(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        run(*TINY, flag, value, "--root_dir", str(tmp_path), "--name", "bad")
    assert exit_.value.code == 2
    assert f"krflows fit: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written


def test_runs_are_never_clobbered(tmp_path, capsys):
    """A second run with the same --name is refused; a bad --ckpt_path is refused before anything is
    written; a resume keeps the run's first config and writes its own beside it."""
    root = ["--root_dir", str(tmp_path), "--trainer.max_steps", "2"]
    run(*TINY, *root, "--name", "one", "--model.target", "banana")
    run_dir = tmp_path / "one"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            run(*TINY, *root, *args)
        assert exit_.value.code == 2
        return capsys.readouterr().err

    err = refused("--name", "one")
    assert f"the run directory {run_dir} already exists" in err and "--ckpt_path" in err
    (tmp_path / "empty").mkdir()  # a run stopped before its first checkpoint: no resume advice
    err = refused("--name", "empty")
    assert "already exists" in err and "holds no checkpoint" in err and "--ckpt_path" not in err
    (tmp_path / "empty").rmdir()
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:2000])
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": {"lr": 1.0}}, other)
    for path, reason in [(run_dir / "checkpoints" / "lst.ckpt", "no such file"),
                         (tmp_path / "junk.ckpt", "truncated or not a torch checkpoint file"),
                         (truncated, "truncated or not a torch checkpoint file"),
                         (other, "its hyperparameters are not a KRFlowModule's"),
                         (tmp_path, "not a file")]:
        err = refused("--ckpt_path", str(path), "--name", "one")
        assert f"krflows fit: error: not a krflows checkpoint: {path}: {reason}" in err, err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "junk.ckpt", "one", "other.ckpt", "truncated.ckpt"]

    run(*TINY, "--trainer.max_steps", "3", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert (run_dir / "config.yaml").read_bytes() == before[run_dir / "config.yaml"]
    assert yaml.safe_load((run_dir / "config-resume-1.yaml").read_text())["trainer"]["max_steps"] == 3


def test_timestamped_runs_get_a_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr("time.strftime", lambda fmt: "20260101-000000")
    for _ in range(2):
        run(*TINY, "--root_dir", str(tmp_path), "--trainer.max_steps", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20260101-000000", "20260101-000000-1"]


def test_the_default_progress_bar_redraws_every_ten_steps_unless_the_run_chooses(tmp_path, monkeypatch):
    bars = []
    monkeypatch.setattr(KRFlowCLI, "after_fit", lambda self: bars.append(self.trainer.progress_bar_callback))
    i = TINY.index("--trainer.enable_progress_bar")
    with_bar = [*TINY[:i], *TINY[i + 2:], "--root_dir", str(tmp_path), "--trainer.max_steps", "2"]
    run(*with_bar)
    run(*TINY, "--root_dir", str(tmp_path), "--trainer.max_steps", "2")
    run(*with_bar, "--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=3")
    assert [None if b is None else b.refresh_rate for b in bars] == [PROGRESS_EVERY, None, 3]


def test_resume_refuses_conflicting_model_options(tmp_path, capsys):
    run(*TINY, "--root_dir", str(tmp_path), "--name", "r", "--trainer.max_steps", "2",
        "--model.target", "banana")
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(*TINY, "--trainer.max_steps", "4", "--ckpt_path", str(last), "--model.layers", "3",
            "--model.lr", "0.1")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and torch.load(last, weights_only=False)["global_step"] == 2
    assert "--model.layers 3 (the checkpoint has 1)" in err
    assert "--model.lr 0.1 (the checkpoint has 0.003)" in err
    # the same values as the checkpoint's, and trainer options, are fine
    run(*TINY, "--trainer.max_steps", "3", "--ckpt_path", str(last), "--model.target", "banana")
    assert torch.load(last, weights_only=False)["global_step"] == 3
    # how NaN is read may change (a run stopped by a NaN target is told to resume with it)
    run(*TINY, "--trainer.max_steps", "4", "--ckpt_path", str(last), "--model.nan", "zero")
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 4 and state["hyper_parameters"]["nan"] == "zero"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_accelerator_is_a_usage_error_that_gives_the_name_back(tmp_path, capsys):
    """A probe: a 36-line traceback, and an empty run directory that then blocked the name."""
    with pytest.raises(SystemExit) as exit_:
        run(*TINY, "--root_dir", str(tmp_path), "--name", "g", "--trainer.accelerator", "gpu")
    assert exit_.value.code == 2 and "MisconfigurationException" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


KILL_AT = '''
import os
from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """Sends the process a signal at the end of step ``step``."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
'''


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_exits_nonzero_and_resumes_bit_identically(tmp_path, monkeypatch, capsys,
                                                                              signum):
    (tmp_path / "killat.py").write_text(KILL_AT)
    monkeypatch.syspath_prepend(str(tmp_path))
    # what the process had (SIGINT is ignored, not Python's handler, in a background job of a shell)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    common = [*TINY, "--root_dir", str(tmp_path), "--checkpoint.every_n_train_steps", "100",
              "--model.target", "banana", "--model.seed", "3"]
    run(*common, "--name", "whole", "--trainer.max_steps", "6")
    with pytest.raises(SystemExit) as exit_:
        run(*common, "--name", "cut", "--trainer.max_steps", "6", "--trainer.callbacks",
            f"[{{class_path: killat.KillAt, init_args: {{step: 3, signum: {int(signum)}}}}}]")
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert exit_.value.code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    err = capsys.readouterr().err
    assert f"krflows fit: stopped by {signal.Signals(signum).name} at step 3; checkpoint {last}" in err
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert not (tmp_path / "cut" / "report.md").exists()  # no report of an unfinished run
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # given back

    run(*TINY, "--trainer.max_steps", "6", "--ckpt_path", str(last))
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == whole["global_step"] == 6
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_divergence_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("--model.layers", "2", "--model.hidden", "[32, 32]", "--model.lr", "10", "--model.warmup", "0",
            "--trainer.max_steps", "200", "--trainer.enable_progress_bar", "false",
            "--root_dir", str(tmp_path), "--name", "lr10", "--model.target", "banana")
    assert exit_.value.code == 1
    assert "krflows fit: error: TrainingDivergedError: training diverged" in capsys.readouterr().err


def test_yaml_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"target": "gaussian", "target_options": {"dim": 3}, "transform": "affine"},
        "trainer": {"max_steps": 3, "log_every_n_steps": 1},
        "root_dir": str(tmp_path), "name": "yaml",
    }))
    run("--config", str(config), *TINY)
    ckpt = torch.load(tmp_path / "yaml" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["target"] == "gaussian"
    assert ckpt["hyper_parameters"]["target_options"] == {"dim": 3}  # not the default target's options
    assert ckpt["global_step"] == 3 and (tmp_path / "yaml" / "report.md").exists()
    assert f"tensorboard --logdir {tmp_path / 'yaml'}" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script(tmp_path):
    """The installed ``krflows`` entry point runs and exits 0; outputs go to ./runs/<timestamp>/."""
    exe = shutil.which("krflows")
    cmd = [exe] if exe else [sys.executable, "-m", "krflows.cli"]
    proc = subprocess.run([*cmd, "fit", "--trainer.max_steps", "5", *TINY], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert "tensorboard --logdir runs/" in proc.stdout


USER_TARGETS = '''
import torch
import pyro
import pyro.distributions as dist
from krflows.targets import Target


def log_p(x):
    return -0.5 * (x ** 2).sum(-1)


def bad_shape(x):
    return x


def crashes(x):
    return x @ torch.ones(5)


class Wide(Target):
    def __init__(self, dim=2, scale=2.0):
        super().__init__(dim)
        self.scale = scale

    def _log_prob(self, x):
        return -0.5 * ((x / self.scale) ** 2).sum(-1)


wide = Wide(3)
NUMBER = 3


def model():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("data", 3):
        pyro.sample("y", dist.Normal(mu, tau), obs=torch.tensor([0.3, -0.2, 0.5]))


def unbatched():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.tensor([0.3, -0.2, 0.5]))
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_targets.py"
    path.write_text(USER_TARGETS)
    return path


@pytest.mark.parametrize("attr, extra, dim", [
    ("log_p", ["--model.dim", "3"], 3),  # a callable: --model.dim required
    ("wide", [], 3),  # a Target instance
    ("Wide", ["--model.target_options", "{dim: 2, scale: 3.0}"], 2),  # a Target class, with options
])
def test_fit_a_user_target_from_a_file(tmp_path, capsys, user_file, attr, extra, dim):
    run(*TINY, "--trainer.max_steps", "3", "--root_dir", str(tmp_path), "--name", attr,
        "--model.target", f"{user_file}:{attr}", *extra)
    last = tmp_path / attr / "checkpoints" / "last.ckpt"
    hparams = torch.load(last, weights_only=False)["hyper_parameters"]
    assert hparams["target"] == f"{user_file}:{attr}"
    # resume imports the file again from the spec in the checkpoint
    run(*TINY, "--trainer.max_steps", "4", "--ckpt_path", str(last))
    assert torch.load(last, weights_only=False)["global_step"] == 4
    from krflows.lightning import KRFlowModule

    module = KRFlowModule.load_from_checkpoint(last)
    assert module.flow.dim == dim and module.target.dim == dim


def test_fit_a_pyro_model_reports_samples_per_site(tmp_path, capsys, user_file):
    run(*TINY, "--trainer.max_steps", "3", "--root_dir", str(tmp_path), "--name", "pyro",
        "--model.target", f"{user_file}:model")
    out = capsys.readouterr().out
    run_dir = tmp_path / "pyro"
    sites = torch.load(run_dir / "samples.pt")
    assert set(sites) == {"mu", "tau"} and sites["tau"].shape == (500,) and bool((sites["tau"] > 0).all())
    assert str(run_dir / "samples.pt") in out and str(run_dir / "summary.md") in out
    table = (run_dir / "summary.md").read_text()
    assert "| mu |" in table and "| tau |" in table and "95%" in table


def test_a_pyro_model_that_does_not_broadcast_runs_point_by_point(user_file):
    from krflows.spec import resolve_target

    with pytest.warns(UserWarning, match="does not broadcast over a batch of points"):
        potential = resolve_target(f"{user_file}:unbatched")
    assert potential.dim == 1 and not potential.vectorize and potential(torch.zeros(3, 1)).shape == (3,)


def test_fit_a_callable_from_a_module(tmp_path, monkeypatch, user_file):
    monkeypatch.syspath_prepend(str(user_file.parent))
    run(*TINY, "--trainer.max_steps", "2", "--root_dir", str(tmp_path), "--name", "mod",
        "--model.target", "user_targets:log_p", "--model.dim", "2")
    assert (tmp_path / "mod" / "report.md").exists()


@pytest.mark.parametrize("spec, extra, message", [
    ("missing.py:log_p", [], "target file not found: missing.py (the target 'missing.py:log_p'; relative "
                             "paths are read from the current directory {dir})"),
    ("user_targets.py:nope", [], "user_targets.py has no attribute 'nope'"),
    ("user_targets.py:NUMBER", [], "is a int, not a log-density callable log_prob(x) -> (n,), a krflows "
                                   "Target or a Pyro model"),
    ("user_targets.py:log_p", [], "is a log-density callable without a .dim: give its dimension, dim=N "
                                  "(on the command line --model.dim N)"),
    ("user_targets.py:bad_shape", ["--model.dim", "3"], "must map (n, 3) to (n,), got (2, 3)"),
    ("user_targets.py:crashes", ["--model.dim", "3"], "failed on a batch x of shape (2, 3); expected "
                                                      "log_prob(x) -> (2,)"),
    ("user_targets.py:wide", ["--model.dim", "2"], "has dimension 3, but dim=2 was given"),
    ("no_such_module_xyz:f", [], "cannot import module 'no_such_module_xyz'"),
    # a file in the current directory named as a module (the krflows script does not import from there)
    ("user_targets_mod:log_p", [], "for the file user_targets_mod.py in this directory, give the path: "
                                   "user_targets_mod.py:log_p"),
    ("bananna", [], "unknown target 'bananna'; choose one of"),
])
def test_user_target_errors_are_usage_errors(tmp_path, capsys, monkeypatch, user_file, spec, extra, message):
    monkeypatch.chdir(user_file.parent)
    (user_file.parent / "user_targets_mod.py").write_text("raise ImportError('not importable from here')\n")
    with pytest.raises(SystemExit) as exit_:
        run(*TINY, "--root_dir", str(tmp_path / "runs"), "--name", "bad", "--model.target", spec, *extra)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message.format(dir=user_file.parent) in err, err
    assert not (tmp_path / "runs" / "bad").exists()
