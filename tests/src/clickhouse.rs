//! A throw-away ClickHouse server for tests: Debian's `clickhouse-server` (`cargo xtask
//! setup` installs it), a generated config in a temp folder, HTTP and native ports on
//! free loopback ports, killed and removed when dropped. The server's time zone is
//! Asia/Tokyo, not UTC: the agent must read and write the same instants whatever the
//! zone of the server it is pointed at (a ClickHouse server takes its host's zone by
//! default), so every ClickHouse test runs where a zone bug shows. Its default
//! profile sets every setting the agent pins (`PINNED_SETTINGS` in the sink) to
//! another value than the agent's, so a request that does not pin them shows.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Debian installs the server.
pub const SERVER: &str = "/usr/sbin/clickhouse-server";

pub struct LocalClickHouse {
    child: Child,
    dir: crate::TempDir,
    pub http_port: u16,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `https://localhost:PORT`, for a server started with [`LocalClickHouse::start_tls`].
    pub https_url: Option<String>,
    /// The current engine ([`LocalClickHouse::start_current`]), not Debian's 18.16.
    pub current: bool,
}

/// `<https_port>` and the server's certificate, for a server with TLS.
/// The HTTPS port's TLS: the server's certificate and key (`server.crt`, `server.key`
/// in `dir`), and with `client_ca` a client certificate that CA signed is required
/// (`client-ca.crt`; `strict`: no certificate, no connection).
fn tls_config(dir: &Path, https: Option<u16>, client_ca: bool) -> String {
    let Some(port) = https else {
        return String::new();
    };
    let d = dir.display();
    let verify = if client_ca {
        format!("<verificationMode>strict</verificationMode><caConfig>{d}/client-ca.crt</caConfig>")
    } else {
        "<verificationMode>none</verificationMode>".to_string()
    };
    format!(
        "<https_port>{port}</https_port>\n  <openSSL><server><certificateFile>{d}/server.crt</certificateFile><privateKeyFile>{d}/server.key</privateKeyFile>{verify}<loadDefaultCAFile>false</loadDefaultCAFile><disableProtocols>sslv2,sslv3</disableProtocols></server></openSSL>"
    )
}

fn config(dir: &Path, http: u16, tcp: u16, https: Option<u16>, client_ca: bool) -> String {
    let d = dir.display();
    let tls = tls_config(dir, https, client_ca);
    format!(
        r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>
  {tls}
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <mark_cache_size>5368709120</mark_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>{TIME_ZONE}</timezone>
</yandex>
"#
    )
}

/// The servers' default profile: each setting the agent pins, set otherwise.
const PROFILE: &[(&str, &str)] = &[
    ("join_use_nulls", "1"),
    ("join_default_strictness", "ANY"),
    ("output_format_json_quote_64bit_integers", "0"),
    ("output_format_json_quote_denormals", "1"),
    ("input_format_skip_unknown_fields", "1"),
    ("max_result_rows", "3"),
    ("result_overflow_mode", "break"),
    ("extremes", "1"),
    ("count_distinct_implementation", "uniq"),
    ("empty_result_for_aggregation_by_empty_set", "1"),
];

/// The server's time zone (see the module's comment).
const TIME_ZONE: &str = "Asia/Tokyo";

fn users() -> String {
    let profile: String = PROFILE
        .iter()
        .map(|(k, v)| format!("<{k}>{v}</{k}>"))
        .collect();
    format!(
        r#"<?xml version="1.0"?>
<yandex>
  <profiles><default>{profile}</default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#
    )
}

/// Runs `start` again (up to five times) when its server found its port taken: a free
/// port can be taken by another test's server between the probe and the bind (tests
/// run at once).
fn on_fresh_ports(
    start: impl Fn() -> anyhow::Result<LocalClickHouse>,
) -> anyhow::Result<LocalClickHouse> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match start() {
            Err(e) if attempt < 5 && e.to_string().contains("Address already in use") => continue,
            other => return other,
        }
    }
}

impl LocalClickHouse {
    /// The server's URL with ClickHouse's stock values of the settings its profile
    /// changes: for a test's own queries, which should not read `extremes` rows or an
    /// empty answer for `count()`.
    pub fn plain_url(&self) -> String {
        format!(
            "{}/?extremes=0&empty_result_for_aggregation_by_empty_set=0&max_result_rows=0&result_overflow_mode=throw&join_use_nulls=0&output_format_json_quote_64bit_integers=1",
            self.url
        )
    }

    pub fn start() -> anyhow::Result<LocalClickHouse> {
        Self::start_with(None, None)
    }

