"""ClickHouse's HTTP interface in front of the current ClickHouse engine, for tests.

Debian ships only clickhouse-server 18.16. The agent must also run on current
ClickHouse, and PyPI has the current engine as a library: chDB (`chdb-core`, the
ClickHouse source built in-process, 26.x). This serves the part of ClickHouse's HTTP
interface the agent uses, each request executed by that engine:

- `POST /` with the statement as the body, or as the `query` parameter with the
  body as an `INSERT`'s data (`INSERT INTO t (cols) FORMAT RowBinary|JSONEachRow`);
- `database`, `session_id`, `user` and `password` parameters; every other parameter
  is a setting for that request (an unknown one fails, as on a server);
- `GET /ping` answers `Ok.`;
- the answer in the statement's `FORMAT` (TabSeparated by default); an error as a
  server sends it: a non-2xx status and the exception's text (`Code: 60. DB::Exception:
  …`).

What it is not: a server's concurrency. One engine session runs one statement at a
time, and the temporary tables of every `session_id` share it.

Usage: python3 clickhouse_current.py PORT DATA_DIR [PROFILE]

PROFILE: the default profile's settings, `name=value&…`, which a request's settings
override for that request only. The engine takes its time zone from `TZ`. With
`CLICKHOUSE_CURRENT_LOG=FILE` set (in the test's environment), each statement and
each error is appended to FILE: how a failing test on this engine is read. Without it,
the harness gives the front a file of its own (`LocalClickHouse::statements`).
"""

import re
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chdb import session as chdb_session

# Parameters that are not settings (ClickHouse's HTTP handler reads them itself).
NOT_SETTINGS = {
    "query",
    "database",
    "session_id",
    "session_timeout",
    "session_check",
    "user",
    "password",
    "query_id",
    "default_format",
    "compress",
    "decompress",
}

INSERT = re.compile(
    r"^\s*INSERT\s+INTO\s+(\S+)\s*(\(.*\))?\s*FORMAT\s+(\w+)\s*$", re.IGNORECASE | re.DOTALL
)
CODE = re.compile(r"Code: (\d+)")

# ClickHouse's HTTP handler answers these exception codes with these statuses
# (`exceptionCodeToHTTPStatus`); every other one with 500.
STATUS = {
    62: 400,  # SYNTAX_ERROR
    47: 400,  # UNKNOWN_IDENTIFIER
    60: 404,  # UNKNOWN_TABLE
    81: 404,  # UNKNOWN_DATABASE
    115: 400,  # UNKNOWN_SETTING
    516: 403,  # AUTHENTICATION_FAILED
    159: 408,  # TIMEOUT_EXCEEDED
}


def literal(value: str) -> str:
    """A setting's value as SQL: numbers as they are, the rest quoted."""
    if re.fullmatch(r"-?\d+(\.\d+)?", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine:
    def __init__(self, path: str, profile: dict):
        self.session = chdb_session.Session(path)
        self.lock = threading.Lock()
        self.profile = profile
        for name, value in profile.items():
            self.session.query(f"SET {name} = {literal(value)}")
        # The settings the last request set, by name: set back to their defaults
        # when the next one does not name them, as each request on a server starts
        # from the profile's (and set again only when their value changes).
        self.set = {}
        self.database = None

    def run(self, params: dict, sql: str, data: bytes) -> bytes:
        with self.lock:
            settings = {k: v for k, v in params.items() if k not in NOT_SETTINGS}
            for name in self.set.keys() - settings.keys():
                default = literal(self.profile[name]) if name in self.profile else "DEFAULT"
                self.session.query(f"SET {name} = {default}")
                del self.set[name]
            for name, value in settings.items():
                if self.set.get(name) != value:
                    self.set.pop(name, None)
                    self.session.query(f"SET {name} = {literal(value)}")
                    self.set[name] = value
            database = params.get("database", "default")
            if database != self.database:
                self.database = None
                self.session.query(f"USE `{database}`")
                self.database = database
            fmt = params.get("default_format", "TabSeparated")
            insert = INSERT.match(sql) if data else None
            if insert:
                table, columns, data_format = insert.groups()
                inserter = self.session.send_insert(
                    f"INSERT INTO {table} {columns or ''}", data_format
                )
                inserter.append(data)
                inserter.finish()
                return b""
            if data:
                sql = sql + "\n" + data.decode()
            return self.session.query(sql, fmt).bytes()


import os
LOG = open(os.environ["CLICKHOUSE_CURRENT_LOG"], "a") if os.environ.get("CLICKHOUSE_CURRENT_LOG") else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: Engine = None

    def log_message(self, *args):
        pass

    def answer(self, status: int, body: bytes, code: str = None):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-ClickHouse-Exception-Code", code)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/ping":
            return self.answer(200, b"Ok.\n")
        self.execute(url, b"")

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        self.execute(url, self.rfile.read(length))

    def execute(self, url, body: bytes):
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if "query" in params:
            sql, data = params["query"], body
        else:
            sql, data = body.decode(), b""
        try:
            out = self.engine.run(params, sql, data)
            if LOG:
                LOG.write(f"OK {sql[:300]!r}\n"); LOG.flush()
        except Exception as e:  # the engine's exceptions carry ClickHouse's text
            text = str(e)
            if LOG:
                LOG.write(f"ERR {sql[:2000]!r}\n  {text}\n"); LOG.flush()
            m = CODE.search(text)
            code = int(m.group(1)) if m else 1000
            return self.answer(STATUS.get(code, 500), (text + "\n").encode(), str(code))
        self.answer(200, out)


def main():
    port, path = int(sys.argv[1]), sys.argv[2]
    profile = dict(urllib.parse.parse_qsl(sys.argv[3])) if len(sys.argv) > 3 else {}
    Handler.engine = Engine(path, profile)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
