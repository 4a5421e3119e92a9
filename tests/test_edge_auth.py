"""Stream patterns, JWT verification, token extraction and authorisation (server.edge)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from server.core.events import is_valid_stream
from server.edge.auth import AuthConfig, AuthError, KeySpec, Verifier, extract_token
from server.edge.patterns import EMPTY, PatternSet, compile_pattern

NOW = 1_700_000_000.0
SECRET = b"s" * 40

# ---------------------------------------------------------------------------------------------
# patterns

SEGMENT_CHARS = "abcXYZ019._~@-"
segment = st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=8)
stream_names = st.lists(segment, min_size=1, max_size=12).map(":".join).filter(lambda s: len(s) <= 200)


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("chat:42", ["chat:42"], ["chat", "chat:4", "chat:42:x", "x:chat:42"]),
        ("chat:*", ["chat:1", "chat:abc"], ["chat", "chat:1:2", "chats:1"]),
        ("chat:**", ["chat", "chat:1", "chat:1:2:3"], ["chats", "x:chat", "chatx:1"]),
        ("a:**:b", ["a:b", "a:x:b", "a:x:y:b"], ["a", "a:b:c", "b", "x:a:b"]),
        ("**:x:**", ["x", "a:x", "x:b", "a:b:x:c:d"], ["a", "a:b", "xx"]),
        ("*:**", ["a", "a:b", "a:b:c"], []),
        ("*:*", ["a:b"], ["a", "a:b:c"]),
        ("**", ["a", "a:b", "~.@-:x"], []),
        ("a:**:**:b", ["a:b", "a:1:2:b"], ["a:1:2"]),
    ],
)
def test_pattern_semantics(pattern: str, yes: list[str], no: list[str]) -> None:
    compiled = compile_pattern(pattern)
    single = PatternSet([pattern])
    for name in yes:
        assert compiled.matches(name), name
        assert single.matches(name), name
    for name in no:
        assert not compiled.matches(name), name
        assert not single.matches(name), name


@pytest.mark.parametrize(
    "bad", ["", "chat*", "*x", "***", "a:***", "a::b", ":a", "a:", "a/b", "a b", "é", "x" * 201, "a:**b"]
)
def test_invalid_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        compile_pattern(bad)


def test_non_string_patterns_are_type_errors() -> None:
    with pytest.raises(TypeError):
        compile_pattern(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PatternSet("chat:*")


@pytest.mark.parametrize("name", ["", "a::b", "a/b", ":a", "a:", "x" * 201, "a b"])
def test_illegal_stream_names_never_match(name: str) -> None:
    assert not compile_pattern("**").matches(name)
    assert not PatternSet(["**", "a:**", "*:*"]).matches(name)


def test_pattern_set_any_of_and_fast_paths() -> None:
    rules = PatternSet(["news", "chat:*", "user:7:**", "news"])
    assert len(rules) == 3 and bool(rules)
    assert [p.text for p in rules.patterns] == ["news", "chat:*", "user:7:**"]
    assert rules.matches("news") and rules.matches("chat:9") and rules.matches("user:7:inbox")
    assert not rules.matches("chat:9:x") and not rules.matches("user:8") and not rules.matches("newsx")
    assert not EMPTY.matches("news") and not EMPTY
    assert PatternSet(["**", "x"]).matches_all and not rules.matches_all
    assert PatternSet(["a", "b:*"]) == PatternSet(["b:*", "a"])
    assert hash(PatternSet(["a", "b:*"])) == hash(PatternSet(["b:*", "a"]))


def test_many_double_stars_match_exactly() -> None:
    # the matcher is a table over (pattern segment, name segment): no backtracking to blow up
    pattern = compile_pattern(":".join(["**", "a"] * 30 + ["b"]))
    assert not pattern.matches(":".join(["a"] * 99))
    assert pattern.matches(":".join(["a"] * 99 + ["b"]))
    assert not pattern.matches(":".join(["a"] * 29 + ["b"]))


@given(stream_names)
def test_double_star_matches_every_legal_name(name: str) -> None:
    assert is_valid_stream(name)
    assert compile_pattern("**").matches(name)
    assert PatternSet(["**"]).matches(name)


@given(stream_names, stream_names)
def test_literal_pattern_matches_only_itself(name: str, other: str) -> None:
    pattern = compile_pattern(name)
    assert pattern.is_literal and pattern.matches(name)
    assert pattern.matches(other) == (other == name)
    assert PatternSet([name]).matches(other) == (other == name)


def _reference(pattern: list[str], names: list[str]) -> bool:
    """Obvious recursive glob over segments, for small inputs."""
    if not pattern:
        return not names
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_reference(rest, names[i:]) for i in range(len(names) + 1))
    return bool(names) and head in ("*", names[0]) and _reference(rest, names[1:])


@given(
    st.lists(st.sampled_from(["a", "b", "*", "**"]), min_size=1, max_size=6),
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6),
)
def test_matching_agrees_with_reference(pattern: list[str], names: list[str]) -> None:
    compiled = compile_pattern(":".join(pattern))
    expected = _reference(pattern, names)
    assert compiled.matches(":".join(names)) == expected
    assert PatternSet([compiled]).matches(":".join(names)) == expected


# ---------------------------------------------------------------------------------------------
# keys and tokens


@dataclass
class Keys:
    rs: rsa.RSAPrivateKey
    rs2: rsa.RSAPrivateKey
    es: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rs=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rs2=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        es=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
    )


def pem(key: Any) -> bytes:
    public = key.public_key() if hasattr(key, "public_key") else key
    return bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


@pytest.fixture
def files(tmp_path: Path, keys: Keys) -> dict[str, str]:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.rs2.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys.es.public_key()))
    jwks = {
        "keys": [{**rsa_jwk, "alg": "RS256", "kid": "rsa-1", "use": "sig"}, {**ec_jwk, "alg": "ES256", "kid": "ec-1"}]
    }
    return {
        "HS256": write(tmp_path, "hs.secret", SECRET + b"\n"),
        "RS256": write(tmp_path, "rsa.pem", pem(keys.rs)),
        "ES256": write(tmp_path, "ec.pem", pem(keys.es)),
        "EdDSA": write(tmp_path, "ed.pem", pem(keys.ed)),
        "jwks": write(tmp_path, "jwks.json", json.dumps(jwks)),
    }


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "u1", "exp": NOW + 60, "sluice": {"subscribe": ["chat:*"], "publish": ["chat:1"]}}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def sign(keys: Keys, alg: str, payload: dict[str, Any], **headers: Any) -> str:
    key: Any = {"HS256": SECRET, "RS256": keys.rs, "ES256": keys.es, "EdDSA": keys.ed}[alg]
    return jwt.encode(payload, key, algorithm=alg, headers=headers or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()) if secret is not None else ""
    return f"{signing_input}.{sig}"


MakeVerifier = Callable[..., Verifier]


@pytest.fixture
def make(files: dict[str, str]) -> MakeVerifier:
    def build(*algs: str, jwks: bool = False, **options: Any) -> Verifier:
        specs = [KeySpec(alg, files[alg]) for alg in algs]
        return Verifier(
            AuthConfig(enabled=True, keys=tuple(specs), jwks_file=files["jwks"] if jwks else None, **options)
        )

    return build


def refused(verifier: Verifier, token: str, reason: str, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now)
    assert (info.value.status, info.value.code, info.value.reason) == (401, "unauthorized", reason)
    assert token not in str(info.value) or not token
    return info.value


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256", "EdDSA"])
def test_valid_token_for_each_algorithm(make: MakeVerifier, keys: Keys, alg: str) -> None:
    verifier = make("HS256", "RS256", "ES256", "EdDSA")
    principal = verifier.verify(sign(keys, alg, claims()), NOW)
    assert principal.subject == "u1" and principal.expires_at == NOW + 60
    assert principal.subscribe.matches("chat:9") and not principal.subscribe.matches("chat:9:x")
    assert principal.publish.matches("chat:1") and not principal.publish.matches("chat:2")
    assert principal.claims["sub"] == "u1"
    with pytest.raises(TypeError):
        principal.claims["sub"] = "x"  # type: ignore[index]


def test_jwks_kid_selects_the_key(make: MakeVerifier, keys: Keys) -> None:
    verifier = make(jwks=True)
    rsa_token = jwt.encode(claims(), keys.rs2, algorithm="RS256", headers={"kid": "rsa-1"})
    ec_token = jwt.encode(claims(), keys.es, algorithm="ES256", headers={"kid": "ec-1"})
    assert verifier.verify(rsa_token, NOW).subject == "u1"
    assert verifier.verify(ec_token, NOW).subject == "u1"
    # the kid names the EC key, the token claims RS256: the key's pinned alg wins
    refused(verifier, jwt.encode(claims(), keys.rs2, algorithm="RS256", headers={"kid": "ec-1"}), "algorithm")
    refused(verifier, jwt.encode(claims(), keys.rs2, algorithm="RS256", headers={"kid": "nope"}), "key")
    # right alg, wrong key under a known kid
    refused(verifier, jwt.encode(claims(), keys.rs, algorithm="RS256", headers={"kid": "rsa-1"}), "signature")
    # no kid and no kid-less keys
    refused(verifier, jwt.encode(claims(), keys.rs2, algorithm="RS256"), "key")


def test_kidless_keys_are_tried_when_kid_names_none(make: MakeVerifier, keys: Keys) -> None:
    verifier = make("RS256", jwks=True)
    assert verifier.verify(sign(keys, "RS256", claims(), kid="issuer-side-id"), NOW).subject == "u1"


def test_a_token_without_kid_is_told_why_no_key_checks_it(files: dict[str, str], keys: Keys) -> None:
    named = Verifier(AuthConfig(enabled=True, keys=(KeySpec("HS256", files["HS256"], kid="k1"),)))
    assert named.verify(sign(keys, "HS256", claims(), kid="k1"), NOW).subject == "u1"
    error = refused(named, sign(keys, "HS256", claims()), "key")
    assert error.message == "the token has no kid, and every HS256 key is configured with one"
    # an algorithm with no key at all says so, kid or not
    assert refused(named, sign(keys, "ES256", claims()), "key").message == "no ES256 key is configured"
    assert refused(named, sign(keys, "HS256", claims(), kid="k2"), "key").message == "unknown key"


SMALL_RSA_JWK = {
    k: v
    for k, v in json.loads(
        jwt.algorithms.RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 1024).public_key())
    ).items()
    if k in ("n", "e")
}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda k: {k: v for k, v in k.items() if k != "alg"}, "alg must be one of"),
        (lambda k: {**k, "alg": "RS512"}, "alg must be one of"),
        (lambda k: {**k, "alg": "ES256"}, "needs kty"),
        (lambda k: {**k, "use": "enc"}, "use must be"),
        (lambda k: {**k, "d": "AAAA"}, "private key"),
        (lambda k: {**k, **SMALL_RSA_JWK}, "RSA public key of at least"),
    ],
)
def test_bad_jwks_entries_fail_at_construction(
    tmp_path: Path, keys: Keys, mutate: Callable[[dict[str, Any]], dict[str, Any]], message: str
) -> None:
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.rs.public_key())), "alg": "RS256"}
    path = write(tmp_path, "jwks.json", json.dumps({"keys": [mutate(jwk)]}))
    with pytest.raises(ValueError, match=message):
        Verifier(AuthConfig(enabled=True, jwks_file=path))


def test_expiry_not_before_and_leeway(make: MakeVerifier, keys: Keys) -> None:
    strict, lenient = make("HS256"), make("HS256", leeway_seconds=10)
    expired = sign(keys, "HS256", claims(exp=NOW - 5))
    refused(strict, expired, "expired")
    refused(strict, sign(keys, "HS256", claims(exp=NOW)), "expired")
    assert lenient.verify(expired, NOW).subject == "u1"
    refused(lenient, expired, "expired", now=NOW + 5)
    early = sign(keys, "HS256", claims(nbf=NOW + 5))
    refused(strict, early, "not_yet_valid")
    assert strict.verify(early, NOW + 5).subject == "u1"
    assert lenient.verify(early, NOW).subject == "u1"
    refused(strict, sign(keys, "HS256", claims(exp=None)), "claims")
    refused(strict, sign(keys, "HS256", claims(exp="soon")), "claims")
    refused(strict, sign(keys, "HS256", claims(iat="yesterday")), "claims")


def test_audience_and_issuer(make: MakeVerifier, keys: Keys) -> None:
    verifier = make("HS256", audience="sluice", issuer="https://id.example")
    good = claims(aud=["other", "sluice"], iss="https://id.example")
    assert verifier.verify(sign(keys, "HS256", good), NOW).subject == "u1"
    refused(verifier, sign(keys, "HS256", {**good, "aud": "other"}), "audience")
    refused(verifier, sign(keys, "HS256", {**good, "iss": "https://evil.example"}), "issuer")
    refused(verifier, sign(keys, "HS256", claims(iss="https://id.example")), "claims")  # no aud
    refused(verifier, sign(keys, "HS256", claims(aud="sluice")), "claims")  # no iss
    # without a configured audience a token addressed to someone is refused
    refused(make("HS256"), sign(keys, "HS256", claims(aud="sluice")), "audience")


def test_alg_none_is_refused(make: MakeVerifier) -> None:
    token = craft({"alg": "none", "typ": "JWT"}, claims())
    refused(make("HS256", "RS256"), token, "algorithm")
    refused(make("HS256"), craft({"alg": "None"}, claims()), "algorithm")


def test_hs256_signed_with_rsa_public_key_is_refused(make: MakeVerifier, files: dict[str, str], keys: Keys) -> None:
    public_pem = pem(keys.rs)
    token = craft({"alg": "HS256", "typ": "JWT"}, claims(), secret=public_pem)
    refused(make("RS256"), token, "key")
    # the same with a kid naming the RSA key: the RSA key is pinned to RS256
    named = Verifier(AuthConfig(enabled=True, keys=(KeySpec("RS256", files["RS256"], kid="k"),)))
    refused(named, craft({"alg": "HS256", "kid": "k"}, claims(), secret=public_pem), "algorithm")
    # a PEM file is never accepted as an HMAC secret
    with pytest.raises(ValueError, match="must not be a PEM"):
        Verifier(AuthConfig(enabled=True, keys=(KeySpec("HS256", files["RS256"]),)))


def test_token_alg_must_equal_the_pinned_alg(make: MakeVerifier, keys: Keys) -> None:
    refused(make("RS256"), sign(keys, "ES256", claims()), "key")
    refused(make("RS256", "HS256"), sign(keys, "EdDSA", claims()), "key")
    refused(make("HS256"), craft({"alg": "HS512"}, claims(), secret=SECRET), "algorithm")


def test_bad_signature_and_garbage(make: MakeVerifier, keys: Keys) -> None:
    verifier = make("HS256")
    refused(verifier, craft({"alg": "HS256"}, claims(), secret=b"t" * 40), "signature")
    good = sign(keys, "HS256", claims())
    head, _body, sig = good.split(".")
    tampered = f"{head}.{b64(json.dumps(claims(sub='admin')).encode())}.{sig}"
    refused(verifier, tampered, "signature")
    for garbage in ["", "abc", "a.b", "a.b.c", "a.b.c.d", "é.é.é", f"{head}.!!.{sig}"]:
        refused(verifier, garbage, "invalid")
    refused(verifier, "e30.e30.", "algorithm")  # header {} names no algorithm
    refused(verifier, craft({"alg": "HS256", "kid": 7}, claims(), secret=SECRET), "invalid")
    refused(verifier, craft({"alg": "HS256", "crit": ["x-unknown"]}, claims(), secret=SECRET), "invalid")
    refused(verifier, craft({"alg": "HS256"}, [1, 2], secret=SECRET), "invalid")  # type: ignore[arg-type]


def test_oversize_token(make: MakeVerifier, keys: Keys) -> None:
    verifier = make("HS256", max_token_bytes=300)
    big = sign(keys, "HS256", claims(pad="x" * 400))
    error = refused(verifier, big, "too_large")
    assert error.message == "token too large"
    with pytest.raises(AuthError, match="too large"):
        verifier.extract([(b"authorization", b"Bearer " + big.encode())], None)
    with pytest.raises(AuthError, match="too large"):
        verifier.extract([], {"access_token": big})


@pytest.mark.parametrize(
    "grant",
    [
        "chat:*",
        ["chat:*"],
        {"subscribe": "chat:*"},
        {"subscribe": [1]},
        {"publish": ["chat*"]},
        {"subscribe": ["a::b"]},
        None,
    ],
)
def test_malformed_sluice_claim_is_401(make: MakeVerifier, keys: Keys, grant: Any) -> None:
    payload = {**claims(), "sluice": grant}
    refused(make("HS256"), sign(keys, "HS256", payload), "claims")


def test_missing_sluice_claim_grants_nothing(make: MakeVerifier, keys: Keys) -> None:
    verifier = make("HS256")
    principal = verifier.verify(sign(keys, "HS256", claims(sluice=None)), NOW)
    assert not principal.subscribe and not principal.publish
    decision = verifier.authorize(principal, "subscribe", "chat:1")
    assert (decision.allowed, decision.status, decision.code) == (False, 403, "forbidden")


def test_authorize_matrix(make: MakeVerifier, keys: Keys) -> None:
    verifier = make("HS256", anonymous_subscribe=["public:**"], anonymous_publish=["guestbook"])
    principal = verifier.verify(sign(keys, "HS256", claims()), NOW)
    assert verifier.authorize(principal, "subscribe", "chat:5").allowed
    assert verifier.authorize(principal, "publish", "chat:1").expires_at == NOW + 60
    forbidden = verifier.authorize(principal, "publish", "chat:5")
    assert (forbidden.allowed, forbidden.status, forbidden.code) == (False, 403, "forbidden")
    with pytest.raises(AuthError) as info:
        forbidden.check()
    assert (info.value.status, info.value.code) == (403, "forbidden")
    # anonymous rules, with and without a token
    assert verifier.authorize(None, "subscribe", "public:news:1").allowed
    assert verifier.authorize(None, "subscribe", "public").allowed
    assert verifier.authorize(None, "publish", "guestbook").allowed
    assert verifier.authorize(principal, "subscribe", "public:x").allowed
    assert verifier.authorize(principal, "publish", "guestbook").allowed
    for action, stream in [("publish", "public:news"), ("subscribe", "guestbook"), ("subscribe", "chat:1")]:
        denied = verifier.authorize(None, action, stream)  # type: ignore[arg-type]
        assert (denied.allowed, denied.status, denied.code, denied.expires_at) == (False, 401, "unauthorized", None)
        with pytest.raises(AuthError) as info:
            denied.check()
        assert info.value.status == 401
    assert verifier.authorize(principal, "subscribe", "chat:5").check().principal is principal
    assert not verifier.authorize(principal, "subscribe", "chat::5").allowed


def test_invalid_token_is_401_even_where_anonymous_is_allowed(make: MakeVerifier, keys: Keys) -> None:
    verifier = make("HS256", anonymous_subscribe=["**"])
    expired = sign(keys, "HS256", claims(exp=NOW - 1))
    with pytest.raises(AuthError) as info:
        verifier.authenticate([(b"authorization", b"Bearer " + expired.encode())], None, NOW)
    assert (info.value.status, info.value.reason) == (401, "expired")
    assert verifier.authenticate([], "from=start", NOW) is None
    assert verifier.authorize(None, "subscribe", "any:thing").allowed


def test_disabled_auth_allows_everything_and_ignores_tokens() -> None:
    verifier = Verifier(AuthConfig())
    assert not verifier.enabled
    assert verifier.authenticate([(b"authorization", b"Bearer garbage")], None, NOW) is None
    assert verifier.authorize(None, "publish", "anything").allowed


def test_extraction_precedence() -> None:
    cookie = (b"cookie", b"theme=dark; sluice_token=from-cookie; other=1")
    header = (b"Authorization", b"Bearer from-header")
    assert extract_token([cookie, header], {"access_token": "from-query"}) == "from-header"
    assert extract_token([cookie], {"access_token": "from-query"}) == "from-query"
    assert extract_token([cookie], "x=1&access_token=from%2Dquery") == "from-query"
    assert extract_token([cookie], "x=1") == "from-cookie"
    assert extract_token([cookie], None) == "from-cookie"
    assert extract_token([], None) is None
    assert extract_token([(b"authorization", b"Basic dXNlcjpwdw==")], None) is None
    assert extract_token([(b"authorization", b"bearer   tok  ")], None) == "tok"
    # empty values count as absent
    assert extract_token([(b"authorization", b"Bearer ")], "access_token=") is None
    assert extract_token([(b"cookie", b"sluice_token=")], {}) is None


def test_extraction_cookie_parser_and_ambiguity() -> None:
    assert extract_token([(b"cookie", b"a=1"), (b"cookie", b'sluice_token="quoted"')], None) == "quoted"
    assert extract_token([(b"cookie", b"x_sluice_token=no; sluice_token=yes")], None) == "yes"
    assert extract_token([(b"cookie", b"junk;;=; sluice_token=first; sluice_token=second")], None) == "first"
    assert extract_token([(b"cookie", b"tok=c")], "t=q", cookie_name="tok", query_param="t") == "q"
    with pytest.raises(AuthError, match="more than one bearer"):
        extract_token([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], None)
    with pytest.raises(AuthError, match="more than one access_token"):
        extract_token([], "access_token=a&access_token=b")


def test_cache_honours_expiry_and_is_bounded(make: MakeVerifier, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    verifier = make("HS256", cache_size=2)
    token = sign(keys, "HS256", claims(exp=NOW + 10))
    first = verifier.verify(token, NOW)
    assert verifier.verify(token, NOW + 9) is first
    assert len(calls) == 1
    refused(verifier, token, "expired", now=NOW + 10)
    others = [sign(keys, "HS256", claims(sub=f"u{i}")) for i in range(2)]
    for other in others:
        verifier.verify(other, NOW)
    verifier.verify(token, NOW)  # evicted by the two others: decoded again
    assert len(calls) == 4
    uncached = make("HS256", cache_size=0)
    uncached.verify(token, NOW)
    uncached.verify(token, NOW)
    assert len(calls) == 6


def test_certificate_file_is_accepted(tmp_path: Path, keys: Keys) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.rs.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(keys.rs, hashes.SHA256())
    )
    path = write(tmp_path, "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
    verifier = Verifier(AuthConfig(enabled=True, keys=(KeySpec.parse(f"RS256:{path}"),)))
    assert verifier.verify(sign(keys, "RS256", claims()), NOW).subject == "u1"


def test_unsuitable_key_files_fail_at_construction(tmp_path: Path, keys: Keys, files: dict[str, str]) -> None:
    private = keys.rs.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cases = [
        (KeySpec("RS256", str(tmp_path / "missing.pem")), "cannot read"),
        (KeySpec("RS256", write(tmp_path, "priv.pem", private)), "private key"),
        (KeySpec("RS256", files["ES256"]), "RSA public key"),
        (KeySpec("RS256", write(tmp_path, "small.pem", pem(rsa.generate_private_key(65537, 1024)))), "2048"),
        (KeySpec("ES256", write(tmp_path, "p384.pem", pem(ec.generate_private_key(ec.SECP384R1())))), "P-256"),
        (KeySpec("EdDSA", files["RS256"]), "Ed25519"),
        (KeySpec("ES256", write(tmp_path, "junk.pem", b"not a key")), "not a PEM"),
        (KeySpec("HS256", write(tmp_path, "short", b"short\n")), "at least 32 bytes"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            Verifier(AuthConfig(enabled=True, keys=(spec,)))
    with pytest.raises(ValueError, match="no key is configured"):
        Verifier(AuthConfig(enabled=True))
    twice = (KeySpec("RS256", files["RS256"], kid="k"), KeySpec("ES256", files["ES256"], kid="k"))
    with pytest.raises(ValueError, match="used twice"):
        Verifier(AuthConfig(enabled=True, keys=twice))
    many = tuple(KeySpec("RS256", files["RS256"]) for _ in range(5))
    with pytest.raises(ValueError, match="without a kid"):
        Verifier(AuthConfig(enabled=True, keys=many))
    with pytest.raises(ValueError, match="not JSON"):
        Verifier(AuthConfig(enabled=True, jwks_file=write(tmp_path, "bad.json", b"{")))
    with pytest.raises(ValueError, match='"keys" list'):
        Verifier(AuthConfig(enabled=True, jwks_file=write(tmp_path, "bad2.json", b"[]")))


def test_auth_config_validation() -> None:
    config = AuthConfig(
        keys=[{"alg": "RS256", "file": "/k.pem", "kid": "a"}, "EdDSA:/e.pem"],  # type: ignore[arg-type]
        anonymous_subscribe=["public:**"],  # type: ignore[arg-type]
    )
    assert config.keys == (KeySpec("RS256", "/k.pem", "a"), KeySpec("EdDSA", "/e.pem"))
    assert config.anonymous_subscribe == ("public:**",)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"keys": ("none:/x",)}, "alg must be one of"),
        ({"keys": ({"alg": "RS256"},)}, "auth key must be"),
        ({"keys": ({"alg": "RS256", "file": "/x", "extra": 1},)}, "auth key must be"),
        ({"leeway_seconds": -1.0}, "leeway"),
        ({"leeway_seconds": float("nan")}, "leeway"),
        ({"max_token_bytes": 0}, "max_token_bytes"),
        ({"cache_size": -1}, "cache_size"),
        ({"anonymous_publish": ("chat*",)}, "anonymous_publish"),
        ({"anonymous_subscribe": "public:**"}, "list of patterns"),
        ({"cookie_name": ""}, "cookie_name"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            AuthConfig(**kwargs)