    /// A server that also serves HTTPS (on `https_url`) with this certificate and key
    /// (PEM), made out to `localhost`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<LocalClickHouse> {
        Self::start_with(Some((cert_pem, key_pem)), None)
    }

    /// [`LocalClickHouse::start_tls`], whose HTTPS port also requires a client
    /// certificate signed by `client_ca_pem`.
    pub fn start_mutual_tls(
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: &str,
    ) -> anyhow::Result<LocalClickHouse> {
        Self::start_with(Some((cert_pem, key_pem)), Some(client_ca_pem))
    }

    fn start_with(
        tls: Option<(&str, &str)>,
        client_ca: Option<&str>,
    ) -> anyhow::Result<LocalClickHouse> {
        if !Path::new(SERVER).exists() {
            bail!("ClickHouse is not installed ({SERVER}); run `cargo xtask setup`");
        }
        on_fresh_ports(|| Self::start_once(tls, client_ca))
    }

    fn start_once(
        tls: Option<(&str, &str)>,
        client_ca: Option<&str>,
    ) -> anyhow::Result<LocalClickHouse> {
        let tmp = crate::TempDir::new("collector-ch")?;
        let dir = tmp.path().to_path_buf();
        let (http, tcp) = (crate::free_port(), crate::free_port());
        let https = tls.map(|_| crate::free_port());
        if let Some((cert, key)) = tls {
            std::fs::write(dir.join("server.crt"), cert)?;
            std::fs::write(dir.join("server.key"), key)?;
        }
        if let Some(ca) = client_ca {
            std::fs::write(dir.join("client-ca.crt"), ca)?;
        }
        std::fs::write(
            dir.join("config.xml"),
            config(&dir, http, tcp, https, client_ca.is_some()),
        )?;
        std::fs::write(dir.join("users.xml"), users())?;
        let child = Command::new(SERVER)
            .arg(format!(
                "--config-file={}",
                dir.join("config.xml").display()
            ))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start clickhouse-server")?;
        let mut ch = LocalClickHouse {
            child,
            dir: tmp,
            http_port: http,
            url: format!("http://127.0.0.1:{http}"),
            https_url: https.map(|p| format!("https://localhost:{p}")),
            current: false,
        };
        ch.wait_ready()?;
        Ok(ch)
    }

    /// The current ClickHouse engine (chDB 26.x, PyPI, in the tests' Python
    /// virtualenv that `cargo xtask setup` makes) behind ClickHouse's HTTP interface
    /// (`clickhouse_current.py`): the agent's SQL run by the ClickHouse of today, where
    /// [`LocalClickHouse::start`] runs Debian's 18.16. One statement at a time; no TLS.
    pub fn start_current() -> anyhow::Result<LocalClickHouse> {
        let python = crate::toolchain::Toolchain::discover()
            .dbt_venv()
            .join("bin/python");
        anyhow::ensure!(
            python.exists(),
            "{} is missing: run `cargo xtask setup`",
            python.display()
        );
        on_fresh_ports(|| Self::start_current_once(&python))
    }

    fn start_current_once(python: &Path) -> anyhow::Result<LocalClickHouse> {
        let tmp = crate::TempDir::new("collector-chdb")?;
        let dir = tmp.path().to_path_buf();
        let script = dir.join("clickhouse_current.py");
        std::fs::write(&script, include_str!("clickhouse_current.py"))?;
        let http = crate::free_port();
        let profile: String = PROFILE
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let child = Command::new(python)
            .arg(&script)
            .arg(http.to_string())
            .arg(dir.join("data"))
            .arg(profile)
            .env("TZ", TIME_ZONE)
            .env(
                "CLICKHOUSE_CURRENT_LOG",
                std::env::var_os("CLICKHOUSE_CURRENT_LOG")
                    .unwrap_or_else(|| dir.join("statements.log").into()),
            )
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("error.log"))?)
            .spawn()
            .context("start clickhouse_current.py")?;
        let mut ch = LocalClickHouse {
            child,
            dir: tmp,
            http_port: http,
            url: format!("http://127.0.0.1:{http}"),
            https_url: None,
            current: true,
        };
        ch.wait_ready()?;
        Ok(ch)
    }

    /// What the current engine's front ran so far, a line per statement (`OK '…'`,
    /// `ERR '…'` and the error): `CLICKHOUSE_CURRENT_LOG` when set, else its own file.
    pub fn statements(&self) -> anyhow::Result<String> {
        anyhow::ensure!(
            self.current,
            "only the current engine's front logs statements"
        );
        let path = std::env::var_os("CLICKHOUSE_CURRENT_LOG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| self.dir.path().join("statements.log"));
        Ok(std::fs::read_to_string(path)?)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
                bail!("ClickHouse exited ({status}): {log}");
            }
            if Instant::now() > deadline {
                bail!("ClickHouse did not answer on {} within 60 s", self.url);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the server answers `/ping`.
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("Ok.")
    }
}

impl Drop for LocalClickHouse {
    fn drop(&mut self) {
        // The folder goes with `dir`, after the server is gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
