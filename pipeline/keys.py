"""The site's pseudonymisation key: where it comes from, what is accepted, and the demo key's limits.

**Sources**, first configured one wins (a configured key that is unusable is an error, never a
reason to fall through to the next source or to the demo key):

1. ``MEDTL_PSEUDONYM_KEY``: the key itself (an empty value counts as not set);
2. ``MEDTL_PSEUDONYM_KEY_FILE``: the path of a key file (must exist once the variable is set);
3. ``./.medtl/pseudonym.key`` (what ``medtl keygen`` writes);
4. ``~/.config/medtl/pseudonym.key``.

The key is text: surrounding whitespace (a file's final newline) is stripped, and the remaining
characters are the secret, byte for byte (the same key gives the same pseudonyms from every
source). A key file must be a non-empty regular file readable by its owner only (no group or other
permission bits: the error says ``chmod 600 <path>``).

**Strength rule.** Randomness cannot be proven from one string, so a key is accepted when it looks
like the output of a random generator by this simple estimate (documented here, quoted in errors):

* printable ASCII without whitespace inside; trailing ``=`` (base64 padding) is not counted;
* at least :data:`MIN_CHARS` (22) characters: base64 of 16 bytes;
* estimated entropy ``length x log2(alphabet)`` >= :data:`MIN_BITS` (128), where the alphabet is 16
  if every character is a hex digit, else the summed size of the character classes present
  (lowercase 26, uppercase 26, digits 10, other printable symbols 32);
* not patterned: at least 8 distinct characters; at most 1 in 5 of the 3-character windows of the
  first 64 characters repeats an earlier window; at most a quarter of the characters lie in runs of
  4+ characters that step by a constant code (``aaaa``, ``abcd``, ``9753``).

Accepted (no rejection in a seeded sample of 20,000 keys each, 200,000 for hex of 16 bytes):
``medtl keygen`` output (32 random bytes, base64url, 43 characters), hex of 16+ random bytes
(``openssl rand -hex 16``, ``secrets.token_hex(16)``), base64 of 24+ random bytes
(``openssl rand -base64 32``), ``secrets.token_urlsafe(32)``. Rejected: ``a``, hex of 15 bytes
(120 bits), ``aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa``, ``passwordpasswordpassword``, the public demo key.
The one borderline case: base64 of exactly 16 bytes (``secrets.token_urlsafe(16)``) that happens to
hold only letters (1.3 % of such keys) estimates 125 bits and is rejected; use 32 bytes.

**Nothing stored allows an offline guess cheaply.** Outputs that must tell whether they were made
with the same key store ``(salt, key_check(secret, salt))`` from :func:`new_salt` and
:func:`key_check`: a slow, memory-hard KDF (scrypt), never a plain HMAC of a constant.

**The demo key** (:data:`DEMO_KEY`, public) is only for files ``medtl synth`` wrote: synth's marker
(``medtl_synth.json``) lists the content id of every file it wrote, :func:`synthetic_files` reads
those ids, and the caller checks each file's content id against them (a file a user put into a
synthetic folder is not in the list). :func:`resolve_key` hands out the demo key only when asked to
(``demo_allowed``) and no key is configured. Someone who edits a marker by hand to list a real file
defeats this on purpose; the check is against mistakes, not against the site itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import shlex
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import MedtlError
from pipeline.paths import SYNTH_MARKER, SYNTH_MARKER_FILES

log = logging.getLogger(__name__)

#: Public, documented throw-away key: only for files ``medtl synth`` wrote (see :func:`synthetic_files`).
DEMO_KEY = b"medtl-demo-key--synthetic-data-only--not-a-secret"
ENV_KEY = "MEDTL_PSEUDONYM_KEY"
ENV_KEY_FILE = "MEDTL_PSEUDONYM_KEY_FILE"
LOCAL_KEY_FILE = Path(".medtl/pseudonym.key")
USER_KEY_FILE = Path("~/.config/medtl/pseudonym.key")

MIN_CHARS = 22  # base64 of 16 bytes, padding not counted
MIN_BITS = 128
MIN_DISTINCT = 8
KEY_FILE_MAX_BYTES = 4096  # anything larger is not a key file
NEW_KEY_BYTES = 32

#: scrypt parameters of :func:`key_check` (N = 2**15, r = 8, p = 1: 32 MiB of memory)
KDF_N, KDF_R, KDF_P, KDF_DKLEN = 2**15, 8, 1, 32
_KDF_MAXMEM = 64 * 1024 * 1024  # OpenSSL's default (32 MiB) is just below what N, r need
_KDF_CONTEXT = b"medtl-key-check\x00"

_SYMBOLS = string.punctuation  # the 32 printable ASCII symbols
_CLASSES = ((frozenset(string.ascii_lowercase), 26), (frozenset(string.ascii_uppercase), 26),
            (frozenset(string.digits), 10), (frozenset(_SYMBOLS), 32))
_HEX = frozenset(string.hexdigits)
_PRINTABLE = frozenset(string.ascii_letters + string.digits + _SYMBOLS)


class PseudonymKeyError(MedtlError):
    """The pseudonymisation key cannot be used; the message names its source, never the key."""


class KeyMissingError(PseudonymKeyError):
    """No key is configured (and the demo key is not allowed), or a configured key file is missing,
    empty or not a file."""


class WeakKeyError(PseudonymKeyError):
    """A configured key fails the strength rule (module docstring)."""


class KeyPermissionError(PseudonymKeyError):
    """A key file can be read (or written) by other users than its owner."""


class KeyExistsError(PseudonymKeyError, FileExistsError):
    """:func:`write_new_key` refuses to overwrite an existing key file."""


@dataclass(frozen=True)
class SiteKey:
    """A resolved key. ``repr`` never shows the secret."""

    secret: bytes = field(repr=False)
    source: str  # "$MEDTL_PSEUDONYM_KEY", a file path, or the demo key's description
    demo: bool = False  # the public demo key: only for files listed by synthetic_files()


def key_help() -> str:
    return (
        f"run `medtl keygen` (writes {LOCAL_KEY_FILE}, mode 600), or set {ENV_KEY} to a random key of "
        f"{MIN_CHARS}+ characters (e.g. `openssl rand -base64 32`), or {ENV_KEY_FILE} to a file holding one. "
        "Keep it out of git and back it up: every run on a dataset needs the same key, or patients get new "
        "pseudonyms."
    )


def _advice(source: str) -> str:
    fix = (f"set ${ENV_KEY} to a new one (`openssl rand -base64 32`) or unset it and run `medtl keygen`"
           if source == f"${ENV_KEY}" else "replace it with `medtl keygen` or `openssl rand -base64 32`")
    return (f"a key needs {MIN_CHARS}+ random characters, about {MIN_BITS} bits (rule in pipeline/keys.py): {fix} "
            "(a new key gives patients new pseudonyms)")


# --------------------------------------------------------------------------------------------------
# the strength rule


def estimate_bits(text: str) -> float:
    """The rule's entropy estimate: length x log2(alphabet), trailing ``=`` padding not counted."""
    body = text.rstrip("=")
    if not body:
        return 0.0
    chars = set(body)
    if chars <= _HEX:
        alphabet = 16
    else:
        alphabet = sum(size for members, size in _CLASSES if chars & members)
    return len(body) * math.log2(alphabet) if alphabet > 1 else 0.0


