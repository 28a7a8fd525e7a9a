"""PostgreSQL for the service tests: the machine's server on 127.0.0.1:5432 (trust auth, user postgres) if it
answers, else a throwaway cluster from Debian's initdb/pg_ctl, else a reason the PostgreSQL leg is skipped.

One throwaway database per test session (dropped at the end); each test gets its own schema in it
(``search_path`` in the URL), so tests and session fixtures never see each other's rows.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from tests.service.helpers import free_port


def _connect(port: int, dbname: str = "postgres", host: str = "127.0.0.1"):
    import psycopg

    return psycopg.connect(host=host, port=port, user="postgres", dbname=dbname, connect_timeout=2,
                           autocommit=True)


class Postgres:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = 5432
        self.dbname = f"rmt_test_{os.getpid()}_{secrets.token_hex(3)}"
        self.skip_reason: str | None = None
        self._cluster: Path | None = None
        self._pg_ctl: str | None = None
        self._as_user: list[str] = []

    def start(self) -> "Postgres":
        try:
            _connect(self.port).close()
        except Exception as exc:  # no server here: try a private cluster
            first = f"{type(exc).__name__}: {str(exc).strip()[:120]}"
            if not self._start_cluster(first):
                return self
        with _connect(self.port) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        return self

    def _start_cluster(self, why: str) -> bool:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            self.skip_reason = (f"PostgreSQL leg skipped: nothing answers on 127.0.0.1:5432 ({why}) and no "
                                "initdb under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
            return False
        bindir = Path(bins[-1]).parent
        self._cluster = self.workdir / "pgdata"
        self.port = free_port()
        as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                self.skip_reason = f"PostgreSQL leg skipped: nothing answers on 127.0.0.1:5432 ({why}), running " \
                                   "as root and there is no postgres user to run a throwaway cluster"
                return False
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        self._as_user = as_user
        try:
            subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(self._cluster), "-U", "postgres", "-A", "trust"],
                           check=True, capture_output=True, timeout=120)
            self._pg_ctl = str(bindir / "pg_ctl")
            subprocess.run([*as_user, self._pg_ctl, "-D", str(self._cluster), "-l", str(self.workdir / "pg.log"), "-w",
                            "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off",
                            "start"], check=True, capture_output=True, timeout=120)
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            self.skip_reason = (f"PostgreSQL leg skipped: nothing answers on 127.0.0.1:5432 ({why}) and a "
                                f"throwaway cluster did not start: {exc} {detail.decode(errors='replace')[:200]}")
            return False
        return True

    def url(self, schema: str | None = None) -> str:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.dbname}"
        if schema:
            url += "?options=" + quote(f"-csearch_path={schema}")
        return url

    def new_schema(self) -> str:
        """A fresh schema for one test (or one session fixture); returns its URL."""
        schema = "t_" + secrets.token_hex(6)
        with _connect(self.port, self.dbname) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return self.url(schema)

    def stop(self) -> None:
        if self.skip_reason is None:
            for _ in range(3):
                try:
                    with _connect(self.port) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
                    break
                except Exception:
                    time.sleep(0.5)
        if self._pg_ctl and self._cluster is not None:
            subprocess.run([*self._as_user, self._pg_ctl, "-D", str(self._cluster), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
            shutil.rmtree(self._cluster, ignore_errors=True)
