"""The edge sections of the configuration: lists, booleans and arrays of tables from TOML and the
environment, and errors that name the offending entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import ConfigError, load_config
from server.config_render import render_toml
from server.edge.auth import KeySpec
from server.edge.limits import KeySource


def test_defaults_leave_the_edge_open() -> None:
    config = load_config(environ={})
    assert config.proxy.trusted == ()
    assert config.auth.enabled is False
    assert config.limits.rules == ()
    assert config.cors.allow_origins == ()
    assert config.compression.sse_gzip is True


def _key_files(tmp_path: Path) -> tuple[str, str]:
    """An HS256 secret and an RSA public key in PEM, as files."""
    hs, rs = tmp_path / "hs.key", tmp_path / "rs.pem"
    hs.write_bytes(b"s" * 40)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rs.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return str(hs), str(rs)


def test_lists_booleans_and_tables_from_toml(tmp_path: Path) -> None:
    hs, rs = _key_files(tmp_path)
    path = tmp_path / "sluice.toml"
    path.write_text(
        f"""
[proxy]
trusted = ["10.0.0.0/8", "::1"]
[auth]
enabled = true
keys = [{{alg = "HS256", file = "{hs}", kid = "a"}}, "RS256:{rs}"]
anonymous_subscribe = ["public:**"]
[limits]
rules = [{{route = "publish", rate = 5, burst = 10, key = "claim:sub", streams = "chat:*"}}]
[cors]
allow_origins = ["https://app.example"]
""",
        encoding="utf-8",
    )
    config = load_config(environ={}, config_path=str(path))
    assert config.proxy.trusted == ("10.0.0.0/8", "::1")
    assert config.auth.enabled is True
    assert config.auth.keys == (KeySpec("HS256", hs, "a"), KeySpec("RS256", rs))
    assert config.auth.anonymous_subscribe == ("public:**",)
    (rule,) = config.limits.rules
    assert (rule.route, rule.rate, rule.burst, rule.streams) == ("publish", 5, 10, "chat:*")
    assert rule.key == KeySource.parse("claim:sub")
    assert config.cors.allow_origins == ("https://app.example",)
    # the effective configuration renders to TOML that loads back to the same thing
    again = tmp_path / "again.toml"
    again.write_text(render_toml(config), encoding="utf-8")
    assert load_config(environ={}, config_path=str(again)) == config


def test_lists_booleans_and_tables_from_the_environment() -> None:
    config = load_config(
        environ={
            "SLUICE_PROXY_TRUSTED": "127.0.0.1, 10.1.0.0/16",
            "SLUICE_AUTH_ENABLED": "yes",
            "SLUICE_LIMITS_RULES": '[{"route": "connect", "rate": 50}]',
            "SLUICE_CORS_WS_ALLOWED_ORIGINS": "",
            "SLUICE_COMPRESSION_SSE_GZIP": "off",
        }
    )
    assert config.proxy.trusted == ("127.0.0.1", "10.1.0.0/16")
    assert config.auth.enabled is True
    assert config.limits.rules[0].route == "connect"
    assert config.cors.ws_allowed_origins is None
    assert config.compression.sse_gzip is False


@pytest.mark.parametrize(
    ("environ", "where"),
    [
        ({"SLUICE_PROXY_TRUSTED": "10.0.0.1/8"}, "[proxy]"),
        ({"SLUICE_AUTH_ENABLED": "maybe"}, "auth.enabled"),
        ({"SLUICE_LIMITS_RULES": '[{"route": "teleport", "rate": 1}]'}, "limits.rules"),
        ({"SLUICE_LIMITS_RULES": "not json"}, "limits.rules"),
        ({"SLUICE_AUTH_KEYS": '[{"alg": "none", "file": "x"}]'}, "auth.keys"),
        ({"SLUICE_CORS_ALLOW_ORIGINS": "*", "SLUICE_CORS_ALLOW_CREDENTIALS": "true"}, "[cors]"),
        ({"SLUICE_COMPRESSION_GZIP_LEVEL": "12"}, "compression.gzip_level"),
    ],
)
def test_bad_edge_values_name_their_key(environ: dict[str, str], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    assert where in str(info.value)


def test_key_files_are_checked_with_the_configuration(tmp_path: Path) -> None:
    """An unreadable or unsuitable key is a config error (``sluice check-config`` reports it), not
    a worker that fails at start."""
    hs, rs = _key_files(tmp_path)
    missing = str(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match=r"auth\.keys: cannot read auth key file .*missing\.key"):
        load_config(environ={"SLUICE_AUTH_ENABLED": "true", "SLUICE_AUTH_KEYS": json.dumps([f"HS256:{missing}"])})
    with pytest.raises(
        ConfigError, match=r"auth\.keys: .*hs\.key.: not a PEM public key"
    ):  # an HMAC secret is no RSA key
        load_config(environ={"SLUICE_AUTH_KEYS": json.dumps([f"RS256:{hs}"])})
    bad_jwks = tmp_path / "jwks.json"
    bad_jwks.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"auth\.jwks_file"):
        load_config(environ={"SLUICE_AUTH_KEYS": json.dumps([f"RS256:{rs}"]), "SLUICE_AUTH_JWKS_FILE": str(bad_jwks)})
    config = load_config(
        environ={"SLUICE_AUTH_ENABLED": "true", "SLUICE_AUTH_KEYS": json.dumps([f"HS256:{hs}", f"RS256:{rs}"])}
    )
    assert len(config.auth.keys) == 2
