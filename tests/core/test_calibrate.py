"""`covspec calibrate`: a real edge and draft measured into a profile; the profile read back (with
clear errors for a bad one) and used as the device's drafting priors."""

from __future__ import annotations

import json

import pytest
import tiny_models
from test_runtimes import RunningEdge, png

from covspec.calibration.measure import calibrate, verify_line
from covspec.calibration.profile import ProfileError, load_profile
from covspec.device_runtime.client import DeviceRuntime
from covspec.models import load_adapter
from covspec.policy import MARGIN_BINS, OnlineStats
from covspec.sampling import SamplingParams


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    target = tiny_models.build_llava(root / "target", seed=0)
    edge = RunningEdge(target)
    draft = load_adapter(target)  # the target as its own draft: every drafted token is accepted
    requests = [(png(i), "what is it ?") for i in range(3)]
    profile = calibrate(edge.endpoint, {"eager": draft}, requests, "test")
    yield profile, edge, draft, root
    edge.close()


def test_profile_holds_every_measurement(measured):
    profile, *_ = measured
    assert set(profile.verify_ms) == set(range(1, 17)) and all(v > 0 for v in profile.verify_ms.values())
    assert profile.draft_step_ms["eager"] > 0 and profile.target_step_ms and profile.target_step_ms > 0
    assert 0 < profile.rtt_ms < 1000 and profile.up_mbit > 0 and profile.down_mbit > 0
    assert sum(profile.bin_judged) > 0 and profile.acceptance == 1.0  # self-drafting is always accepted
    assert len(profile.bin_acceptance) == len(MARGIN_BINS) - 1 and profile.items == 3


def test_profile_round_trips_and_seeds_the_policy(measured, tmp_path):
    profile, edge, draft, _ = measured
    back = load_profile(profile.save(tmp_path / "p.json"))
    assert back == profile
    stats = OnlineStats(**back.policy_priors("eager"))
    assert stats.t_draft == pytest.approx(profile.draft_step_ms["eager"] / 1000)
    assert stats.acceptance == pytest.approx(1.0)
    device = DeviceRuntime(draft, edge.endpoint, profile=back)
    try:
        answer = device.answer(png(5), "what is it ?", "covspec", SamplingParams(), max_new_tokens=8)
        assert answer.ids and all(r.margins is not None for r in answer.rounds)
    finally:
        device.close()


def test_verify_line_fits_a_line():
    v0, v1 = verify_line({1: 3.0, 2: 3.5, 3: 4.0, 4: 4.5})
    assert v0 == pytest.approx(2.5) and v1 == pytest.approx(0.5)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.pop("rtt_ms"), "missing rtt_ms"),
    (lambda d: d.update(acceptance=1.5), "acceptance = 1.5"),
    (lambda d: d.update(draft_step_ms={"eager": -1}), "draft_step_ms"),
    (lambda d: d.update(verify_ms={"x": 1}), "wrong type"),
    (lambda d: d.update(bin_acceptance=[1.0]), "bin_acceptance"),
])
def test_bad_profiles_are_refused_by_name(measured, tmp_path, change, message):
    profile, *_ = measured
    data = json.loads(profile.save(tmp_path / "p.json").read_text())
    change(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        load_profile(tmp_path / "bad.json")


def test_unreadable_profile(tmp_path):
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not readable JSON"):
        load_profile(tmp_path / "x.json")
