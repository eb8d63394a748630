"""Signed, expiring image links: a capability to fetch one gallery image without a token.

A link carries `expires` (unix seconds) and `signature`, an HMAC-SHA256 over
the image id and that expiry, so neither can be changed without the secret.
The secret comes from `gallery.url_secret_file` or the environment (shared by
every replica, as a shared gallery requires), else from a file in the state
folder created on first use (one replica's own).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from imagine.security.private_files import secret_in
from imagine.settings import SettingsError

SECRET_ENV = "IMAGINE_URL_SECRET"
# The variable's earlier name, still read so that links of deployments that set it keep verifying.
FORMER_SECRET_ENV = "IMAGINE_URL_SIGNING_SECRET"
SECRET_FILE = "url-signing-secret"
MIN_SECRET_BYTES = 32
EXPIRES_PARAM = "expires"
SIGNATURE_PARAM = "signature"
SIGNATURE_PARAMS = (EXPIRES_PARAM, SIGNATURE_PARAM)


class UrlSigner:
    def __init__(self, secret: bytes, ttl_s: int, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def _signature(self, image_id: str, expires: int) -> str:
        # The id's alphabet has no ":", so "id:expires" cannot be read two ways.
        digest = hmac.new(self._secret, f"{image_id}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def sign(self, image_id: str, now: float | None = None) -> dict[str, str]:
        """Query parameters that make a link to `image_id` valid for ttl_s seconds from `now`."""
        expires = int((self._clock() if now is None else now) + self.ttl_s)
        return {EXPIRES_PARAM: str(expires), SIGNATURE_PARAM: self._signature(image_id, expires)}

    def verify(self, image_id: str, query: Mapping[str, str]) -> bool:
        """True only for an untouched, unexpired signature of this very id."""
        expires, signature = query.get(EXPIRES_PARAM, ""), query.get(SIGNATURE_PARAM, "")
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12) or not signature.isascii():
            return False
        if int(expires) < self._clock():
            return False
        return hmac.compare_digest(self._signature(image_id, int(expires)), signature)


def load_url_secret(
    state_dir: Path, environ: Mapping[str, str] | None = None, *, secret_file: str = "", shared: bool = False
) -> bytes:
    """`secret_file`, else $IMAGINE_URL_SECRET, else (not `shared`) a random secret kept owner-only in the state folder.

    `shared`: replicas share one gallery, so a link one replica signs must
    verify on every other; a secret of each replica's own would not.
    """
    environ = os.environ if environ is None else environ
    if secret_file:
        try:
            secret, source = Path(secret_file).expanduser().read_bytes().strip(), "gallery.url_secret_file"
        except OSError as error:
            raise SettingsError(f"cannot read gallery.url_secret_file {secret_file}: {error.strerror}") from None
    elif environ.get(SECRET_ENV) or environ.get(FORMER_SECRET_ENV):
        source = SECRET_ENV if environ.get(SECRET_ENV) else FORMER_SECRET_ENV
        secret = environ[source].encode()
    elif shared:
        raise SettingsError(
            f"a shared gallery needs the URL-signing secret every replica shares: gallery.url_secret_file or {SECRET_ENV}"
        )
    else:
        return secret_in(state_dir / SECRET_FILE)
    if len(secret) < MIN_SECRET_BYTES:
        raise SettingsError(f"the URL-signing secret from {source} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret
