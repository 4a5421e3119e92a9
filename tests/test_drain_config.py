"""The ``[drain]`` section and the rotation keys of ``[http]``: defaults, sources, constraints."""

from __future__ import annotations

import pytest

from server.config import ConfigError, load_config


def test_defaults() -> None:
    config = load_config(environ={})
    assert (config.drain.window, config.drain.deadline) == (10.0, 30.0)
    assert config.http.max_connection_age == 0.0 and config.http.max_connection_age_jitter == 0.1


def test_environment_and_overrides() -> None:
    config = load_config(
        {"http": {"max_connection_age": "3600"}},
        environ={"SLUICE_DRAIN_WINDOW": "5", "SLUICE_DRAIN_DEADLINE": "20.5"},
    )
    assert (config.drain.window, config.drain.deadline, config.http.max_connection_age) == (5.0, 20.5, 3600.0)
    assert load_config({"drain": {"window": 0}}, environ={}).drain.window == 0.0  # all at once


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"drain": {"deadline": 10}}, "drain.deadline: must be more than drain.window (10.0), got 10.0"),
        ({"drain": {"window": 45}}, "drain.window: must be less than drain.deadline (30.0), got 45.0"),
        ({"drain": {"window": 45, "deadline": 40}}, "drain.deadline: must be more than drain.window (45.0)"),
        ({"drain": {"window": -1}}, "drain.window: must be a non-negative number"),
        ({"drain": {"deadline": 0}}, "drain.deadline: must be a positive number"),
        ({"http": {"max_connection_age": -1}}, "http.max_connection_age: must be a non-negative number"),
        ({"http": {"max_connection_age_jitter": 1}}, "http.max_connection_age_jitter: must be a number in 0..0.9"),
    ],
)
def test_constraints(overrides: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides, environ={})
    assert message in str(info.value)
