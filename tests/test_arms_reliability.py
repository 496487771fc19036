"""Reward arms fail cleanly: bounded waits, bad numbers rejected by name, one-line spec errors,
one rule for charging the noise arm, and state left as it was when a call raises (issues 14 and 17)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch

from laser_rl.arms import NoisyArm, RemoteArm, RewardArm, RewardArmError, RuleArm, ScoreNormalizer, make_arm
from laser_rl.selector import RewardSelector

PROMPTS = ["What is 2 + 3?", "Is Tom an animal?", "Name a colour."]
RESPONSES = [" 5", " Yes.", " Blue."]
SLACK = 1.0  # seconds allowed past a deadline on a busy 2-core machine


# --- loopback servers (127.0.0.1 only; each connection and the server stop by themselves) ------------


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return body


def _http_answer(rewards: list) -> bytes:
    body = json.dumps({"rewards": rewards}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@contextlib.contextmanager
def _loopback_server(handle):
    """Accept connections on 127.0.0.1; handle(conn, stop) serves each in a thread. Yields (url, connection count)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop, served = threading.Event(), []

    def serve(conn):
        with conn:
            conn.settimeout(5.0)
            with contextlib.suppress(OSError):  # the client hung up: that is the point of these tests
                handle(conn, stop)

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            served.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/get_reward", served
    finally:
        stop.set()
        thread.join(timeout=2)
        listener.close()


def trickle(conn, stop, interval=0.4, max_bytes=60):
    """A valid serve_rm answer, one byte every 0.4 s (at most 60 bytes: each connection ends within 24 s)."""
    payload = json.loads(_read_request(conn))
    answer = _http_answer([1.0] * len(payload["query"]))
    for byte in answer[:max_bytes]:
        if stop.wait(interval):
            return
        conn.sendall(bytes([byte]))


# --- deadlines -------------------------------------------------------------------------------------


def test_remote_arm_deadline_holds_against_a_trickling_server():
    # Every read gets a byte well within the 2 s socket timeout, so only an overall deadline can end the call.
    with _loopback_server(trickle) as (url, served):
        arm = RemoteArm(url, timeout=2.0, retries=3, deadline=1.0)
        start = time.monotonic()
        with pytest.raises(RewardArmError, match=r"gave no answer within the 1 s deadline \(1 attempt,") as info:
            arm.score(PROMPTS, RESPONSES)
        elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.0 + SLACK, elapsed
    assert repr(arm.name) in str(info.value) and "\n" not in str(info.value)
    assert len(served) == 1  # no retry started once the deadline had passed


def test_remote_arm_default_deadline_is_timeout_times_attempts():
    # retries=1, timeout=0.6: at most 1.2 s for one request, backoff included.
    with _loopback_server(trickle) as (url, _):
        start = time.monotonic()
        with pytest.raises(RewardArmError, match=r"1.2 s deadline"):
            RemoteArm(url, timeout=0.6, retries=1).score(PROMPTS, RESPONSES)
        assert time.monotonic() - start < 1.2 + SLACK


def test_remote_arm_deadline_covers_the_whole_call():
    def slow(conn, stop):
        payload = json.loads(_read_request(conn))
        if not stop.wait(0.3):
            conn.sendall(_http_answer([float(len(q)) for q in payload["query"]]))

    with _loopback_server(slow) as (url, served):
        # Three requests of one sample, 0.3 s each: in time with a 3 s deadline ...
        scores = RemoteArm(url, timeout=2.0, batch_size=1, deadline=3.0).score(PROMPTS, RESPONSES)
        assert scores.tolist() == [float(len(p + r)) for p, r in zip(PROMPTS, RESPONSES)]
        assert len(served) == 3
        # ... and stopped after 0.5 s, in its second request, when that is the deadline for the call.
        start = time.monotonic()
        with pytest.raises(RewardArmError, match="0.5 s deadline"):
            RemoteArm(url, timeout=2.0, batch_size=1, deadline=0.5).score(PROMPTS, RESPONSES)
        assert time.monotonic() - start < 0.5 + SLACK


