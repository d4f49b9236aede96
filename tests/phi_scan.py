"""PHI scanner for stage outputs, and structure checks for de-identified DICOM files.

:func:`scan_outputs` looks for planted identifiers (and input paths) in everything a stage leaves
under its output directory: the raw bytes of every file, the same bytes decoded as text, the values
of every element of every DICOM file (decoded by pydicom with the file's character set), every cell
of every parquet table, every path name under the directory, and a log text. Each planted string is
looked for in many forms (see :func:`variants`): as given and in upper/lower/title case, names with
``^``/``=`` as spaces or commas and by component, accents folded, JSON- and URL-escaped, and encoded
as UTF-8, Latin-1, ISO 2022 JP (the escape sequences DICOM's ``ISO 2022 IR 87`` writes), Shift-JIS,
EUC-JP, GB18030, UTF-16.

:func:`dicom_problems` checks one de-identified file against the allow-list rules (preamble, file
meta, no trailing data, no private/unknown/retired tag at any depth, only listed attributes), and
:func:`walk_elements` walks the raw element layout of a little-endian DICOM byte string (used for
"no bytes after the dataset" and by the hostile-corpus mutations).

Used by tests/pipeline/test_hostile*.py; meant to be reused by any test that must prove "no PHI".
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import struct
import sys
import tempfile
import unicodedata
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: encodings a planted non-ASCII string is looked for in (raw bytes)
ENCODINGS = ("utf-8", "latin-1", "cp1252", "iso2022_jp", "shift_jis", "euc_jp", "gb18030", "utf-16-le", "iso8859_5",
             "iso8859_7")
#: a planted string shorter than this (after stripping) is not looked for (too many chance hits)
MIN_CHARS = 4
#: non-ASCII (CJK) name components as short as this are looked for (山田 is two characters)
MIN_CHARS_NON_ASCII = 2
_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# variants of a planted string


def _is_ascii(text: str) -> bool:
    return all(ord(c) < 128 for c in text)


def _long_enough(text: str) -> bool:
    text = text.strip()
    return len(text) >= (MIN_CHARS if _is_ascii(text) else MIN_CHARS_NON_ASCII)


def _fold(text: str) -> str:
    """Accents removed (MÜLLER -> MULLER), for a de-identifier that transliterates."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def text_variants(value: str) -> set[str]:
    """The textual forms a planted string may take in an output (case is handled by the search)."""
    value = value.strip()
    forms = {value}
    if "^" in value or "=" in value:
        forms.add(value.replace("^", " ").replace("=", " "))
        forms.add(value.replace("^", ", "))
        for group in value.split("="):  # PN: alphabetic=ideographic=phonetic
            forms.add(group)
            forms.add(group.replace("^", " "))
            forms.update(re.split(r"\^", group))
    folded = {_fold(f) for f in forms if not _is_ascii(f)}
    forms |= {f for f in folded if f and _long_enough(f)}
    return {f.strip() for f in forms if f.strip() and _long_enough(f)}


def variants(value: str) -> dict[bytes, str]:
    """Byte needles for ``value`` (each text variant in several cases, encodings and escapes), each
    with the text form it encodes (for the report)."""
    needles: dict[bytes, str] = {}
    for form in sorted(text_variants(value)):
        cased = {form, form.upper(), form.lower(), form.title()}
        for text in sorted(cased):
            escaped = {text, json.dumps(text)[1:-1]}
            if not _is_ascii(text):
                escaped.add(urllib.parse.quote(text))
            for candidate in sorted(escaped):
                for encoding in ENCODINGS if not _is_ascii(candidate) else ("ascii", "utf-16-le"):
                    with contextlib.suppress(UnicodeError, LookupError):
                        needle = candidate.encode(encoding)
                        if len(needle) >= 4:
                            needles.setdefault(needle, form)
    return needles


def _report(value: str, form: str) -> str:
    return value if form.casefold() == value.casefold() else f"{value} (as {form!r})"


_LEVELS = (8, 4, 2)  # window lengths of the keys: a needle is keyed by the longest that fits it
_PRIME = np.uint64(1099511628211)


