//! A throw-away PostgreSQL server for tests: Debian's binaries (`cargo xtask setup`
//! installs them), a fresh cluster in a temp folder, listening on a free loopback port
//! (and a socket in that folder), stopped and removed when dropped. The server's time
//! zone is America/New_York, not UTC (`initdb` takes its host's), its `DateStyle` is
//! `SQL, DMY` and its `extra_float_digits` 0: the agent must read and write the same
//! values whatever the settings of the server it is pointed at.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The user the tests connect as (trust authentication, loopback only).
pub const USER: &str = "collector";

pub struct LocalPostgres {
    /// Stopped before the server (fields drop in order, after `Drop::drop`).
    pub pooler: Option<PgBouncer>,
    dir: crate::TempDir,
    bin: PathBuf,
    /// Server options beyond the common ones (TLS), kept for `restart`.
    extra_opts: String,
    /// The server's own port.
    pub port: u16,
    /// What the agent is pointed at: the pooler's `postgres://collector@127.0.0.1:PORT/postgres`
    /// when there is one, else the server's.
    pub url: String,
}

/// Newest `/usr/lib/postgresql/<version>/bin` with an `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// Whether this process runs as root (then PostgreSQL's tools run as `postgres`).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary; as root, as the `postgres` user (initdb refuses root).
fn pg(bin: &Path, tool: &str, args: &[&str]) -> anyhow::Result<()> {
    pg_output(bin, tool, args).map(drop)
}

/// [`pg`], and what the tool printed on its standard output.
fn pg_output(bin: &Path, tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let exe = bin.join(tool);
    let out = if is_root() {
        let quoted: Vec<String> = std::iter::once(exe.display().to_string())
            .chain(args.iter().map(|a| a.to_string()))
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c", &quoted.join(" ")])
            .output()
    } else {
        Command::new(&exe).args(args).output()
    }
    .with_context(|| format!("run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `psql -At` as [`USER`] to `host` (an address, or a server's socket folder) and
/// `port` (a server's, or a pooler's in front of one); what it printed.
fn psql_at(bin: &Path, host: &str, port: u16, sql: &str) -> anyhow::Result<String> {
    let port = port.to_string();
    pg_output(
        bin,
        "psql",
        &[
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            host,
            "-p",
            &port,
            "-U",
            USER,
            "-d",
            "postgres",
            "-c",
            sql,
        ],
    )
}

/// What a server that speaks TLS is given: PEM files (copied into the server's folder),
/// its `pg_hba.conf`, the password of [`USER`], and roles to create.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// CAs whose client certificates the server accepts (`ssl_ca_file`).
    pub client_ca_pem: String,
    /// Replaces the whole `pg_hba.conf`; keep `local all all trust` in it, which the
    /// harness uses to set up the roles.
    pub hba: String,
    pub password: String,
    /// `CREATE ROLE` names (superusers, LOGIN).
    pub roles: Vec<String>,
}

/// The common server options: the agent must work whatever the server's settings.
fn server_opts(port: u16, dir: &Path, extra: &str) -> String {
    format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c timezone=America/New_York -c DateStyle=SQL,DMY -c IntervalStyle=postgres_verbose -c extra_float_digits=0 -c standard_conforming_strings=off -c bytea_output=escape -c default_transaction_isolation=serializable -c escape_string_warning=off{extra}",
        dir.display()
    )
}

/// As root, makes `path` (and what it holds) the `postgres` user's, under which the
/// server and PgBouncer run; nothing otherwise.
fn give_to_postgres(path: &Path) -> anyhow::Result<()> {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()?
            .success();
        anyhow::ensure!(ok, "chown {} to postgres", path.display());
    }
    Ok(())
}

/// Writes a file the server reads, owned by it and private (PostgreSQL refuses a key
/// file others can read).
fn server_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    give_to_postgres(path)?;
    Ok(())
}

impl LocalPostgres {
    pub fn start() -> anyhow::Result<LocalPostgres> {
        Self::start_with(None)
    }