def weakness(text: str) -> str | None:
    """Why ``text`` fails the strength rule (module docstring), or None when it passes."""
    if not text:
        return "it is empty"
    if not set(text) <= _PRINTABLE:
        return "it has whitespace or characters other than printable ASCII"
    body = text.rstrip("=")
    if len(body) < MIN_CHARS:
        return f"length {len(body)}, {MIN_CHARS} characters needed"
    bits = estimate_bits(body)
    if bits < MIN_BITS:
        return f"estimated {bits:.0f} bits of randomness, {MIN_BITS} needed"
    distinct = len(set(body))
    if distinct < MIN_DISTINCT:
        return f"only {distinct} distinct character{'s' if distinct > 1 else ''}, {MIN_DISTINCT} needed"
    head = body[:64]
    windows = [head[i:i + 3] for i in range(len(head) - 2)]
    if (len(windows) - len(set(windows))) * 5 > len(windows):
        return "it repeats itself"
    codes = [ord(c) for c in body]
    in_runs: set[int] = set()
    for i in range(len(codes) - 3):
        step = codes[i + 1] - codes[i]
        if codes[i + 2] - codes[i + 1] == step and codes[i + 3] - codes[i + 2] == step:
            in_runs.update(range(i, i + 4))
    if len(in_runs) * 4 > len(body):
        return "it has runs like aaaa or abcd"
    if body.encode() == DEMO_KEY:
        return "it is the public demo key"
    return None


