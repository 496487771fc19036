import json

import pytest
import torch

from laser_rl.agreement import agreement_matrix, pairwise_orders, plot_agreement, rm_agreement
from laser_rl.arms import RuleArm
from laser_rl.cli import main

PROMPTS = ["p0", "p1"]
RESPONSES = [["a", "b", "c"], ["d", "e", "f"]]
# Each RM's score of each response, chosen so the agreement can be counted by hand.
TABLE = {
    "A": {"a": 1, "b": 2, "c": 3, "d": 3, "e": 2, "f": 1},
    "B": {"a": 1, "b": 2, "c": 3, "d": 1, "e": 2, "f": 3},
    "C": {"a": 1, "b": 1, "c": 3, "d": 3, "e": 2, "f": 1},
}


def _arm(name):
    return RuleArm(lambda p, r, l: [float(TABLE[name][x]) for x in r], name=name)


def test_pairwise_orders_stay_within_prompts():
    orders = pairwise_orders(torch.tensor([[1.0, 2.0, 3.0], [3.0, 3.0, 1.0]]))
    # pairs (0,1), (0,2), (1,2) of prompt 0, then of prompt 1: never a response of p0 against one of p1
    assert orders.tolist() == [-1, -1, -1, 0, 1, 1]
    with pytest.raises(ValueError, match="n >= 2"):
        pairwise_orders(torch.zeros(3, 1))


def test_agreement_matrix_matches_a_hand_count():
    result = rm_agreement([_arm("A"), _arm("B"), _arm("C")], PROMPTS, RESPONSES)
    # Orders per pair, p0 then p1:  A: - - - + + +   B: - - - - - -   C: 0 - - + + +
    expected = torch.tensor([
        [1.0, 3 / 6, 5 / 6],
        [3 / 6, 1.0, 2 / 6],
        [5 / 6, 2 / 6, 1.0],
    ], dtype=torch.float64)
    torch.testing.assert_close(result.matrix, expected)
    assert torch.equal(result.matrix, result.matrix.T) and (result.matrix.diagonal() == 1).all()
    assert result.num_pairs == 6 and result.names == ["A", "B", "C"]


def test_agreement_per_domain_and_label_accuracy(tmp_path):
    result = rm_agreement([_arm("A"), _arm("B")], PROMPTS, RESPONSES, domains=["math", "logic"])
    assert result.per_domain["math"][0][0, 1] == 1.0 and result.per_domain["logic"][0][0, 1] == 0.0
    assert result.per_domain["math"][1] == 3
    # chosen first, rejected second: A prefers the chosen on p1 only, B on neither.
    pairs = rm_agreement([_arm("A"), _arm("B")], PROMPTS, [["a", "b"], ["d", "e"]], preferred_first=True)
    assert pairs.label_accuracy == {"A": 0.5, "B": 0.0}
    plot_agreement(result, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 5_000
    assert "domain logic" in result.format()


def test_agreement_rejects_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        rm_agreement([_arm("A")], PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="same number"):
        rm_agreement([_arm("A"), _arm("B")], PROMPTS, [["a", "b", "c"], ["d", "e"]])
    with pytest.raises(ValueError, match="num_pairs >= 1"):
        agreement_matrix(torch.zeros(2, 0))


@pytest.fixture
def rule_rms(tmp_path, monkeypatch):
    """A module with rule RMs on sys.path, so the CLI's module:function specs can import it."""
    (tmp_path / "agreement_rms.py").write_text(
        "def longer(prompts, responses, labels):\n    return [float(len(r)) for r in responses]\n"
        "def shorter(prompts, responses, labels):\n    return [-float(len(r)) for r in responses]\n"
        "def has_yes(prompts, responses, labels):\n    return [float('yes' in r.lower()) for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["agreement_rms:longer", "agreement_rms:shorter", "agreement_rms:has_yes"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_agreement_on_responses_and_pairs(tmp_path, rule_rms, capsys):
    data = _write(tmp_path / "r.jsonl", [
        {"prompt": "Is Tom an animal?", "responses": ["Yes.", "No, never.", "yes he is"], "domain": "logic"},
        {"prompt": "What is 2 + 3?", "responses": ["5", "It is 5", "six"], "domain": "math"},
    ])
    out = tmp_path / "agree"
    assert main(["agreement", "--reward-models", *rule_rms, "--data", data, "--output-dir", str(out)]) == 0
    saved = json.loads((out / "agreement.json").read_text())
    matrix = torch.tensor(saved["matrix"])
    assert matrix.shape == (3, 3) and torch.equal(matrix, matrix.T) and (matrix.diagonal() == 1).all()
    assert saved["num_pairs"] == 6 and set(saved["per_domain"]) == {"logic", "math"}
    assert matrix[0, 1] == 0.0  # longer vs. shorter: never ordered alike (no equal lengths here)
    assert (out / "agreement.png").stat().st_size > 5_000
    assert "all prompts (6 pairs)" in capsys.readouterr().out

    pairs = _write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "yes, long answer", "rejected": "no"}])
    assert main(["agreement", "--reward-models", *rule_rms, "--data", pairs, "--output-dir", str(tmp_path / "pairs")]) == 0
    assert json.loads((tmp_path / "pairs" / "agreement.json").read_text())["label_accuracy"] == {"longer": 1.0, "shorter": 0.0, "has_yes": 1.0}


def test_cli_agreement_samples_responses_with_a_policy(tmp_path, tokenizer, causal_lm, rule_rms, capsys):
    policy_dir = tmp_path / "policy"
    causal_lm.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    data = _write(tmp_path / "q.jsonl", [{"prompt": "What is 2 + 3?"}, {"prompt": "Is Tom an animal?"}])
    out = tmp_path / "sampled"
    with pytest.raises(SystemExit):
        main(["agreement", "--reward-models", *rule_rms, "--data", data, "--output-dir", str(out)])
    assert "give --policy" in capsys.readouterr().err
    assert main(["agreement", "--reward-models", *rule_rms, "--data", data, "--policy", str(policy_dir), "--n", "3",
                 "--max-new-tokens", "5", "--device", "cpu", "--output-dir", str(out)]) == 0
    assert json.loads((out / "agreement.json").read_text())["num_pairs"] == 2 * 3
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        main(["agreement", "--reward-models", rule_rms[0], "--data", data])