    /// A server with TLS on, its logins as `tls.hba` says.
    pub fn start_tls(tls: &ServerTls) -> anyhow::Result<LocalPostgres> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> anyhow::Result<LocalPostgres> {
        let bin = bin_dir().context(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); run `cargo xtask setup`",
        )?;
        let dir = crate::TempDir::new("collector-pg")?;
        give_to_postgres(dir.path())?;
        let data = dir.path().join("data");
        let data_s = data.display().to_string();
        pg(
            &bin,
            "initdb",
            &[
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                USER,
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let mut extra_opts = String::new();
        if let Some(tls) = tls {
            for (name, text) in [
                ("server.crt", &tls.cert_pem),
                ("server.key", &tls.key_pem),
                ("client-ca.crt", &tls.client_ca_pem),
            ] {
                server_file(&dir.path().join(name), text)?;
            }
            server_file(&data.join("pg_hba.conf"), &tls.hba)?;
            extra_opts = format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key -c ssl_ca_file={0}/client-ca.crt",
                dir.path().display()
            );
        }
        // A free port can be taken by a parallel test before the server binds it: then
        // try another.
        let log = dir.path().join("postgres.log").display().to_string();
        let mut attempt = 0;
        let port = loop {
            attempt += 1;
            let port = crate::free_port();
            let opts = server_opts(port, dir.path(), &extra_opts);
            match pg(
                &bin,
                "pg_ctl",
                &[
                    "-D", &data_s, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
                ],
            ) {
                Ok(()) => break port,
                Err(e) if attempt < 5 => {
                    let _ = pg(&bin, "pg_ctl", &["-D", &data_s, "-m", "immediate", "stop"]);
                    eprintln!("PostgreSQL did not start on port {port} ({e}); trying another port");
                }
                Err(e) => {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    return Err(e.context(format!("PostgreSQL log:\n{tail}")));
                }
            }
        };
        let pg = LocalPostgres {
            pooler: None,
            url: format!("postgres://{USER}@127.0.0.1:{port}/postgres"),
            port,
            bin,
            dir,
            extra_opts,
        };
        if let Some(tls) = tls {
            let mut sql = format!(
                "ALTER ROLE {USER} PASSWORD '{}';",
                tls.password.replace('\'', "''")
            );
            for role in &tls.roles {
                sql.push_str(&format!("CREATE ROLE \"{role}\" LOGIN SUPERUSER;"));
            }
            pg.psql(&sql)?;
        }
        Ok(pg)
    }

    /// A server behind PgBouncer in *transaction* mode (`pool_size` server connections,
    /// handed out round-robin), as Supabase's port 6543, Neon's `-pooler` hosts and
    /// most PgBouncer deployments run: a client's transactions land on any of the
    /// server connections, whose session state (`SET`, prepared statements, temporary
    /// tables) is whatever their earlier clients left. Each of them is left with a
    /// hostile one first ([`PgBouncer::pollute`]); `url` is the pooler's.
    pub fn start_pooled(pool_size: usize) -> anyhow::Result<LocalPostgres> {
        Self::start_pooled_in(pool_size, "transaction")
    }

    /// A server behind PgBouncer in `pool_mode` (`session`, `transaction` or
    /// `statement`), as [`LocalPostgres::start_pooled`].
    pub fn start_pooled_in(pool_size: usize, pool_mode: &str) -> anyhow::Result<LocalPostgres> {
        let mut pg = Self::start()?;
        let pooler = PgBouncer::start(&pg, pool_size, pool_mode)?;
        pg.url = format!("postgres://{USER}@127.0.0.1:{}/postgres", pooler.port);
        // A statement-mode pooler takes no transaction to pollute with.
        if pool_mode != "statement" {
            pooler.pollute(&pg)?;
        }
        pg.pooler = Some(pooler);
        Ok(pg)
    }

    /// A new server like this one: pooled the same way when this one is.
    pub fn fresh(&self) -> anyhow::Result<LocalPostgres> {
        match &self.pooler {
            Some(p) => Self::start_pooled_in(p.pool_size, &p.pool_mode),
            None => Self::start(),
        }
    }

    /// Runs SQL as [`USER`] through the pooler, as another of its clients would; what
    /// it printed (`psql -At`).
    pub fn psql_pooled(&self, sql: &str) -> anyhow::Result<String> {
        let pooler = self.pooler.as_ref().context("no pooler in front")?;
        psql_at(&self.bin, "127.0.0.1", pooler.port, sql)
    }

    /// Runs SQL as [`USER`] over TCP on the server's own port; what it printed
    /// (`psql -At`).
    pub fn psql_output(&self, sql: &str) -> anyhow::Result<String> {
        psql_at(&self.bin, "127.0.0.1", self.port, sql)
    }

