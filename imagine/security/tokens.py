"""JWT bearer tokens: key material, verification with pinned algorithms, signing, scopes.

The algorithm always comes from the configuration, never from the token header,
so `alg: none` and HS/RS confusion tokens fail signature checks by construction.
"""

from __future__ import annotations

import base64
import collections
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from imagine.errors import ApiError
from imagine.security.private_files import secret_in
from imagine.security.quotas import QuotaClaim, parse_claim
from imagine.settings import AuthSettings

SECRET_ENV = "IMAGINE_JWT_SECRET"
DEV_SECRET_FILE = "dev-jwt-secret"
MIN_SECRET_BYTES = 32
SCOPES = ("generate", "admin", "metrics")
# A subject names the caller's jobs, images, sessions and counters in every store: it must be text each of
# them can hold (PostgreSQL refuses NUL, UTF-8 a lone surrogate) and of a name's length.
MAX_SUBJECT_LENGTH = 255
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# NumericDate claims (RFC 7519): JSON numbers of seconds, here up to the end of the year 9999.
_TIME_CLAIMS = ("exp", "nbf", "iat")
MAX_NUMERIC_DATE = 253402300799


class JwtKeyError(ValueError):
    """Key material is missing or unusable; the service must not start with it."""


@dataclass(frozen=True)
class JwtKeys:
    algorithm: str
    verify_key: str | bytes
    signing_key: str | bytes | None
    # "environment", "file" or "development": serve prints a token only for the last.
    source: str
    location: str = ""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's subject, what it may do, and which models it may use."""

    sub: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None
    # The token's `quota` claim: limits that override `[quotas]` for this token.
    quota: QuotaClaim | None = field(default=None, compare=False)

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise JwtKeyError(f"cannot read {what} {path}: {error.strerror}") from None


def _development_secret(state_dir: Path) -> tuple[bytes, Path]:
    """A random secret kept in the state folder, so demo tokens survive restarts."""
    path = state_dir / DEV_SECRET_FILE
    return secret_in(path), path


def load_jwt_keys(
    settings: AuthSettings, state_dir: Path, environ: Mapping[str, str] | None = None
) -> JwtKeys:
    """Find the key that verifies tokens (and, where we hold it, the key that signs them)."""
    environ = os.environ if environ is None else environ
    if settings.algorithm != "HS256":
        public_key = _read_file(settings.public_key_file, "auth.public_key_file")
        private_key = _read_file(settings.private_key_file, "auth.private_key_file") if settings.private_key_file else None
        return JwtKeys(settings.algorithm, public_key, private_key, "file", settings.public_key_file)
    if environ.get(SECRET_ENV):
        secret, source, location = environ[SECRET_ENV].encode(), "environment", SECRET_ENV
    elif settings.secret_file:
        secret, source, location = _read_file(settings.secret_file, "auth.secret_file").strip(), "file", settings.secret_file
    else:
        secret, path = _development_secret(state_dir)
        source, location = "development", str(path)
    if len(secret) < MIN_SECRET_BYTES:
        raise JwtKeyError(f"the HS256 secret from {location} is shorter than {MIN_SECRET_BYTES} bytes")
    return JwtKeys("HS256", secret, secret, source, location)


