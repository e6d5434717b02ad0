"""CLI: every --help works; bad input gives one clear line on stderr and exit status 2."""

import subprocess
import sys

import pytest

from loopnn.cli import build_parser, main

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "loopnn", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "prepare" in out.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def one_error_line(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert match in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--data-dir", "/nonexistent/data"], "/nonexistent/data"),
        (["train", "--preset", "debug", "--n-embd", "31", "--data-dir", "x"], "multiple of n_head"),
        (["train", "--preset", "debug", "--n-loops", "0", "--data-dir", "x"], "n_loops"),
        (["train", "--preset", "debug", "--loop-end", "7", "--data-dir", "x"], "loop range"),
        (["train", "--config", "/nonexistent.toml"], "not found"),
        (["eval", "/nonexistent/run"], "not found"),
        (["generate", "/nonexistent/run"], "not found"),
        (["prepare", "/nonexistent/corpus.txt", "--out", "/tmp/loopnn-never"], "corpus.txt"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, match, capsys):
    one_error_line(capsys, argv, match)


@pytest.mark.parametrize(
    "argv,match", [(["train", "--n-loops", "many"], "--n-loops"), (["train", "--loop-rule", "twice"], "--loop-rule")]
)
def test_usage_error_is_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_bad_toml_field_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_loopz = 3\n")
    one_error_line(capsys, ["train", "--config", str(bad)], "n_loopz")
    bad.write_text('[model]\nn_loops = "three"\n')
    one_error_line(capsys, ["train", "--config", str(bad)], "n_loops")
    bad.write_text("this is not toml [")
    one_error_line(capsys, ["train", "--config", str(bad)], "not valid TOML")
