"""The command line: configs load, summary prints the layer table, user mistakes get one line."""

import glob
import logging as pylogging
import os
import subprocess
import sys

import pytest
from absl import flags
from helpers import ROOT, load_config, run_main

from vggjax import backend, cli, main, options
from vggjax.errors import UserError

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_is_valid_and_documents_its_command(path):
    module, config = load_config(path)
    if not config.model:  # the net of the checkpoint it starts from, which the user names
        config.model, config.num_classes, config.init_from = "D", 10, "ckpt"
    options.validate(config)
    name = os.path.relpath(path, ROOT)
    assert f"python -m vggjax.main --config={name}" in module.__doc__
    for field in (
        "model",
        "dataset",
        "data_dir",
        "batch_size",
        "num_train_steps",
        "checkpoint_every_steps",
        "seed",
    ):
        assert field in config


def test_paper_recipe_defaults():
    _, c = load_config(os.path.join(ROOT, "configs", "vgg19.py"))
    assert (c.model, c.batch_size, c.momentum, c.weight_decay, c.dropout_rate) == (
        "E",
        256,
        0.9,
        5e-4,
        0.5,
    )
    assert (c.learning_rate, c.lr_drop_factor, c.max_lr_drops, c.num_epochs) == (1e-2, 0.1, 3, 74)
    assert (c.train_scale, c.crop_size, c.eval.scales) == ((256, 256), 224, (224, 256, 288))
    _, c = load_config(os.path.join(ROOT, "configs", "vgg16.py"), "384")
    assert (c.train_scale, c.learning_rate, c.init_layers, c.eval.scales) == (
        (384, 384),
        1e-3,
        "all",
        (352, 384, 416),
    )
    _, c = load_config(os.path.join(ROOT, "configs", "vgg16.py"), "256-512")
    assert (c.train_scale, c.eval_scale, c.eval.scales) == ((256, 512), 384, (256, 384, 512))


def test_the_config_file_runs_once_and_overrides_apply(tmp_path):
    """main's parser executes the config file once (absl's config_flags would execute it again)
    and applies --config.FIELD overrides of each kind with ml_collections' parsers."""
    runs = tmp_path / "runs"
    (tmp_path / "counted.py").write_text(
        f"open({str(runs)!r}, 'a').write('ran\\n')\n"
        "from vggjax import recipe\n"
        "def get_config(scale):\n"
        "    return recipe.paper_recipe('D', scale)\n"
    )
    argv = [
        "vggjax",
        f"--config={tmp_path / 'counted.py'}:384",
        "--config.width=0.25",
        "--config.model",
        "vgg19",
        "--config.profile_steps=(2, 3)",
        "--noconfig.eval.flip",
        "--mode=summary",
    ]
    # absl's --verbosity is parsed too, and unparsing sets the loggers' levels from its default
    # (WARNING): put them back as they were, for the tests that read INFO lines after this one.
    loggers = [pylogging.getLogger(), pylogging.getLogger("absl")]
    levels = [logger.level for logger in loggers]
    try:
        config, overridden = main.parse_flags(argv)
    finally:
        main.FLAGS.unparse_flags()
        flags.FLAGS.unparse_flags()
        flags.FLAGS.mark_as_parsed()  # as test_data leaves it for grain
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    assert runs.read_text() == "ran\n"
    assert (config.model, config.width, config.train_scale) == ("vgg19", 0.25, (384, 384))
    assert (config.profile_steps, config.eval.flip) == ((2, 3), False)
    assert overridden == {"model", "width", "profile_steps", "eval.flip"}
    config.profile_steps = (3, 2)
    with pytest.raises(UserError, match=r"config.profile_steps must be \(\) or \(FIRST, LAST\)"):
        options.validate(config)


