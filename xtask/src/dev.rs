//! `cargo xtask dev`: the local stack, for trying the product and developing it.
//!
//! Starts the built worker under `wrangler dev` (local mode, state persisted in
//! `data/edge-state`), the agent draining into `data/warehouse.duckdb`, and a demo page
//! that embeds the SDK snippet (the SDK itself is served by the worker), and a local
//! stand-in for the SMS provider that the cart-abandonment texts go to (printed, and
//! kept in `data/sms.log`). Prints `key=value` lines once ready (scriptable), and stops
//! everything on SIGINT/SIGTERM.
//!
//! Environment: `XTASK_DEV_DATA_DIR` (default `<repo>/data`), `XTASK_DEV_EDGE_PORT`
//! (default 8787, or a free port if taken), `XTASK_DEV_DEMO_PORT` (default 8080, same).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use collector_e2e::pages::{sdk_page_vars, PageServer};
use collector_e2e::{free_port, EdgeOptions, LocalEdge, Toolchain, DEV_WRITE_KEY};

fn port_or_free(var: &str, default: u16) -> u16 {
    let wanted = std::env::var(var)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default);
    if wanted != 0 && TcpListener::bind(("127.0.0.1", wanted)).is_ok() {
        wanted
    } else {
        free_port()
    }
}

fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A local-development secret kept in `.dev.vars` (which `wrangler dev` reads too),
/// created once with a random value.
fn dev_var(root: &Path, name: &str, make: impl FnOnce() -> Result<String>) -> Result<String> {
    let path = root.join(".dev.vars");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let prefix = format!("{name}=");
    if let Some(v) = text.lines().find_map(|l| l.strip_prefix(prefix.as_str())) {
        return Ok(v.trim().trim_matches('"').to_string());
    }
    let value = make()?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    writeln!(f, "{name}={value}")?;
    Ok(value)
}

