"""A local Orthanc PACS for the tests and ``make demo-pacs``: a real server, never a mock.

:func:`start` runs Debian's ``Orthanc`` (packages ``orthanc`` and ``orthanc-dicomweb``) on free loopback
ports with its own storage directory, HTTP basic auth and the DICOMweb plugin, and registers medtl's
own AE title so that C-GET/C-MOVE and C-STORE work both ways. :func:`load` sends a folder of DICOM
files to it over STOW-RS. Nothing here is used by a site's own PACS: that is configured in the
``pacs`` section of params.yaml and reached by :mod:`pipeline.sources.pacs`.

Command line (what ``make demo-pacs`` uses)::

    python -m pipeline.sources.orthanc start DIR   # starts in the background, writes DIR/server.json
    python -m pipeline.sources.orthanc load DIR FOLDER
    python -m pipeline.sources.orthanc stop DIR
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import MedtlError

BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                              "/usr/lib/orthanc/libOrthancDicomWeb.so")
SERVER_AET = "ORTHANC"
CLIENT_AET = "MEDTL"
USER = "medtl"


def binary() -> str | None:
    """The Orthanc executable, or None where it is not installed."""
    found = shutil.which("Orthanc")
    return found or next((p for p in BINARY_CANDIDATES if os.access(p, os.X_OK)), None)


def dicomweb_plugin() -> str | None:
    return next((p for p in DICOMWEB_PLUGIN_CANDIDATES if Path(p).is_file()), None)


def missing() -> str:
    """Why a local Orthanc cannot run here ('' when it can): what the tests' skip reason says."""
    if binary() is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; scripts/setup.sh dev does it as root)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running local Orthanc (what ``server.json`` holds)."""

    root: str
    pid: int
    http_port: int
    dicom_port: int
    client_port: int        # the port medtl's own storage SCP listens on for C-MOVE (registered in Orthanc)
    user: str
    password: str
    aet: str = SERVER_AET
    client_aet: str = CLIENT_AET

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def env(self) -> dict[str, str]:
        """The environment variables that give medtl this server's credentials."""
        return {"MEDTL_PACS_USERNAME": self.user, "MEDTL_PACS_PASSWORD": self.password}

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); its storage stays."""
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        for _ in range(100):
            if not self.alive():
                return
            time.sleep(0.1)
            _reap(self.pid)
        os.kill(self.pid, signal.SIGKILL)
        _reap(self.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def config(root: Path, http_port: int, dicom_port: int, client_port: int, password: str) -> dict:
    """Orthanc's configuration: loopback only, basic auth, DICOMweb, medtl's AE registered."""
    storage = str(root / "db")
    return {
        "Name": "medtl-local",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "Plugins": [dicomweb_plugin()],
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": SERVER_AET,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {CLIENT_AET: [CLIENT_AET, "127.0.0.1", client_port]},
        "UnknownSopClassAccepted": True,
        "OverwriteInstances": False,
        "StableAge": 1,
        "SaveJobs": False,
        "HttpCompressionEnabled": False,
        "WebDavEnabled": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }


def start(root: Path, *, timeout: float = 60.0) -> Server:
    """Start Orthanc with its storage under ``root`` and wait until its REST API answers.

    Raises MedtlError when Orthanc is not installed or does not come up (its log is ``root/orthanc.log``).
    """
    import requests

    why = missing()
    if why:
        raise MedtlError(why)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(18)
    server = Server(root=str(root), pid=0, http_port=free_port(), dicom_port=free_port(), client_port=free_port(),
                    user=USER, password=password)
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config(root, server.http_port, server.dicom_port, server.client_port, password),
                              indent=2))
    cfg.chmod(0o600)
    log = open(root / "orthanc.log", "ab")
    # TCP_NODELAY: Debian's Orthanc writes each DIMSE message in two pieces with Nagle's algorithm on, so
    # every response waits ~40 ms for a delayed ACK (a C-ECHO takes 50 ms instead of 5)
    proc = subprocess.Popen([binary(), str(cfg)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TCP_NODELAY": "1"})
    log.close()
    server.pid = proc.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MedtlError(f"{root / 'orthanc.log'}: Orthanc exited at start (status {proc.returncode})")
        try:
            if requests.get(f"{server.url}/system", auth=(USER, password), timeout=2).status_code == 200:
                (root / "server.json").write_text(json.dumps(asdict(server), indent=2))
                (root / "server.json").chmod(0o600)
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise MedtlError(f"{root / 'orthanc.log'}: Orthanc did not answer within {timeout:.0f} s")


def running(root: Path) -> Server:
    """The server :func:`start` left running under ``root``."""
    path = Path(root) / "server.json"
    if not path.is_file():
        raise MedtlError(f"{path}: no local Orthanc was started here")
    return Server(**json.loads(path.read_text()))


def load(server: Server, folder: Path, *, batch: int = 50) -> int:
    """STOW-RS every DICOM file under ``folder`` (those pydicom reads and that carry pixel data or are
    images; junk and DICOMDIRs are skipped) into the server; returns how many instances were stored."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient
    from requests import Session

    session = Session()
    session.auth = (server.user, server.password)
    client = DICOMwebClient(server.dicomweb_url, session=session)
    pending, stored = [], 0
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "PixelData" not in ds:
            continue
        pending.append(ds)
        if len(pending) >= batch:
            client.store_instances(pending)
            stored += len(pending)
            pending = []
    if pending:
        client.store_instances(pending)
        stored += len(pending)
    return stored


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] not in ("start", "load", "stop", "env"):
        print(__doc__, file=sys.stderr)
        return 2
    command, root = args[0], Path(args[1])
    try:
        if command == "start":
            server = start(root)
            print(f"orthanc: {server.url} (DICOMweb {server.dicomweb_url}, DIMSE {server.aet}@127.0.0.1:"
                  f"{server.dicom_port}); credentials in {root / 'server.json'}")
        elif command == "load":
            n = load(running(root), Path(args[2]))
            print(f"orthanc: stored {n} instances from {args[2]}")
        elif command == "env":
            for key, value in running(root).env().items():
                print(f"export {key}={value}")
        else:
            running(root).stop()
            print("orthanc: stopped")
    except MedtlError as exc:
        print(f"orthanc: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