    /// Runs SQL as [`USER`] over the server's socket (trusted).
    pub fn psql(&self, sql: &str) -> anyhow::Result<()> {
        let socket = self.dir.path().display().to_string();
        psql_at(&self.bin, &socket, self.port, sql).map(drop)
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let data = self.dir.path().join("data").display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        pg(&self.bin, "pg_ctl", &all)
    }

    /// Stops the server (immediately, like a crash), keeping its data.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.ctl(&["-m", "immediate", "-w", "stop"])
    }

    /// Starts it again on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        let opts = server_opts(self.port, self.dir.path(), &self.extra_opts);
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.ctl(&["-o", &opts, "-l", &log, "-w", "-t", "60", "start"])
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Debian's PgBouncer (`cargo xtask setup` installs it), in transaction mode unless told
/// otherwise, in front of a [`LocalPostgres`], on a free loopback port; stopped when
/// dropped.
pub struct PgBouncer {
    child: std::process::Child,
    _dir: crate::TempDir,
    pub port: u16,
    pub pool_size: usize,
    pub pool_mode: String,
}

/// The session state [`PgBouncer::pollute`] leaves on every server connection: another
/// schema first in `search_path`, doubles rounded, intervals as SQL writes them.
/// (PgBouncer keeps a few settings per client and sets them on the server connection it
/// hands the client: `TimeZone`, `DateStyle`, `client_encoding`,
/// `standard_conforming_strings`, `application_name`. The rest stays as the
/// connection's earlier clients left it.)
pub const POLLUTED: &str =
    "SET search_path TO public; SET extra_float_digits TO 0; SET IntervalStyle TO sql_standard;";

impl PgBouncer {
    fn start(
        server: &LocalPostgres,
        pool_size: usize,
        pool_mode: &str,
    ) -> anyhow::Result<PgBouncer> {
        use std::os::unix::process::CommandExt;
        let exe = Path::new("/usr/sbin/pgbouncer");
        anyhow::ensure!(
            exe.exists(),
            "PgBouncer is not installed (no /usr/sbin/pgbouncer); run `cargo xtask setup`"
        );
        let dir = crate::TempDir::new("collector-pgbouncer")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = crate::free_port();
            let d = dir.path().display();
            std::fs::write(
                dir.path().join("userlist.txt"),
                format!("\"{USER}\" \"\"\n"),
            )?;
            std::fs::write(
                dir.path().join("pgbouncer.ini"),
                format!(
                    "[databases]\n* = host=127.0.0.1 port={server}\n\n[pgbouncer]\n\
                     listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                     auth_type = trust\nauth_file = {d}/userlist.txt\n\
                     pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmin_pool_size = 0\n\
                     server_round_robin = 1\nmax_client_conn = 500\n\
                     logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
                    server = server.port
                ),
            )?;
            give_to_postgres(dir.path())?;
            let mut cmd = Command::new(exe);
            cmd.arg(dir.path().join("pgbouncer.ini"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            if is_root() {
                // PgBouncer refuses to run as root.
                let id = |flag: &str| -> anyhow::Result<u32> {
                    let out = Command::new("id").args([flag, "postgres"]).output()?;
                    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
                };
                cmd.uid(id("-u")?).gid(id("-g")?);
            }
            let mut child = cmd.spawn().context("start pgbouncer")?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let up = loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break true;
                }
                if child.try_wait()?.is_some() || std::time::Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            if up {
                return Ok(PgBouncer {
                    child,
                    _dir: dir,
                    port,
                    pool_size,
                    pool_mode: pool_mode.into(),
                });
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("pgbouncer.log")).unwrap_or_default();
            // Another test may have taken the free port before PgBouncer bound it.
            if attempt >= 5 || !log.contains("Address already in use") {
                bail!("PgBouncer did not start on port {port}:\n{log}");
            }
        }
    }

    /// Leaves [`POLLUTED`] on each of the pool's server connections: as many clients at
    /// once as the pool has connections, each setting it for its session inside a
    /// transaction that waits for the others, so each holds its own connection.
    pub fn pollute(&self, server: &LocalPostgres) -> anyhow::Result<()> {
        let sql = format!("BEGIN; SELECT pg_sleep(0.5); {POLLUTED} COMMIT;");
        let port = self.port;
        let handles: Vec<_> = (0..self.pool_size)
            .map(|_| {
                let (bin, sql) = (server.bin.clone(), sql.clone());
                std::thread::spawn(move || psql_at(&bin, "127.0.0.1", port, &sql))
            })
            .collect();
        for h in handles {
            h.join().expect("psql thread")?;
        }
        Ok(())
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
