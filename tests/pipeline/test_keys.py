"""Keys: sources and precedence, the strength rule, key-file permissions, the key check, the demo key's limits."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
from pathlib import Path

import pytest

from pipeline import keys, synth
from pipeline.errors import MedtlError
from pipeline.io_utils import content_hash

_RNG = random.Random(14)  # seeded: the "random" keys below are the same on every run
HEX16 = _RNG.randbytes(16).hex()
HEX15 = _RNG.randbytes(15).hex()
B64_32 = base64.b64encode(_RNG.randbytes(32)).decode()  # what `openssl rand -base64 32` prints
URLSAFE_32 = base64.urlsafe_b64encode(_RNG.randbytes(32)).decode().rstrip("=")  # secrets.token_urlsafe(32)
WEAK = ["a", HEX15, "a" * 32, "passwordpasswordpassword", "0123456789abcdef0123456789abcdef",
        "abcdefghijklmnopqrstuvwxyz0123", "Password1Password1Password1", keys.DEMO_KEY.decode(), "é" * 40,
        "two words" + HEX16]


@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> Path:
    """No key configured: env unset, HOME and the working directory empty."""
    for var in (keys.ENV_KEY, keys.ENV_KEY_FILE):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------------------------------
# the strength rule


def test_strong_keys_pass_the_rule(clean_env):
    generated = keys.write_new_key(Path("k") / "new.key").read_text().strip()
    for text in (generated, HEX16, HEX16.upper(), B64_32, URLSAFE_32, _RNG.randbytes(64).hex()):
        assert keys.weakness(text) is None, text
        assert keys.validate_key(text + "\n", "test") == text.encode()
    assert keys.estimate_bits(HEX16) == 128.0 and keys.estimate_bits(HEX15) == 120.0
    # many keys from each generator a person would use: none rejected (seeded, so never flaky)
    rng = random.Random(1)
    for _ in range(2000):
        for text in (rng.randbytes(16).hex(), base64.b64encode(rng.randbytes(32)).decode(),
                     base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("=")):
            assert keys.weakness(text) is None, text


@pytest.mark.parametrize("text", WEAK)
def test_weak_keys_are_refused_from_the_environment_and_from_files(clean_env, monkeypatch, text):
    assert keys.weakness(text) is not None
    monkeypatch.setenv(keys.ENV_KEY, text)
    with pytest.raises(keys.WeakKeyError, match=r"\$MEDTL_PSEUDONYM_KEY: .*too weak.*medtl keygen") as err:
        keys.resolve_key(demo_allowed=True)  # a configured key that is weak never falls back to the demo key
    message = str(err.value)
    assert "\n" not in message and (len(text) < 4 or text.strip() not in message), "never quote the key"
    monkeypatch.delenv(keys.ENV_KEY)
    path = _key_file(clean_env / "site" / "weak.key", text + "\n")
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(path))
    with pytest.raises(keys.WeakKeyError, match=f"{re.escape(str(path))}.*too weak.*medtl keygen") as err:
        keys.resolve_key(demo_allowed=True)
    assert len(text) < 4 or text.strip() not in str(err.value)


def test_rule_messages_name_the_reason():
    assert "length 1, 22 characters needed" in keys.weakness("a")
    assert "estimated 120 bits" in keys.weakness(HEX15)
    assert "distinct" in keys.weakness("a" * 32)
    assert "repeats" in keys.weakness("0123456789abcdef0123456789abcdef")
    assert "runs" in keys.weakness("abcdefghijklmnopqrstuvwxyz0123")
    assert "demo key" in keys.weakness(keys.DEMO_KEY.decode())


# --------------------------------------------------------------------------------------------------
# key files


def test_a_key_file_open_to_others_is_refused_with_the_chmod_command(clean_env, monkeypatch):
    path = _key_file(clean_env / "site" / "pseudonym.key", HEX16 + "\n", 0o644)
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(path))
    with pytest.raises(keys.KeyPermissionError, match="mode 0644") as err:
        keys.resolve_key(demo_allowed=False)
    assert f"chmod 600 {path}" in str(err.value)
    assert isinstance(err.value, MedtlError) and HEX16 not in str(err.value)
    for mode in (0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(keys.KeyPermissionError, match="chmod 600"):
            keys.resolve_key(demo_allowed=False)
    path.chmod(0o600)
    assert keys.resolve_key(demo_allowed=False) == keys.SiteKey(HEX16.encode(), str(path))
    path.chmod(0o400)
    assert keys.resolve_key(demo_allowed=False).secret == HEX16.encode()
    # the local file is checked the same way
    monkeypatch.delenv(keys.ENV_KEY_FILE)
    local = _key_file(keys.LOCAL_KEY_FILE, HEX16, 0o664)
    with pytest.raises(keys.KeyPermissionError, match=f"chmod 600 {local}"):
        keys.resolve_key(demo_allowed=True)


def test_a_key_file_that_is_a_directory_empty_or_missing_is_refused(clean_env, monkeypatch):
    folder = clean_env / "site" / "folder.key"
    folder.mkdir(parents=True)
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(folder))
    with pytest.raises(keys.KeyMissingError, match="directory"):
        keys.resolve_key(demo_allowed=True)
    empty = _key_file(clean_env / "site" / "empty.key", "\n")
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(empty))
    with pytest.raises(keys.KeyMissingError, match="empty"):
        keys.resolve_key(demo_allowed=True)
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(clean_env / "absent.key"))
    with pytest.raises(keys.KeyMissingError, match=r"does not exist.*MEDTL_PSEUDONYM_KEY_FILE"):
        keys.resolve_key(demo_allowed=True)  # named explicitly: never falls through to other files
    big = _key_file(clean_env / "site" / "big.key", HEX16 * 200)
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(big))
    with pytest.raises(keys.KeyMissingError, match="not a key file"):
        keys.resolve_key(demo_allowed=True)
    monkeypatch.delenv(keys.ENV_KEY_FILE)
    keys.LOCAL_KEY_FILE.mkdir(parents=True)
    with pytest.raises(keys.KeyMissingError, match="directory"):
        keys.resolve_key(demo_allowed=True)


def test_write_new_key(clean_env):
    path = keys.write_new_key()
    assert path == keys.LOCAL_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert text.endswith("\n") and len(text.strip()) == 43
    assert len(base64.urlsafe_b64decode(text.strip() + "=")) == 32
    with pytest.raises(keys.KeyExistsError, match="already exists"):
        keys.write_new_key(path)
    with pytest.raises(FileExistsError):
        keys.write_new_key(path)
    assert path.read_text() == text, "never overwritten"
    assert keys.write_new_key(Path("other.key")).read_text() != text
    assert keys.resolve_key(demo_allowed=False) == keys.SiteKey(text.strip().encode(), str(keys.LOCAL_KEY_FILE))


# --------------------------------------------------------------------------------------------------
# precedence and the demo key


def test_precedence_env_then_env_file_then_local_then_user(clean_env, monkeypatch):
    keys_ = {name: base64.urlsafe_b64encode(random.Random(name).randbytes(32)).decode().rstrip("=")
             for name in ("env", "file", "local", "user")}
    user = _key_file(Path(os.environ["HOME"]) / ".config" / "medtl" / "pseudonym.key", keys_["user"] + "\n")
    assert keys.resolve_key(demo_allowed=True) == keys.SiteKey(keys_["user"].encode(), str(user))
    _key_file(keys.LOCAL_KEY_FILE, keys_["local"] + "\n")
    assert keys.resolve_key(demo_allowed=True) == keys.SiteKey(keys_["local"].encode(), str(keys.LOCAL_KEY_FILE))
    named = _key_file(clean_env / "site" / "named.key", keys_["file"])
    monkeypatch.setenv(keys.ENV_KEY_FILE, str(named))
    assert keys.resolve_key(demo_allowed=True) == keys.SiteKey(keys_["file"].encode(), str(named))
    monkeypatch.setenv(keys.ENV_KEY, f"  {keys_['env']}\n")
    assert keys.resolve_key(demo_allowed=False) == keys.SiteKey(keys_["env"].encode(), "$MEDTL_PSEUDONYM_KEY")
    monkeypatch.setenv(keys.ENV_KEY, "")  # empty: not set
    assert keys.resolve_key(demo_allowed=False).source == str(named)


def test_demo_key_only_when_allowed_and_nothing_is_configured(clean_env, monkeypatch, caplog):
    with pytest.raises(keys.KeyMissingError, match="medtl keygen") as err:
        keys.resolve_key(demo_allowed=False)
    assert "\n" not in str(err.value) and isinstance(err.value, MedtlError)
    with caplog.at_level(logging.WARNING, logger="pipeline.keys"):
        demo = keys.resolve_key(demo_allowed=True)
    assert demo.demo and demo.secret == keys.DEMO_KEY and "demo" in caplog.text
    monkeypatch.setenv(keys.ENV_KEY, HEX16)
    configured = keys.resolve_key(demo_allowed=True)
    assert configured == keys.SiteKey(HEX16.encode(), "$MEDTL_PSEUDONYM_KEY", demo=False)
    assert HEX16 not in repr(configured) and HEX16 not in str(configured), "repr never shows the secret"


# --------------------------------------------------------------------------------------------------
# key check


def test_key_check_is_scrypt_stable_per_key_and_salt():
    salt, other_salt = keys.new_salt(), keys.new_salt()
    assert salt != other_salt and len(salt) == 32 and int(salt, 16) >= 0
    a, b = HEX16.encode(), B64_32.encode()
    check = keys.key_check(a, salt)
    assert check == keys.key_check(a, salt)
    assert check != keys.key_check(b, salt) and check != keys.key_check(a, other_salt)
    assert (keys.KDF_N, keys.KDF_R, keys.KDF_P, keys.KDF_DKLEN) == (2**15, 8, 1, 32)
    expected = hashlib.scrypt(a, salt=b"medtl-key-check\x00" + salt.encode(), n=2**15, r=8, p=1,
                              maxmem=64 * 1024 * 1024, dklen=32).hex()
    assert check == expected
    assert keys.key_matches(a, salt, check) and not keys.key_matches(b, salt, check)
    assert not keys.key_matches(a, other_salt, check) and not keys.key_matches(a, salt, None)


# --------------------------------------------------------------------------------------------------
# files medtl synth wrote


def test_synthetic_files_lists_what_synth_wrote_and_nothing_copied_in(tmp_path, caplog):
    root = tmp_path / "cohort"
    synth.run(synth.SynthParams(patients=3, seed=1), root)
    written = {p: content_hash(p.read_bytes()) for p in root.rglob("*") if p.is_file() and p.name != synth.MARKER_NAME}
    ids = keys.synthetic_files(root)
    assert ids == frozenset(written.values())
    # from inside the tree too (the marker is up to two levels above)
    assert keys.synthetic_files(root / synth.DICOM_DIR) == ids
    site = next((root / synth.DICOM_DIR).iterdir())
    assert keys.synthetic_files(site) == ids
    assert keys.synthetic_files(next(site.iterdir())) == frozenset()  # three levels down: no marker
    # a user copies real files in afterwards: not listed, even next to synth's files or after a rerun
    patient = next(site.iterdir())
    (patient / "real.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"a real patient")
    changed = next(p for p in written if p.parent.parent.parent.parent == site)
    changed.write_bytes(changed.read_bytes()[:-2] + b"\x01\x02")
    synth.run(synth.SynthParams(patients=3, seed=1), root)
    ids = keys.synthetic_files(root)
    assert content_hash((patient / "real.dcm").read_bytes()) not in ids
    assert content_hash(changed.read_bytes()) not in ids
    # no marker, a marker without a list, an unreadable one: nothing
    assert keys.synthetic_files(tmp_path / "elsewhere") == frozenset()
    old = tmp_path / "old"
    shutil.copytree(root, old)
    marker = json.loads((old / synth.MARKER_NAME).read_text())
    del marker[synth.MARKER_FILES]
    (old / synth.MARKER_NAME).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING, logger="pipeline.keys"):
        assert keys.synthetic_files(old) == frozenset()
    assert "medtl synth --out" in caplog.text
    (old / synth.MARKER_NAME).write_text("{not json")
    assert keys.synthetic_files(old) == frozenset()
    (old / synth.MARKER_NAME).write_text(json.dumps({"synthetic": False, synth.MARKER_FILES: {"x": "0" * 32}}))
    assert keys.synthetic_files(old) == frozenset()
