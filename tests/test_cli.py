import os

import pytest
import torch

from laser_rl.cli import main


def test_example_learns_and_writes_plot_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["example", "--steps", "40", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith("domain") and line.split()[0] != "domain"]
    assert len(rows) == 3
    for k, row in enumerate(rows):  # arm k is best on domain k
        fractions = [float(x) for x in row[1:]]
        assert max(range(4), key=fractions.__getitem__) == k and fractions[3] < 0.1
    assert (out / "arm_choice_by_domain.png").stat().st_size > 10_000
    events = os.listdir(out / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_example_tensorboard_holds_selector_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(["example", "--steps", "5", "--output-dir", str(out)])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "laser/arm_entropy" in tags and "laser/domain/domain0/arm_frac/rm_noise" in tags
    assert len(acc.Scalars("laser/cumulative_regret")) == 5


def test_example_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["example", "--steps", "0"])
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["example", "--bandit", "greedy"])