pub fn dev(tools: &Toolchain, _args: &[String]) -> Result<()> {
    let data = std::env::var_os("XTASK_DEV_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools.root.join("data"));
    std::fs::create_dir_all(&data)?;
    let secret = dev_var(&tools.root, "DRAIN_SECRET", random_hex)?;
    let pii_key = dev_var(&tools.root, "PII_HMAC_KEY", || {
        Ok(format!("v1:{}", random_hex()?))
    })?;

    if std::env::var_os("COLLECTOR_AGENT_BIN").is_none() {
        eprintln!("xtask dev: building the agent");
    }
    let agent_bin = collector_e2e::agent_binary(&tools.root)?;

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("install signal handler")?;

    let edge_port = port_or_free("XTASK_DEV_EDGE_PORT", 8787);
    let mut edge = LocalEdge::start(EdgeOptions {
        vars: vec![
            ("DRAIN_SECRET".into(), secret.clone()),
            ("PII_HMAC_KEY".into(), pii_key.clone()),
            ("DEV_MODE".into(), "true".into()),
        ],
        persist_dir: data.join("edge-state"),
        port: edge_port,
        log_file: data.join("wrangler.log"),
    })?;

    // A local server standing in for the SMS provider (Twilio's Messages API): every
    // text the agent sends is printed and appended to data/sms.log.
    let sms_log = data.join("sms.log");
    let sms = {
        let log = sms_log.clone();
        collector_e2e::recorder::Recorder::start_with(0, move |r| {
            let form = r.form();
            let field = |k: &str| {
                form.iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let line = format!("SMS to {}: {}", field("To"), field("Body"));
            eprintln!("xtask dev: {line}");
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
            {
                let _ = writeln!(f, "{line}");
            }
        })?
    };
    // The agent's admin address: `sql`, privacy requests and the consent dashboard.
    let admin_port = port_or_free("XTASK_DEV_ADMIN_PORT", 8790);
    let agent_config = data.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "# Written by `cargo xtask dev`.\nedge_url = \"{}\"\ndrain_secret = \"{secret}\"\npoll_interval_ms = 1000\naudiences = \"{}\"\nprivacy = \"{}\"\naudience_interval_ms = 10000
# The development key (examples/dev-seal.key), which privacy.toml seals phones and emails to.
seal_key_env = \"COLLECTOR_SEAL_KEY\"
# The edge's PII key, so privacy requests can name a person by email.
pii_key_env = \"COLLECTOR_PII_KEY\"
admin_addr = \"127.0.0.1:{admin_port}\"

[warehouse]\npath = \"warehouse.duckdb\"

# The cart-abandonment SMS, through a local stand-in for Twilio (texts go to {}).
[[destinations]]
name = \"cart_sms\"
kind = \"twilio\"
base_url = \"{}\"
account = \"ACdev\"
secret_env = \"TWILIO_AUTH_TOKEN\"
from = \"+15005550006\"
message = \"You left something in your cart: https://shop.example/cart\"
audiences = [\"cart_abandoners_15m\"]
",
            edge.url,
            tools.root.join("audiences.toml").display(),
            tools.root.join("privacy.toml").display(),
            sms_log.display(),
            sms.url,
        ),
    )?;
    let seal_key = std::fs::read_to_string(tools.root.join("examples/dev-seal.key"))?
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .context("examples/dev-seal.key holds no key")?
        .trim()
        .to_string();
    let agent_log = std::fs::File::create(data.join("agent.log"))?;
    let mut agent = {
        let mut cmd = Command::new(&agent_bin);
        cmd.args(["run", "--config"])
            .arg(&agent_config)
            .env("COLLECTOR_SEAL_KEY", &seal_key)
            .env("COLLECTOR_PII_KEY", &pii_key)
            .env("TWILIO_AUTH_TOKEN", "dev-token")
            .stdin(Stdio::null())
            .stdout(agent_log.try_clone()?)
            .stderr(agent_log);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        cmd.spawn().context("start the agent")?
    };

    let demo_port = port_or_free("XTASK_DEV_DEMO_PORT", 8080);
    // The demo page embeds the built snippet, which loads the SDK from the edge.
    let mut demo = PageServer::start(
        &tools.root.join("sdk-js/demo"),
        demo_port,
        sdk_page_vars(&tools.root, &edge.url, DEV_WRITE_KEY)?,
    )?;

    println!("edge_url={}", edge.url);
    println!("write_key={DEV_WRITE_KEY}");
    println!("agent_config={}", agent_config.display());
    println!("demo_url=http://127.0.0.1:{demo_port}/");
    println!("warehouse={}", data.join("warehouse.duckdb").display());
    println!(
        "try={} sql --config {} \"SELECT event_text, user_id, anonymous_id, timestamp FROM tracks ORDER BY timestamp DESC LIMIT 10\"",
        agent_bin.display(),
        agent_config.display()
    );
    println!(
        "profile={} profile demo-user --config {}",
        agent_bin.display(),
        agent_config.display()
    );
    println!(
        "audience={} audience preview pricing_no_purchase_7d --config {}",
        agent_bin.display(),
        agent_config.display()
    );
    println!("sms_log={}", sms_log.display());
    println!("dashboard_url=http://127.0.0.1:{admin_port}/dashboard");
    println!(
        "erase={} privacy request erase --user-id demo-user --config {}",
        agent_bin.display(),
        agent_config.display()
    );
    println!("ready");
    let _ = std::io::stdout().flush();
    eprintln!(
        "\nOpen {} and click; the agent loads events within seconds. Logs: {}. Ctrl-C stops everything.",
        format_args!("http://127.0.0.1:{demo_port}/"),
        data.display()
    );

    loop {
        match stop_rx.recv_timeout(Duration::from_millis(500)) {
            Ok(()) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = agent.try_wait()? {
                    eprintln!(
                        "xtask dev: the agent exited ({status}); see {}",
                        data.join("agent.log").display()
                    );
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    eprintln!("xtask dev: stopping");
    demo.stop();
    stop_child(&mut agent);
    drop(sms);
    edge.stop();
    eprintln!("xtask dev: stopped");
    Ok(())
}

fn stop_child(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-s", "TERM", "--", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
