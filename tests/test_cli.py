"""The command line ``krflows fit``: help, config printing, a run directory, resumption."""

import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from krflows.cli import main

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
                   "--name", "--root_dir", "--ckpt_path", "bimodal2d", "twomoons"):
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