def test_the_wrapper_sets_up_the_program_and_gives_user_errors_one_line(monkeypatch, capsys):
    """cli.run: backend.tune_cpu(restart=True) first; a UserError ends in one line and status 2; a bug
    keeps its exception (and traceback)."""
    calls = []
    monkeypatch.setattr(backend, "tune_cpu", lambda **kw: calls.append(f"setup {kw}"))

    def program(message: str, error: type[Exception]) -> None:
        calls.append("main")
        raise error(message)

    with pytest.raises(SystemExit) as e:
        cli.run("prog", program, "bad value", UserError)
    assert e.value.code == 2 and calls == ["setup {'restart': True}", "main"]
    assert capsys.readouterr().err == "prog: error: bad value\n"
    with pytest.raises(KeyError, match="a bug"):
        cli.run("prog", program, "a bug", KeyError)


def test_the_console_script_goes_through_the_wrapper():
    """setup.py's `vggjax` entry point, vggjax.main:run, as the installed script calls it."""
    result = subprocess.run(
        [sys.executable, "-c", "from vggjax.main import run; run()", "--config=nope.py"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr
        == "vggjax: error: config file 'nope.py' not found; the configs are in configs/\n"
    )


def test_summary_prints_the_layer_table():
    result = run_main("--config=configs/vgg16.py", "--mode=summary", XLA_FLAGS="")
    assert result.returncode == 0, result.stderr
    assert "138,357,544" in result.stdout and "15.47 G multiply-adds" in result.stdout
    assert "conv5_3" in result.stdout and "fc8" in result.stdout
    result = run_main(
        "--config=configs/vgg19.py", "--mode=summary", "--image_size=256", XLA_FLAGS=""
    )
    assert result.returncode == 0, result.stderr
    assert "143,667,240" in result.stdout and "2×2×1000" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/nope.py"], "config file 'configs/nope.py' not found"),
        (["--mode=summary"], "--config is required"),
        (
            ["--config=configs/vgg16.py", "--config.nope=3", "--mode=summary"],
            "unknown config field --config.nope",
        ),
        (["--config=configs/vgg16.py", "--config.batch_size=abc"], "--config.batch_size=abc"),
        (
            ["--config=configs/vgg16.py", "--config.model=vgg17", "--mode=summary"],
            "unknown model 'vgg17'; choose one of",
        ),
        (
            ["--config=configs/vgg16.py", "--config.crop_size=100", "--mode=summary"],
            "config.crop_size must be a positive multiple of 32",
        ),
        (
            ["--config=configs/vgg16.py:12x", "--mode=summary"],
            "training scale must be S or SMIN-SMAX",
        ),
        (["--config=configs/vgg16.py", "--mode=bogus"], "--mode=bogus"),
        (["--config=configs/vgg16.py", "--bogus=1"], "Unknown command line flag 'bogus'"),
        (
            ["--config=configs/demo.py", "--mode=features", "--workdir=/no/such/run"],
            "no config.json in /no/such/run",
        ),
        (["--config=configs/finetune.py", "--mode=summary"], "config.init_from is empty"),
        (
            ["--config=configs/finetune.py", "--config.init_from=/no/ckpt", "--mode=summary"],
            "no config.json in /no/ckpt",
        ),
        (
            ["--config=configs/vgg16.py", "--config.transfer.c_values=(0,)", "--mode=summary"],
            "config.transfer.c_values must be a non-empty list of positive numbers",
        ),
        (
            [
                "--config=configs/demo.py",
                "--config.dataset=folder",
                "--config.data_dir=/no/such/dir",
                "--workdir=/tmp/x",
            ],
            "'/no/such/dir' is not a directory",
        ),
    ],
)
def test_user_mistakes_get_one_clear_line(args, message):
    result = run_main(*args, XLA_FLAGS="")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset=folder", "--data_dir=/no/such/dir"], "'/no/such/dir' is not a directory"),
        (["--bogus=1"], "Unknown command line flag 'bogus'"),
    ],
)
def test_stats_mistakes_get_one_line_and_status_2(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "vggjax.data.stats", *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