@pytest.mark.parametrize("spec", ["callable", "module"])
def test_rule_arm_timeout_names_the_arm(spec, tmp_path, monkeypatch):
    release = threading.Event()

    def hang(prompts, responses, labels):
        release.wait(10)  # bounded, and released at the end of the test
        return [0.0] * len(prompts)

    if spec == "callable":
        arm = make_arm(hang, timeout=0.3)
    else:
        (tmp_path / "laser_hanging_rule.py").write_text(
            "import threading\nrelease = threading.Event()\n"
            "def hang(prompts, responses, labels):\n    release.wait(10)\n    return [0.0] * len(prompts)\n"
        )
        monkeypatch.chdir(tmp_path)
        monkeypatch.delitem(sys.modules, "laser_hanging_rule", raising=False)
        arm = make_arm("laser_hanging_rule:hang", timeout=0.3)
        release = sys.modules["laser_hanging_rule"].release
    assert isinstance(arm, RuleArm) and arm.timeout == 0.3
    start = time.monotonic()
    try:
        with pytest.raises(RewardArmError, match=r"arm 'hang' did not return within its 0.3 s timeout"):
            arm.score(PROMPTS, RESPONSES)
        assert time.monotonic() - start < 0.3 + SLACK
    finally:
        release.set()


def test_rule_arm_timeout_keeps_results_and_errors():
    fast = RuleArm(lambda p, r, l: [float(len(x)) for x in r], name="len", timeout=5.0)
    assert fast.score(PROMPTS, RESPONSES).tolist() == [float(len(r)) for r in RESPONSES]

    def broken(prompts, responses, labels):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):  # raised in the worker, re-raised unchanged in the caller
        RuleArm(broken, timeout=5.0).score(PROMPTS, RESPONSES)
    assert RuleArm(broken).timeout is None  # off by default
    for bad in (0, -1.0, math.nan, math.inf, "5", True):
        with pytest.raises(ValueError, match="timeout"):
            RuleArm(broken, timeout=bad)


# --- bad numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "returned, message",
    [
        ({0: 1.0, 1: 0.0, 2: 1.0}, "returned a dict, not scores"),  # its keys would look like scores
        ("101", "returned a str"),
        ({1.0, 2.0, 3.0}, "returned a set"),
        ((x for x in [1.0, 2.0, 3.0]), "returned a generator"),
        ([[1.0], [2.0], [3.0]], "sample 0 is not a number"),
        ([1.0, "2", 3.0], "sample 1 is not a number"),
        ([1.0, None, 3.0], "sample 1 is not a number"),
        (torch.ones(3, 1), r"shape \(3, 1\)"),
        (torch.ones(3, dtype=torch.complex64), "complex"),
        (np.array(["a", "b", "c"]), "not numbers"),
        ([1.0, 2.0], "2 scores for 3 samples"),
    ],
)
def test_bad_scores_are_an_error_naming_the_arm(returned, message):
    with pytest.raises(RewardArmError, match=message) as info:
        RuleArm(lambda p, r, l: returned, name="my_rule").score(PROMPTS, RESPONSES)
    assert "'my_rule'" in str(info.value)


def test_every_arm_is_checked_in_one_place():
    class DictArm(RewardArm):  # any subclass: the check lives in RewardArm.score
        name = "dict_arm"

        def _score(self, prompts, responses, labels):
            return {i: 1.0 for i in range(len(prompts))}

    with pytest.raises(RewardArmError, match="'dict_arm' returned a dict"):
        DictArm().score(PROMPTS, RESPONSES)

    def server(conn, stop):
        _read_request(conn)
        conn.sendall(_http_answer([1.0, [2.0], 3.0]))

    with _loopback_server(server) as (url, _):
        with pytest.raises(RewardArmError, match="sample 1 is not a number"):
            RemoteArm(url, timeout=5.0).score(PROMPTS, RESPONSES)