def _keys(units: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every ``n``-unit window (bytes or code points) of ``units``, in order."""
    if len(units) < n:
        return np.empty(0, dtype=np.uint64)
    units = units.astype(np.uint64)
    width = len(units) - n + 1
    key = np.zeros(width, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            key = key * _PRIME + units[i:i + width] + np.uint64(1)
    return key


def _byte_units(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.uint8)


def _text_units(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class _Index:
    """Needles by a hash of their last 8 (or 4, or 2) units: a blob is searched only for the needles
    whose key occurs among its windows (a few vectorised passes instead of one search per needle)."""

    def __init__(self, units) -> None:
        self.units = units
        self.by_key: dict[int, dict[int, list[tuple[str, object, str]]]] = {n: {} for n in _LEVELS}

    def add(self, value: str, needle, form: str) -> None:
        n = next((n for n in _LEVELS if len(needle) >= n), None)
        if n is not None:
            key = int(_keys(self.units(needle[-n:]), n)[0])
            self.by_key[n].setdefault(key, []).append((value, needle, form))

    def freeze(self) -> None:
        self.keys = {n: np.array(sorted(keys), dtype=np.uint64) for n, keys in self.by_key.items() if keys}

    def search(self, haystack, found: dict[str, str]) -> None:
        units = self.units(haystack)
        for n, keys in self.keys.items():
            windows = _keys(units, n)
            if not len(windows):
                continue
            at = np.minimum(np.searchsorted(keys, windows), len(keys) - 1)
            present = np.unique(windows[keys[at] == windows])
            for key in present.tolist():
                for value, needle, form in self.by_key[n][key]:
                    if value not in found and needle in haystack:
                        found[value] = form


@dataclass
class Needles:
    """Precomputed needles for a set of planted strings (built once, searched in many blobs).

    A hit is reported as the planted string, with the variant that matched when it is not the
    string itself: ``"Yamada^Tarou=山田^太郎=やまだ^たろう (as '山田')"``. All-digit strings (dates,
    numeric IDs) match only as whole numbers, not inside a longer digit run such as a UID.
    """

    phi: set[str]
    digits: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, phi: Iterable[str]) -> Needles:
        phi = {p.strip() for p in phi if p and _long_enough(p)}
        needles = cls(phi=phi)
        needles._folded = _Index(_byte_units)  # ASCII needles, lower-cased: searched in the lower-cased blob
        needles._exact = _Index(_byte_units)  # the other encodings, as they are
        needles._text = _Index(_text_units)  # casefolded text forms, in casefolded text
        for value in sorted(phi):
            if value.isdigit():
                needles.digits.add(value)
                continue
            for needle, form in variants(value).items():
                if needle.isascii():
                    needles._folded.add(value, needle.lower(), form)
                else:
                    needles._exact.add(value, needle, form)
            forms = text_variants(value)
            table = {f.casefold(): f for f in forms}
            table.update({_fold(f).casefold(): f for f in forms if _fold(f) and _long_enough(_fold(f))})
            for folded, form in table.items():
                needles._text.add(value, folded, form)
        for index in (needles._folded, needles._exact, needles._text):
            index.freeze()
        return needles

    def in_bytes(self, blob: bytes) -> set[str]:
        found: dict[str, str] = {}
        self._folded.search(blob.lower(), found)  # ASCII case folding only; other cases are separate needles
        self._exact.search(blob, found)
        hits = {_report(value, form) for value, form in found.items()}
        for value in self.digits:
            if value.encode() in blob and re.search(rb"(?<![0-9])" + re.escape(value.encode()) + rb"(?![0-9])", blob):
                hits.add(value)
        return hits

    def in_text(self, text: str) -> set[str]:
        found: dict[str, str] = {}
        self._text.search(text.casefold(), found)
        hits = {_report(value, form) for value, form in found.items()}
        for value in self.digits:
            if value in text and re.search(r"(?<![0-9])" + re.escape(value) + r"(?![0-9])", text):
                hits.add(value)
        return hits


# --------------------------------------------------------------------------------------------------
# input paths


def path_needles(input_paths: Iterable[str | bytes | os.PathLike], root: Path | None = None) -> set[str]:
    """Strings of the input tree that must not show in outputs: each relative path, its absolute form
    below ``root``, and each path component a user might have named after a patient (6+ characters
    and not a plain lower-case word: ``MUSTERMANN_MAX_8842137``, ``phi_everywhere.dcm``, ``山田_太郎.dcm``;
    not ``links`` or ``special``, which may well be words of a reason)."""
    out: set[str] = set()
    for path in input_paths:
        rel = os.fsdecode(path) if isinstance(path, bytes) else str(path)
        rel = rel.replace(os.sep, "/")
        out.add(rel)
        if root is not None:
            out.add(str(Path(root) / rel))
        for part in rel.split("/"):
            if len(part) >= 6 and not (part.isalpha() and part.islower() and _is_ascii(part)):
                out.add(part)
            stem = part.rsplit(".", 1)[0]
            if len(stem) >= 6 and not (stem.isalpha() and stem.islower() and _is_ascii(stem)) and "." in part:
                out.add(stem)
    return out


def _path_bytes(value: str) -> set[bytes]:
    forms = {value, json.dumps(value)[1:-1], urllib.parse.quote(value, safe="/", errors="surrogateescape")}
    out = set()
    for form in forms:
        with contextlib.suppress(UnicodeError):
            out.add(os.fsencode(form))
        with contextlib.suppress(UnicodeError):
            out.add(form.encode("utf-8", "backslashreplace"))
    return out


# --------------------------------------------------------------------------------------------------
# the scan


def _dicom_values(blob: bytes) -> str:
    """Every element value of a DICOM byte string as text (pydicom decodes with the file's charset)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(blob), force=True)
    except Exception:  # noqa: BLE001 - not parseable: the raw-byte scan still covers it
        return ""
    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = [ds, getattr(ds, "file_meta", None) or pydicom.Dataset()]
        for d in datasets:
            try:
                for elem in d.iterall():
                    try:
                        value = elem.value
                    except Exception:  # noqa: BLE001
                        continue
                    if isinstance(value, bytes):
                        parts.append(value.decode("latin-1"))
                        parts.append(value.decode("utf-8", "ignore"))
                    elif elem.VR != "SQ":
                        parts.append(str(value))
            except Exception:  # noqa: BLE001 - a broken element stops the walk; keep what was read
                continue
    return "\n".join(parts)


def _parquet_text(path: Path) -> str:
    import pandas as pd

    frame = pd.read_parquet(path)
    parts = [" ".join(map(str, frame.columns))]
    for column in frame.columns:
        for cell in frame[column]:
            if isinstance(cell, (list, tuple)) or hasattr(cell, "tolist"):
                try:
                    parts.extend(str(v) for v in list(cell))
                except TypeError:
                    parts.append(str(cell))
            else:
                parts.append(str(cell))
    return "\n".join(parts)


def scan_blob(blob: bytes, needles: Needles, paths: set[str] = frozenset(), *, name: str = "") -> set[str]:
    """Planted strings (and ``path:<p>`` for input paths) found in one file's bytes and its text forms."""
    # raw bytes: every needle encoding (UTF-8, Latin-1, ISO 2022 JP, ... in several cases) covers the
    # text of the file in those encodings; DICOM values are also decoded by pydicom with the file's own
    # character set and searched as text (casefolded), which catches an encoding the list lacks
    found = needles.in_bytes(blob)
    texts = []
    if name.endswith(".dcm") or blob[128:132] == b"DICM":
        texts.append(_dicom_values(blob))
    for text in texts:
        found |= needles.in_text(text)
    for path in paths:
        if any(p in blob for p in _path_bytes(path)) or any(path in t for t in texts):
            found.add(f"path:{path}")
    return found


LARGE_FILE = 64 * 1024 * 1024  # larger files are scanned in chunks, raw bytes only
_CHUNK, _OVERLAP = 16 * 1024 * 1024, 4096


def _scan_large(path: Path, needles: Needles, paths: set[str]) -> set[str]:
    found: set[str] = set()
    tail = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            blob = tail + chunk
            if blob.strip(b"\x00"):  # a sparse file's holes read as zeros: nothing to find there
                found |= needles.in_bytes(blob)
                found |= {f"path:{p}" for p in paths if any(n in blob for n in _path_bytes(p))}
            tail = chunk[-_OVERLAP:]
    return found


def scan_outputs(out_dir: Path, phi: Iterable[str], *, input_paths: Iterable[str | bytes] = (),
                 input_root: Path | None = None, log_text: str = "", extra_files: Iterable[Path] = ()
                 ) -> dict[str, list[str]]:
    """Where planted identifiers or input paths show up under ``out_dir`` and in ``log_text``.

    Args:
        out_dir: a stage output directory: every file below it is read (symlinks are not followed;
            a link found there is itself reported as ``link:<name>``).
        phi: the planted identifier strings.
        input_paths: relative paths of the input tree (str, or bytes for names that are not UTF-8);
            they, their absolute forms below ``input_root`` and their distinctive components must
            not appear in any output or in the log. The input root itself may appear in the log.
        input_root: the input directory the user passed.
        log_text: everything logged/printed/warned during the run.
        extra_files: more files to scan the same way (e.g. a file the test wrote elsewhere).

    Returns:
        ``{location: sorted found strings}``, empty when clean. Locations are ``file:<relpath>``,
        ``parquet:<relpath>``, ``name:<relpath>`` (a path name under ``out_dir``) and ``log``.
    """
    needles = Needles.of(phi)
    paths = path_needles(input_paths, input_root)
    leaks: dict[str, list[str]] = {}

    def note(location: str, found: set[str]) -> None:
        if found:
            leaks[location] = sorted(found)

    out_dir = Path(out_dir)
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(out_dir):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(out_dir).as_posix()
            note(f"name:{rel}", needles.in_text(rel) | needles.in_bytes(os.fsencode(rel))
                 | {f"path:{p}" for p in paths if p in rel})
            if full.is_symlink():
                leaks.setdefault(f"link:{rel}", []).append("a symlink in the outputs")
            elif name in filenames and full.is_file():
                files.append((rel, full))
    files.extend((str(p), Path(p)) for p in extra_files)
    for rel, full in sorted(files):
        if full.stat().st_size > LARGE_FILE:
            note(f"file:{rel}", _scan_large(full, needles, paths))
            continue
        blob = full.read_bytes()
        note(f"file:{rel}", scan_blob(blob, needles, paths, name=rel))
        if rel.endswith(".parquet"):
            note(f"parquet:{rel}", needles.in_text(_parquet_text(full))
                 | {f"path:{p}" for p in paths if p in _parquet_text(full)})
    if log_text:
        text = log_text
        if input_root is not None:
            text = text.replace(str(input_root), "<input root>")
        note("log", needles.in_text(text) | needles.in_bytes(text.encode("utf-8", "backslashreplace"))
             | {f"path:{p}" for p in paths if p in text})
    return leaks


def locate(path: Path, phi: Iterable[str]) -> list[str]:
    """The elements of a DICOM file whose bytes hold planted strings: ``Keyword VR depth: found``."""
    from pydicom.datadict import keyword_for_tag

    data = Path(path).read_bytes()
    needles = Needles.of(phi)
    try:
        elements, end = walk_elements(data)
    except ValueError as exc:
        return [f"(raw layout: {exc})"]
    out = []
    for e in elements:
        if e.tag >> 16 == 0xFFFE or e.vr == "SQ" or (e.length == _UNDEFINED and e.tag != 0x7FE00010):
            continue  # items and sequences: their elements are listed themselves
        found = needles.in_bytes(data[e.value_start:e.end])
        if found:
            name = keyword_for_tag(e.tag) or f"({e.tag >> 16:04X},{e.tag & 0xFFFF:04X})"
            out.append(f"{name} {e.vr or '--'} depth {e.depth}: {sorted(found)[:3]}")
    if data[:128].strip(b"\x00") and needles.in_bytes(data[:128]):
        out.append("preamble")
    if end < len(data) and needles.in_bytes(data[end:]):
        out.append("after the dataset")
    return out


def locate_leaks(out_dir: Path, leaks: dict[str, list[str]], phi: Iterable[str]) -> dict[str, list[str]]:
    """For the DICOM files among ``leaks`` (a :func:`scan_outputs` result), where in them (see :func:`locate`)."""
    phi = set(phi)
    return {loc: locate(Path(out_dir) / loc[len("file:"):], phi) for loc in leaks
            if loc.startswith("file:") and loc.endswith(".dcm")}


def scan_text(text: str, phi: Iterable[str], *, input_paths: Iterable[str | bytes] = (),
              input_root: Path | None = None) -> list[str]:
    """Planted strings and ``path:<p>`` input paths found in one text (a log, a reason column)."""
    needles = Needles.of(phi)
    if input_root is not None:
        text = text.replace(str(input_root), "<input root>")
    paths = path_needles(input_paths, input_root)
    return sorted(needles.in_text(text) | needles.in_bytes(text.encode("utf-8", "backslashreplace"))
                  | {f"path:{p}" for p in paths if p in text})


def find_phi(blob: bytes | str, phi: Iterable[str]) -> list[str]:
    """Planted strings found in one blob or text (a drop-in for test_ingest's ``_find_phi``)."""
    needles = Needles.of(phi)
    if isinstance(blob, str):
        return sorted(needles.in_text(blob) | needles.in_bytes(blob.encode("utf-8", "backslashreplace")))
    return sorted(scan_blob(blob, needles))


# --------------------------------------------------------------------------------------------------
# capturing everything a run says


class LogCapture:
    """Collects log records (all loggers, DEBUG up, also from forked worker processes), Python
    warnings, and what is written to stdout/stderr (Python objects and file descriptors 1 and 2)."""

    def __init__(self) -> None:
        self.text = ""

    @contextlib.contextmanager
    def __call__(self) -> Iterator[LogCapture]:
        with tempfile.TemporaryDirectory(prefix="medtl-logcap-") as tmp:
            log_path, fd_path = Path(tmp) / "log.txt", Path(tmp) / "fd.txt"
            handler = logging.FileHandler(log_path, encoding="utf-8", errors="backslashreplace")
            handler.setLevel(logging.DEBUG)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root = logging.getLogger()
            old_level = root.level
            root.addHandler(handler)
            root.setLevel(logging.DEBUG)
            old_capture = logging.captureWarnings
            sys.stdout.flush()
            sys.stderr.flush()
            saved = {fd: os.dup(fd) for fd in (1, 2)}
            fd_file = open(fd_path, "wb")  # noqa: SIM115 - closed below
            for fd in (1, 2):
                os.dup2(fd_file.fileno(), fd)
            out, err = io.StringIO(), io.StringIO()
            old_out, old_err = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = out, err
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    yield self
            finally:
                sys.stdout, sys.stderr = old_out, old_err
                for fd, dup in saved.items():
                    os.dup2(dup, fd)
                    os.close(dup)
                fd_file.close()
                root.removeHandler(handler)
                handler.close()
                root.setLevel(old_level)
                del old_capture
                parts = [log_path.read_text("utf-8", "backslashreplace"), out.getvalue(), err.getvalue(),
                         fd_path.read_bytes().decode("utf-8", "backslashreplace")]
                parts += [f"{w.category.__name__}: {w.message} ({Path(w.filename).name})" for w in caught]
                self.text = "\n".join(parts)


def capture_logs():
    """``with capture_logs() as cap: ...; cap.text``: see :class:`LogCapture`."""
    return LogCapture()()


# --------------------------------------------------------------------------------------------------
# raw DICOM layout


@dataclass(frozen=True)
class RawElement:
    tag: int  # (group << 16) | element
    vr: str  # "" where the encoding has none (implicit VR, items and delimiters)
    start: int  # offset of the tag
    value_start: int
    length: int  # value length as stored (0xFFFFFFFF: undefined)
    end: int  # offset just past the element (past its delimiter for undefined lengths)
    depth: int = 0


def _u16(data: bytes, pos: int) -> int:
    return struct.unpack_from("<H", data, pos)[0]


def _u32(data: bytes, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _implicit_is_sq(tag: int) -> bool:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _walk(data: bytes, pos: int, stop: int, explicit: bool, depth: int, out: list[RawElement],
          until_delimiter: int | None = None) -> int:
    """Parse elements from ``pos`` to ``stop`` (or to the delimiter tag); returns the end offset."""
    while pos < stop:
        if pos + 8 > len(data):
            raise ValueError(f"element header cut short at offset {pos}")
        tag = (_u16(data, pos) << 16) | _u16(data, pos + 2)
        if tag >> 16 == 0xFFFE:  # item, item delimiter, sequence delimiter: no VR
            length = _u32(data, pos + 4)
            if tag == until_delimiter:
                out.append(RawElement(tag, "", pos, pos + 8, length, pos + 8, depth))
                return pos + 8
            if tag == 0xFFFEE000:
                if length == _UNDEFINED:
                    end = _walk(data, pos + 8, len(data), explicit, depth + 1, out, until_delimiter=0xFFFEE00D)
                else:
                    end = pos + 8 + length
                    if end > len(data):
                        raise ValueError(f"item at offset {pos} runs past the end")
                    _walk(data, pos + 8, end, explicit, depth + 1, out)
                out.append(RawElement(tag, "", pos, pos + 8, length, end, depth))
                pos = end
                continue
            raise ValueError(f"unexpected delimiter {tag:08X} at offset {pos}")
        vr = data[pos + 4:pos + 6] if explicit or tag >> 16 == 0x0002 else b""
        if vr and not re.fullmatch(rb"[A-Z]{2}", vr):
            raise ValueError(f"no VR at offset {pos}")
        if vr in _LONG_VRS:
            length, value_start = _u32(data, pos + 8), pos + 12
        elif vr:
            length, value_start = _u16(data, pos + 6), pos + 8
        else:
            length, value_start = _u32(data, pos + 4), pos + 8
        name = vr.decode() if vr else ""
        if length == _UNDEFINED:
            if tag == 0x7FE00010 or vr in {b"OB", b"OW"}:  # encapsulated pixel data: fragments
                end = value_start
                while True:
                    item = (_u16(data, end) << 16) | _u16(data, end + 2)
                    item_length = _u32(data, end + 4)
                    if item == 0xFFFEE0DD:
                        end += 8
                        break
                    if item != 0xFFFEE000 or end + 8 + item_length > len(data):
                        raise ValueError(f"bad fragment at offset {end}")
                    end += 8 + item_length
            elif vr in {b"SQ", b"UN", b""}:  # a sequence (UN: implicit VR inside)
                inner_explicit = explicit and vr != b"UN"
                end = _walk(data, value_start, len(data), inner_explicit, depth + 1, out, until_delimiter=0xFFFEE0DD)
            else:
                raise ValueError(f"undefined length for VR {name} at offset {pos}")
        else:
            end = value_start + length
            if end > len(data):
                raise ValueError(f"element {tag:08X} at offset {pos} runs past the end ({end} > {len(data)})")
            if vr == b"SQ" or (not vr and _implicit_is_sq(tag) and length):
                _walk(data, value_start, end, explicit, depth + 1, out)
        out.append(RawElement(tag, name, pos, value_start, length, end, depth))
        pos = end
    if until_delimiter is not None:
        raise ValueError("missing delimiter")
    return pos


def walk_elements(data: bytes) -> tuple[list[RawElement], int]:
    """The raw elements of a little-endian DICOM byte string (with or without preamble/meta), and
    the offset where parsing ended (== len(data) for a file with nothing after its dataset).

    Raises ValueError where the bytes are not a well-formed element stream. Deflated and big-endian
    transfer syntaxes are not handled (ValueError).
    """
    out: list[RawElement] = []
    pos = 0
    explicit = True
    if data[128:132] == b"DICM":
        pos = 132
        # group 2: explicit VR little endian, up to the first other group
        while pos + 8 <= len(data) and _u16(data, pos) == 0x0002:
            try:
                pos = _walk(data, pos, pos + 1, True, 0, out)  # one element at a time
            except (struct.error, IndexError) as exc:
                raise ValueError(f"file meta cut short ({exc})") from None
        ts = next((data[e.value_start:e.value_start + e.length].rstrip(b"\x00 ").decode("ascii", "replace")
                   for e in out if e.tag == 0x00020010), "")
        if ts in {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}:
            raise ValueError(f"transfer syntax {ts} is not walked")
        explicit = ts != "1.2.840.10008.1.2"
    else:
        explicit = bool(re.fullmatch(rb"[A-Z]{2}", data[4:6]))
    try:
        end = _walk(data, pos, len(data), explicit, 0, out)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"cut short ({exc})") from None
    return out, end


# --------------------------------------------------------------------------------------------------
# de-identified file rules


#: group 2 elements a de-identified file may carry (PS3.10 required ones; the version name is harmless)
META_ALLOWED = frozenset({
    "FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID", "TransferSyntaxUID", "ImplementationClassUID", "ImplementationVersionName",
})
#: what the de-identifier itself adds (PS3.15 E.1.1)
DEID_ADDED = frozenset({
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence", "CodeValue",
    "CodingSchemeDesignator", "CodeMeaning", "CodingSchemeVersion", "LongitudinalTemporalInformationModified",
})


def _known(tag: int) -> bool:
    from pydicom.datadict import get_entry

    try:
        get_entry(tag)
        return True
    except KeyError:
        return False


def dicom_problems(path: Path, keep: Iterable[str] | None = None) -> list[str]:
    """What is wrong with one de-identified output file (empty list: nothing).

    Checks: a 128-byte all-zero preamble and ``DICM``; file meta only :data:`META_ALLOWED`; no
    DataSetTrailingPadding and no byte after the dataset; no private, unknown or retired tag at any
    depth; with ``keep`` (keywords of the keep-list), no element whose keyword is not on it (nor
    one of :data:`DEID_ADDED`); PatientIdentityRemoved YES and a de-identification method.
    """
    import pydicom
    from pydicom.datadict import dictionary_is_retired, keyword_for_tag

    data = Path(path).read_bytes()
    problems = []
    if data[:128] != b"\x00" * 128:
        problems.append("preamble is not all zero")
    if data[128:132] != b"DICM":
        problems.append("no DICM prefix")
    try:
        elements, end = walk_elements(data)
        if end != len(data):
            problems.append(f"{len(data) - end} bytes after the dataset")
        if any(e.tag == 0xFFFCFFFC for e in elements):
            problems.append("DataSetTrailingPadding (FFFC,FFFC) present")
    except ValueError as exc:
        problems.append(f"raw layout: {exc}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            meta = {keyword_for_tag(t) or f"({t.group:04X},{t.element:04X})" for t in ds.file_meta.keys()}
            extra = sorted(meta - META_ALLOWED)
            if extra:
                problems.append(f"file meta holds {extra}")
            allowed = set(keep) | DEID_ADDED if keep is not None else None
            for elem in ds.iterall():
                tag = int(elem.tag)
                name = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
                if elem.tag.is_private:
                    problems.append(f"private tag {name}")
                elif not _known(tag):
                    problems.append(f"unknown tag {name}")
                elif dictionary_is_retired(tag):
                    problems.append(f"retired tag {name}")
                elif allowed is not None and keyword_for_tag(tag) not in allowed:
                    problems.append(f"{name} is not on the keep-list")
            if str(ds.get("PatientIdentityRemoved", "")) != "YES":
                problems.append("PatientIdentityRemoved is not YES")
            if not ds.get("DeidentificationMethod") or not ds.get("DeidentificationMethodCodeSequence"):
                problems.append("DeidentificationMethod or DeidentificationMethodCodeSequence missing")
    except Exception as exc:  # noqa: BLE001 - an unreadable output is a problem to report
        problems.append(f"pydicom cannot read it ({type(exc).__name__})")
    return problems
