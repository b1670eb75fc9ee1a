"""A real, throw-away PostgreSQL server for tests.

``pg_server`` (session scope) runs ``initdb`` into a temporary directory and
starts ``postgres`` on 127.0.0.1 at a free port with its unix socket in that
directory (trust authentication, fsync off: a test server), and stops it and
removes the directory at the end of the session. ``pg_dsn`` (function scope)
creates a fresh database on it for one test and gives its DSN.

PostgreSQL refuses to run as root: as root, the server runs as the
``postgres`` user (or a ``isoswitch-pg`` system user created for it) and the
temporary directory is owned by that user.

When the binaries are missing: with ``CI=true`` they are installed with
``.ci/install-postgres.sh`` (apt-get); otherwise the tests using these
fixtures are skipped with the reason.

Use from a test module::

    from tests.pg import pg_server, pg_dsn  # noqa: F401  (pytest fixtures)
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = ROOT / ".ci" / "install-postgres.sh"
PG_USER_FALLBACK = "isoswitch-pg"


def find_pg_bindir() -> str | None:
    exe = shutil.which("pg_ctl")
    if exe:
        return os.path.dirname(os.path.realpath(exe))
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(d.split("/")[4]) if d.split("/")[4].isdigit() else 0, reverse=True)
    for d in dirs:
        if os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    return None


def ensure_pg_bindir() -> str:
    """The directory holding pg_ctl/initdb/postgres, installing them in CI; else pytest.skip."""
    d = find_pg_bindir()
    if d:
        return d
    if os.environ.get("CI") == "true":
        try:
            out = subprocess.run(["sh", str(INSTALL_SCRIPT)], check=True, capture_output=True,
                                 text=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.fail(f"installing PostgreSQL failed: {getattr(exc, 'stderr', '') or exc}")
        d = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else find_pg_bindir()
        if d and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
        pytest.fail("PostgreSQL was installed but pg_ctl was not found")
    pytest.skip("PostgreSQL server binaries (pg_ctl, initdb) not found: install the postgresql "
                "package, or run with CI=true to have the tests install it")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """None when not root (run as ourselves); otherwise an unprivileged account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_USER_FALLBACK):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    PG_USER_FALLBACK], check=True, capture_output=True)
    return pwd.getpwnam(PG_USER_FALLBACK)


@dataclass
class PgServer:
    bindir: str
    base: Path
    port: int
    user: pwd.struct_passwd | None
    superuser: str = "postgres"
    _dbs = itertools.count(1)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{db}"

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        kw = {}
        if self.user is not None:
            kw = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        env = dict(os.environ, LC_ALL="C", LANG="C", PGHOST=str(self.sockdir), PGPORT=str(self.port))
        env.pop("PGDATA", None)
        return subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]], check=check,
                              capture_output=True, text=True, timeout=timeout, cwd=str(self.base),
                              env=env, **kw)

    def initdb(self) -> None:
        self.run("initdb", "-D", str(self.datadir), "-U", self.superuser, "--auth=trust",
                 "--encoding=UTF8", "--no-sync")

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockdir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100 "
                "-c shared_buffers=32MB")
        r = self.run("pg_ctl", "-D", str(self.datadir), "-l", str(self.base / "server.log"),
                     "-o", opts, "-w", "-t", "60", "start", check=False)
        if r.returncode != 0:
            log = ""
            try:
                log = (self.base / "server.log").read_text()[-2000:]
            except OSError:
                pass
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()}\n{log}")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop",
                 check=False)

    def create_db(self, prefix: str = "t") -> str:
        name = f"{prefix}{os.getpid()}_{next(self._dbs)}"
        self.run("createdb", "-h", str(self.sockdir), "-p", str(self.port), "-U", self.superuser,
                 "-T", "template0", name)
        return name


def start_pg_server() -> PgServer:
    bindir = ensure_pg_bindir()
    user = _server_user()
    base = Path(tempfile.mkdtemp(prefix="isoswitch-pg-"))
    (base / "sock").mkdir()
    if user is not None:
        for p in (base, base / "sock"):
            os.chown(p, user.pw_uid, user.pw_gid)
        os.chmod(base, 0o700)
    last = None
    for _ in range(3):  # a free port can be taken between probe and bind
        server = PgServer(bindir=bindir, base=base, port=_free_port(), user=user)
        try:
            if not server.datadir.exists():
                server.initdb()
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
            time.sleep(0.2)
    shutil.rmtree(base, ignore_errors=True)
    raise last  # type: ignore[misc]


@pytest.fixture(scope="session")
def pg_server():
    server = start_pg_server()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server):
    """DSN of a fresh, empty database on the session's server."""
    return pg_server.dsn(pg_server.create_db())
