"""The evaluation commands speak one vocabulary: the data set names of training, --output for the results file,
and a default shown for every option in --help."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from eval_protocols import knn, linear
from ssd.data import DATASET_NAMES
from tests.tiny import REPO, subprocess_env

COMMANDS = {"eval_protocols.knn": knn, "eval_protocols.linear": linear}


def option_helps(help_text: str) -> dict[str, str]:
    """{option: its help text} from argparse's --help output (an entry runs until the next option)."""
    entries = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    helps = {}
    for entry in filter(str.strip, entries):
        words = entry.split("\n\n")[0].split()  # a blank line ends the entry (a group title follows)
        name = words[0].rstrip(",")
        if name.startswith("--"):
            helps[name] = " ".join(words)
    return helps


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_shows_a_default_for_every_option(module, capsys):
    with pytest.raises(SystemExit) as exited:
        COMMANDS[module].parse_args(["--help"])
    assert exited.value.code == 0
    helps = option_helps(capsys.readouterr().out)
    assert {"--dataset", "--data-root", "--output", "--limit", "--fraction", "--baselines", "--seed"} <= set(helps)
    missing = [name for name, text in helps.items() if name != "--help" and "default" not in text]
    assert not missing, f"options without a default in --help: {missing}"
    assert "(default: imagefolder)" in helps["--dataset"] and "(default: 0)" in helps["--seed"]
    assert "data.root" in helps["--data-root"] and "data.dataset" in helps["--dataset"]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_dataset_names_are_those_of_training(module):
    labelled = [name for name in DATASET_NAMES if name != "folder"]  # folder: training's unlabelled data set
    for name in labelled:
        args = COMMANDS[module].parse_args(["run", "--dataset", name, "--output", "out.json"])
        assert args.dataset == name and args.output == "out.json"


def test_unusable_data_options_are_refused_naming_the_fix(capsys):
    for arguments, message in (("--limit 0", "--limit must be at least 1"),
                               ("--fraction 1.5", "--fraction must be in (0, 1]")):
        with pytest.raises(SystemExit) as exited:
            knn.parse_args(["run", "--dataset", "digits", *arguments.split()])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    # A real process: the usage error is one message and exit status 2, no traceback.
    unlabelled = subprocess.run([sys.executable, "-m", "eval_protocols.linear", "run", "--dataset", "folder"],
                                cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert unlabelled.returncode == 2 and "use --dataset imagefolder" in unlabelled.stderr
    assert "Traceback" not in unlabelled.stderr