_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """'30d' -> seconds. Units: s, m, h, d, w (none means seconds)."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"invalid duration {text!r}: use e.g. 3600, 90m, 12h, 30d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def sign_token(
    keys: JwtKeys,
    settings: AuthSettings,
    *,
    sub: str,
    scopes: Iterable[str],
    ttl_s: int,
    models: Iterable[str] | None = None,
) -> str:
    if keys.signing_key is None:
        raise JwtKeyError("signing a token needs auth.private_key_file for " + keys.algorithm)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "scope": " ".join(scopes), "iat": now, "nbf": now, "exp": now + ttl_s}
    if models is not None:
        claims["models"] = list(models)
    if settings.audience:
        claims["aud"] = settings.audience
    if settings.issuer:
        claims["iss"] = settings.issuer
    return jwt.encode(claims, keys.signing_key, algorithm=keys.algorithm)


# A JWS in compact form: three base64url parts. Anything else (a stray byte
# from a broken client, a space, a non-ASCII character) is refused before
# PyJWT sees it, since it would fail there with a decoder's message or error.
_COMPACT_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MALFORMED = "malformed token"


class InvalidToken(Exception):
    """Why a token was refused, in words safe to show the caller."""


@dataclass(frozen=True)
class _Verified:
    principal: Principal
    not_before: float
    expires: float


class TokenVerifier:
    """Checks tokens; a token that passed is remembered until it expires.

    Clients send the same token with every request, and a full check costs
    more than half a millisecond. The cache is keyed by the whole token,
    signature included, so only a byte-identical token hits it, and the
    time claims are checked again on every hit.
    """

    def __init__(self, keys: JwtKeys, settings: AuthSettings, *, cache_size: int = 4096) -> None:
        self._keys = keys
        self._settings = settings
        self._cache_size = cache_size
        self._verified: collections.OrderedDict[str, _Verified] = collections.OrderedDict()

    def verify(self, token: str) -> Principal:
        remembered = self._verified.get(token)
        now = time.time()
        leeway = self._settings.leeway_s
        if remembered is not None and remembered.not_before - leeway <= now <= remembered.expires + leeway:
            self._verified.move_to_end(token)
            return remembered.principal
        self._verified.pop(token, None)
        if not _COMPACT_JWT.fullmatch(token):
            raise InvalidToken(MALFORMED)
        claims = self._decode(token)
        _check_times(claims)
        principal = _principal(claims)
        self._verified[token] = _Verified(principal, float(claims.get("nbf", 0)), float(claims["exp"]))
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str) -> dict[str, Any]:
        options: dict[str, Any] = {"require": ["exp", "sub"], "verify_aud": bool(self._settings.audience)}
        try:
            claims = jwt.decode(
                token,
                self._keys.verify_key,
                algorithms=[self._keys.algorithm],
                audience=self._settings.audience or None,
                issuer=self._settings.issuer or None,
                leeway=self._settings.leeway_s,
                options=options,
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("signature verification failed") from None
        except jwt.DecodeError:
            # PyJWT's own words quote the decoder ("Invalid header string: 'utf-8' codec can't ...").
            raise InvalidToken(MALFORMED) from None
        except jwt.PyJWTError as error:
            raise InvalidToken(str(error) or type(error).__name__) from None
        return claims


def _check_times(claims: Mapping[str, Any]) -> None:
    """PyJWT takes any value `int()` reads ("123", 10**400): a time claim must be a JSON number, and a date."""
    for name in _TIME_CLAIMS:
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= MAX_NUMERIC_DATE:
            raise InvalidToken(f"'{name}' must be a number of seconds since 1970, before the year 10000")


def _principal(claims: Mapping[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        raise InvalidToken("'sub' must be a non-empty string")
    if len(sub) > MAX_SUBJECT_LENGTH or _UNSTORABLE.search(sub):
        raise InvalidToken(f"'sub' must be at most {MAX_SUBJECT_LENGTH} characters, without control characters")
    scope = claims.get("scope", "")
    if isinstance(scope, str):
        # Scopes are separated by spaces (RFC 6749), not by whatever else str.split() takes for one.
        scopes = frozenset(part for part in scope.split(" ") if part)
    elif isinstance(scope, list) and all(isinstance(item, str) for item in scope):
        scopes = frozenset(scope)
    else:
        raise InvalidToken("'scope' must be a space-separated string or a list of strings")
    models = claims.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(item, str) for item in models)):
        raise InvalidToken("'models' must be a list of model names")
    quota = None
    if claims.get("quota") is not None:
        try:
            quota = parse_claim(claims["quota"])
        except ValueError as error:
            raise InvalidToken(str(error)) from None
    return Principal(sub=sub, scopes=scopes, models=frozenset(models) if models is not None else None, quota=quota)


# Route annotations read by the auth middleware. A handler without one needs a
# valid token and no scope (the read-only routes).
Handler = Callable[..., Awaitable[Any]]
PUBLIC_ATTRIBUTE = "__imagine_public__"
SCOPE_ATTRIBUTE = "__imagine_scopes__"
SIGNED_URL_ATTRIBUTE = "__imagine_signed_url__"
BASIC_AUTH_ATTRIBUTE = "__imagine_basic_auth__"


def public(handler: Handler) -> Handler:
    """The route answers without a token."""
    setattr(handler, PUBLIC_ATTRIBUTE, True)
    return handler


def signed_url_allowed(handler: Handler) -> Handler:
    """A request without a token but with URL signature parameters reaches the route,
    which must verify the signature itself (see `imagine.security.url_signing`)."""
    setattr(handler, SIGNED_URL_ATTRIBUTE, True)
    return handler


def basic_auth_allowed(handler: Handler) -> Handler:
    """The route also takes HTTP Basic credentials whose password is the token (any user name),
    for clients that can send nothing else; the token is then verified like a bearer token."""
    setattr(handler, BASIC_AUTH_ATTRIBUTE, True)
    return handler


def basic_password(credentials: str) -> str | None:
    """The password of HTTP Basic `credentials` (base64 of "user:password"); None when they are malformed."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return password if colon else None


def requires(*any_of: str) -> Callable[[Handler], Handler]:
    """The route needs a token with at least one of these scopes."""
    unknown = set(any_of) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {sorted(unknown)}")

    def mark(handler: Handler) -> Handler:
        setattr(handler, SCOPE_ATTRIBUTE, frozenset(any_of))
        return handler

    return mark


def check_model_grant(principal: Principal, model: str) -> None:
    """The optional `models` claim limits which (resolved) models a token may use."""
    if not principal.may_use(model):
        raise ApiError(403, "FORBIDDEN", f"This token may not use model '{model}'")