def validate_key(raw: bytes | str, source: str) -> bytes:
    """The secret from a key's text (surrounding whitespace stripped), checked by the strength rule.

    Raises:
        WeakKeyError: naming ``source`` and the reason, never the key.
    """
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")  # anything else fails the rule as non-printable
    text = raw.strip()
    reason = weakness(text)
    if reason is not None:
        raise WeakKeyError(f"{source}: the pseudonymisation key is too weak ({reason}); {_advice(source)}")
    return text.encode("ascii")


# --------------------------------------------------------------------------------------------------
# sources


def read_key_file(path: Path, source: str | None = None) -> bytes:
    """The validated secret in key file ``path`` (``source`` names it in errors; default the path).

    Raises:
        KeyMissingError: missing, a directory or not a regular file, empty, unreadable, too large.
        KeyPermissionError: group or other users have any permission on it (``chmod 600 <path>``).
        WeakKeyError: the content fails the strength rule.
    """
    path = Path(path)
    where = source or str(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyMissingError(f"{where}: key file does not exist; {key_help()}") from None
    except IsADirectoryError:
        raise KeyMissingError(f"{where}: is a directory, not a key file; {key_help()}") from None
    except OSError as exc:
        raise KeyMissingError(f"{where}: cannot read the key file ({exc.strerror or type(exc).__name__})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise KeyMissingError(f"{where}: is a directory, not a key file; {key_help()}")
        if not stat.S_ISREG(info.st_mode):
            raise KeyMissingError(f"{where}: is not a regular file; {key_help()}")
        if os.name == "posix" and info.st_mode & 0o077:
            raise KeyPermissionError(
                f"{where}: key file is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run `chmod 600 {shlex.quote(str(path))}`"
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(KEY_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise KeyMissingError(f"{where}: cannot read the key file ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > KEY_FILE_MAX_BYTES:
        raise KeyMissingError(f"{where}: larger than {KEY_FILE_MAX_BYTES} bytes, not a key file; {key_help()}")
    if not data.strip():
        raise KeyMissingError(f"{where}: key file is empty; {key_help()}")
    return validate_key(data, where)


def configured_key() -> SiteKey | None:
    """The configured key (sources in the module docstring), or None when no source is configured.

    Raises:
        PseudonymKeyError: the first configured source is unusable (weak, missing file, permissions).
    """
    value = os.environ.get(ENV_KEY)
    if value:
        return SiteKey(validate_key(value, f"${ENV_KEY}"), f"${ENV_KEY}")
    named = os.environ.get(ENV_KEY_FILE)
    if named:
        path = Path(named).expanduser()
        if not path.exists() and not path.is_symlink():
            raise KeyMissingError(f"{path} (from ${ENV_KEY_FILE}) does not exist; create it with "
                                  f"`medtl keygen --path {shlex.quote(str(path))}` or correct ${ENV_KEY_FILE}")
        return SiteKey(read_key_file(path, f"{path} (from ${ENV_KEY_FILE})"), str(path))
    for path in (LOCAL_KEY_FILE, USER_KEY_FILE.expanduser()):
        if path.exists() or path.is_symlink():
            return SiteKey(read_key_file(path), str(path))
    return None


def resolve_key(*, demo_allowed: bool) -> SiteKey:
    """The key to pseudonymise with: a configured key always wins.

    Args:
        demo_allowed: with no key configured, return the public :data:`DEMO_KEY` (``demo=True``, a
            warning is logged) instead of failing. Pass True only when the input holds files that
            ``medtl synth`` wrote (``bool(synthetic_files(input_dir))``), and then accept, file by
            file, only those whose content id is in :func:`synthetic_files`.

    Raises:
        KeyMissingError: no key configured and the demo key not allowed.
        PseudonymKeyError: a configured key is unusable (see :func:`configured_key`).
    """
    key = configured_key()
    if key is not None:
        return key
    if demo_allowed:
        log.warning("using the public demo pseudonymisation key: only files written by `medtl synth` are accepted")
        return SiteKey(DEMO_KEY, "demo key (synthetic files only)", demo=True)
    raise KeyMissingError(f"no pseudonymisation key configured for real data: {key_help()}")


def write_new_key(path: Path = LOCAL_KEY_FILE) -> Path:
    """Create key file ``path`` (mode 0600, parent folder 0700 if created): 32 random bytes, base64url
    without padding (43 characters) and a newline. Refuses to overwrite (KeyExistsError)."""
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        raise KeyExistsError(f"{path} already exists; remove it only if no data was pseudonymised with it")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    while True:
        text = base64.urlsafe_b64encode(secrets.token_bytes(NEW_KEY_BYTES)).decode().rstrip("=")
        if weakness(text) is None:  # a random key fails the rule with negligible probability: draw again
            break
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyExistsError(f"{path} already exists; remove it only if no data was pseudonymised with it") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


# --------------------------------------------------------------------------------------------------
# key check (instead of a fingerprint)


def new_salt() -> str:
    """A fresh random salt (16 bytes, hex) for :func:`key_check`."""
    return secrets.token_hex(16)


def key_check(secret: bytes, salt: str) -> str:
    """Tells whether two runs used the same key without allowing a cheap offline guess of the key.

    ``scrypt(secret, salt=b"medtl-key-check\\0" + salt, N=2**15, r=8, p=1, dklen=32)``, hex. One call
    takes about 75 ms and 32 MiB (measured on the 2-core development machine: 72-78 ms; N=2**14 took
    30-38 ms, N=2**16 166-171 ms), so each guess of a key costs an attacker the same. Store
    ``(salt, key_check(secret, salt))``; compare with :func:`key_matches`.
    """
    return hashlib.scrypt(secret, salt=_KDF_CONTEXT + salt.encode("utf-8"), n=KDF_N, r=KDF_R, p=KDF_P,
                          maxmem=_KDF_MAXMEM, dklen=KDF_DKLEN).hex()


def key_matches(secret: bytes, salt: str, check: str) -> bool:
    """Whether ``check`` is :func:`key_check` of ``secret`` and ``salt`` (constant-time comparison)."""
    if not isinstance(salt, str) or not isinstance(check, str):
        return False
    return hmac.compare_digest(key_check(secret, salt), check)


# --------------------------------------------------------------------------------------------------
# files medtl synth wrote


_CONTENT_ID = re.compile(r"[0-9a-f]{32}")


def _is_content_id(value: object) -> bool:
    return isinstance(value, str) and _CONTENT_ID.fullmatch(value) is not None


def synthetic_files(input_dir: Path) -> frozenset[str]:
    """Content ids (:func:`pipeline.io_utils.content_hash`) of the files ``medtl synth`` wrote, as
    listed by synth markers in ``input_dir`` or its parents up to two levels; empty when there is none.

    A marker that is unreadable, not synth's, or from before synth listed its files contributes
    nothing (with a warning): rerun ``medtl synth --out <dir>`` on it to list its files.
    """
    folder = Path(input_dir).resolve()
    ids: set[str] = set()
    for where in (folder, *folder.parents[:2]):
        marker = where / SYNTH_MARKER
        if not marker.is_file():
            continue
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            log.warning("%s: unreadable synth marker; its files get no demo key", marker)
            continue
        files = data.get(SYNTH_MARKER_FILES) if isinstance(data, dict) and data.get("synthetic") is True else None
        if not isinstance(files, dict):
            log.warning("%s: synth marker without a file list; rerun `medtl synth --out %s` to list its files",
                        marker, where)
            continue
        ids.update(v for v in files.values() if _is_content_id(v))
    return frozenset(ids)