def test_accepted_score_containers():
    expected = torch.tensor([1.0, 0.0, 2.5])
    for returned in (
        [1, False, 2.5],  # ints and bools (1/0) are numbers
        (np.float32(1.0), np.bool_(False), 2.5),
        np.array([1.0, 0.0, 2.5]),
        torch.tensor([1.0, 0.0, 2.5], requires_grad=True),
        [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.5)],
    ):
        scores = RuleArm(lambda p, r, l: returned, name="ok").score(PROMPTS, RESPONSES)
        assert scores.dtype == torch.float32 and not scores.requires_grad
        torch.testing.assert_close(scores, expected)
    # Non-finite values pass through: the selector names them and can skip them.
    assert torch.isnan(RuleArm(lambda p, r, l: [math.nan, 0.0, 1.0]).score(PROMPTS, RESPONSES)[0])
    with pytest.raises(ValueError, match="list of strings"):
        RuleArm(lambda p, r, l: [1.0] * 3).score("abc", "def")


# --- spec errors (issue 17) ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["{d}/no-such-rm", "implicit:{d}/no-such-rm", "implicit:{d}/no-such-rm@{d}/ref"])
def test_missing_path_says_does_not_exist(form, tmp_path):
    spec = form.format(d=tmp_path)
    with pytest.raises(ValueError, match="does not exist") as info:
        make_arm(spec)
    message = str(info.value)
    assert f"'{tmp_path}/no-such-rm'" in message and "\n" not in message and "unknown" not in message


