"""`polyreg-cnf train ...` is `python train.py ...`: the installed command and the script."""

import subprocess
import sys
from pathlib import Path

import pytest

import train
from polyreg_cnf.app import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "polyreg-cnf"
FLAGS = ["--data", "power", "--poly-coef", "2", "--max-steps", "7", "--print-config"]


def run(*argv):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def stopped(main, argv, capsys):
    """The exit status and stderr of a front door that stops through argparse."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def script():
    assert SCRIPT.is_file(), (f"{SCRIPT} is missing: the install declares it in "
                              "[project.scripts]; reinstall with `make install`")
    return SCRIPT


@pytest.mark.slow  # two subprocesses; test_in_process_train_matches_train_main is the fast twin
def test_installed_command_prints_the_same_configuration_as_train_py(script):
    ours, theirs = run(script, "train", *FLAGS), run(sys.executable, "train.py", *FLAGS)
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout
    assert "poly_coef: 2.0" in ours.stdout and "max_steps: 7" in ours.stdout, ours.stdout


def test_installed_command_refuses_a_bad_flag_with_status_2(script):
    proc = run(script, "train", "--data", "checkerboard", "--no-such-flag")
    assert proc.returncode == 2
    assert "polyreg-cnf train: error: unrecognized arguments: --no-such-flag" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_installed_command_help_lists_train(script):
    proc = run(script, "--help")
    assert proc.returncode == 0
    assert "train" in proc.stdout.split("COMMAND", 1)[1]


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required: COMMAND"),
    (["trian", "--data", "power"], "unknown command 'trian'; the commands are: train"),
    (["--data", "power"], "the following arguments are required: COMMAND"),
])
def test_a_missing_or_unknown_command_exits_2(argv, message, capsys):
    code, err = stopped(cli.main, argv, capsys)
    assert (code, message in err) == (2, True), err


@pytest.mark.parametrize("argv", [
    ["--max-steps", "0"],
    ["--poly-samples", "0", "--poly-order", "1"],
    ["--data", "nosuchset"],
])
def test_bad_values_give_train_py_s_message_under_the_command_s_name(argv, capsys):
    our_code, our_err = stopped(cli.main, ["train", *argv], capsys)
    their_code, their_err = stopped(train.main, argv, capsys)
    assert our_code == their_code == 2
    assert our_err.startswith("usage: polyreg-cnf train")
    assert their_err.startswith("usage: train.py")
    assert our_err.splitlines()[-1] == their_err.splitlines()[-1].replace("train.py",
                                                                          "polyreg-cnf train")


def test_in_process_train_matches_train_main(capsys):
    assert cli.main(["train", *FLAGS]) == 0
    ours = capsys.readouterr().out
    assert train.main(FLAGS) == 0
    assert ours == capsys.readouterr().out and ours.strip()