def test_path_forms_and_files(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a model directory"):
        make_arm(str(tmp_path / "weights.bin"))
    for spec in ("./no-such-rm-dir", "~/no-such-rm-dir-xyz"):
        with pytest.raises(ValueError, match=f"'{spec}' does not exist"):
            make_arm(spec)


def test_module_function_resolves_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "laser_cwd_rewards.py").write_text(
        "def exact(prompts, responses, labels):\n    return [float(r.strip() == y) for r, y in zip(responses, labels)]\n"
    )
    (tmp_path / "laser_cwd_broken.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "laser_cwd_syntax.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    # The console script's sys.path holds neither '' nor the working directory; the lookup adds it for itself.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("laser_cwd_rewards", "laser_cwd_broken", "laser_cwd_syntax"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    path_before = list(sys.path)

    arm = make_arm("laser_cwd_rewards:exact")
    assert arm.name == "exact" and arm.score(["q", "q"], [" 5", " 6"], labels=["5", "5"]).tolist() == [1.0, 0.0]
    assert sys.path == path_before  # for that lookup only

    cases = [
        ("laser_cwd_missing_xyz:exact", re.escape(f"no module 'laser_cwd_missing_xyz' in the current directory ({tmp_path})")),
        ("laser_cwd_rewards:nope", "module 'laser_cwd_rewards' .* has no function 'nope'"),
        ("laser_cwd_broken:f", "module 'laser_cwd_broken' failed to import: No module named 'no_such_dependency_xyz'"),
        ("laser_cwd_syntax:f", "module 'laser_cwd_syntax' failed to import: SyntaxError"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            make_arm(spec)
        assert str(info.value).startswith(f"reward-model spec {spec!r}") and "\n" not in str(info.value)
        assert sys.path == path_before


# --- the noise arm's cost (issue 17) ---------------------------------------------------------------


def test_noise_arm_is_charged_like_one_rm_everywhere():
    class TwoPassArm(RewardArm):
        name, passes_per_sample = "two_pass", 2

        def _score(self, prompts, responses, labels):
            return [0.0] * len(prompts)

    assert NoisyArm().passes_per_sample == 1 and make_arm("noise:0.3").passes_per_sample == 1
    assert NoisyArm(TwoPassArm()).passes_per_sample == 2  # a wrapper costs what it wraps
    assert NoisyArm(TwoPassArm(), replace=True).passes_per_sample == 1  # replaced: pure noise
    assert NoisyArm(passes_per_sample=0).passes_per_sample == 0  # an explicit free stand-in
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="passes_per_sample"):
            NoisyArm(passes_per_sample=bad)
    for bad in ("noise:nan", "noise:inf", "noise:-1"):
        with pytest.raises(ValueError, match="bad noise spec"):
            make_arm(bad)

    # A mean ensemble of K arms, noise among them, pays K passes per sample: 1 + 2 + 1.
    rule = RuleArm(lambda p, r, l: [1.0] * len(p), name="rule")
    selector = RewardSelector([rule, TwoPassArm(), NoisyArm(sigma=1.0)], context_dim=2, baseline="mean")
    arms = selector.select(torch.eye(2)[:1], ["math"])
    selector.score(PROMPTS, RESPONSES, arms.repeat_interleave(3))
    assert selector.metrics()["laser/rm_passes"] == 4 * 3


# --- validate, then mutate -------------------------------------------------------------------------


def _normalizer_state(norm: ScoreNormalizer) -> list[torch.Tensor]:
    return [t.clone() for t in norm.state_dict().values()]


def test_score_normalizer_raises_before_it_changes_anything():
    norm = ScoreNormalizer(num_arms=2)
    norm.update(0, torch.tensor([1.0, 2.0, 4.0]))
    norm.update(1, torch.tensor([10.0, 30.0]))
    before = _normalizer_state(norm)
    bad_updates = [
        (0, torch.tensor([1.0, math.nan]), "non-finite"),
        (1, torch.tensor([math.inf]), "non-finite"),
        (1, [-math.inf, 2.0], "non-finite"),
        (0, torch.tensor([1e300, -1e300], dtype=torch.float64), "overflow"),  # finite, but its variance is not
        (2, torch.tensor([1.0]), "out of range"),
        (-1, torch.tensor([1.0]), "out of range"),  # must not silently mean the last arm
        (True, torch.tensor([1.0]), "integer"),
        (0.0, torch.tensor([1.0]), "integer"),
        (0, ["a", "b"], "not numbers"),
    ]
    for arm, scores, message in bad_updates:
        with pytest.raises(ValueError, match=message):
            norm.update(arm, scores)
        assert all(torch.equal(a, b) for a, b in zip(before, _normalizer_state(norm))), (arm, scores)
    with pytest.raises(ValueError, match="out of range"):
        norm.normalize(5, torch.tensor([1.0]))

    good = norm.state_dict()
    bad_states = [
        {"count": good["count"], "mean": good["mean"]},  # no var
        {**good, "count": torch.zeros(3, dtype=torch.long)},
        {**good, "mean": torch.tensor([0.0, math.nan], dtype=torch.float64)},
        {**good, "var": torch.tensor([-1.0, 1.0], dtype=torch.float64)},
        {**good, "count": torch.tensor([-2, 3])},
        "not a state",
    ]
    for state in bad_states:
        with pytest.raises(ValueError):
            norm.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(before, _normalizer_state(norm)))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_arms"):
            ScoreNormalizer(num_arms=bad)
    with pytest.raises(ValueError, match="momentum"):
        ScoreNormalizer(num_arms=1, momentum=math.nan)


def test_noisy_arm_state_survives_bad_calls():
    noisy = NoisyArm(sigma=1.0, seed=3)
    state = noisy.generator.get_state()
    for bad in ({}, {"generator": torch.zeros(3, dtype=torch.uint8)}, {"generator": "x"}):
        with pytest.raises(ValueError, match="not a NoisyArm state"):
            noisy.load_state_dict(bad)
        assert torch.equal(noisy.generator.get_state(), state)
    failing = NoisyArm(RuleArm(lambda p, r, l: {"a": 1.0}, name="dict_rule"), seed=3)
    with pytest.raises(RewardArmError, match="dict_rule"):
        failing.score(PROMPTS, RESPONSES)
    assert torch.equal(failing.generator.get_state(), state)  # no noise drawn for a failed call
    for bad in (math.nan, math.inf, -0.5, "1"):
        with pytest.raises(ValueError, match="sigma"):
            NoisyArm(sigma=bad)


def test_remote_arm_settings_are_checked():
    url = "http://127.0.0.1:9/get_reward"
    for kwargs, message in (
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"deadline": -1.0}, "deadline"),
        ({"deadline": math.inf}, "deadline"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(ValueError, match=message):
            RemoteArm(url, **kwargs)
    with pytest.raises(ValueError, match="port"):
        RemoteArm("http://127.0.0.1:notaport/get_reward")
