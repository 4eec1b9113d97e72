//! `collector-agent`: parses flags and config, then calls into the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use collector_agent::sinks::duckdb::DuckDbSink;
use collector_agent::sinks::QueryResult;
use collector_agent::{admin, drain_once, run, AgentConfig};

#[derive(Parser)]
#[command(
    name = "collector-agent",
    version,
    about = "Drains the edge collector into your warehouse"
)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// pipelines. `RUST_LOG` sets the level (default `info`).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drain every shard into the warehouse, until stopped (SIGINT/SIGTERM).
    Run {
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
        /// Drain until the edge is empty, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Query the warehouse: through the running agent if there is one, else the file.
    Sql {
        /// The SQL to run.
        query: String,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
        /// Print CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// Per shard, the backlog at the edge and the lag; the last load, quarantined
    /// events and dead letters in the warehouse.
    Status {
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Print the edge's queue depth and dropped-event counts by reason.
    Stats {
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Tools for the privacy rules file.
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// Check a config file: every problem named by its key; with `--connect`, also reach
    /// the edge and the warehouse.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Load again what could not be loaded: dead letters whose batch decodes now (after
    /// an upgrade), then quarantined events (all, or the given message ids).
    Replay {
        message_ids: Vec<String>,
        /// Instead: send a destination's dead letters again (from now on, with consent
        /// checked again).
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// The key pair for sealed contact fields (`action = "encrypt"` in privacy.toml).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Destinations (`[[destinations]]`): test one, or see what its next sync would do.
    Destinations {
        #[command(subcommand)]
        command: DestinationsCommand,
    },
    /// Audiences (`audiences.toml`): check the file, preview one.
    Audience {
        #[command(subcommand)]
        command: AudienceCommand,
    },
    /// One person, found by any of their ids: ids, traits, consent, latest events.
    Profile {
        /// A user id, anonymous id, hashed email or person_id.
        id: String,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Events the warehouse refused: kept with their reason in the `quarantine` table.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Parse and validate the config (unknown keys are errors).
    Check {
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
        /// Also connect to the edge (signed `/drain/info`) and open the warehouse.
        #[arg(long)]
        connect: bool,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// List the quarantined events and why.
    List {
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Load quarantined events again (all, or the given message ids), e.g. after fixing
    /// the warehouse or the event (`UPDATE quarantine SET event = ...`). Those that load
    /// leave the quarantine; the others stay with their new reason.
    Replay {
        message_ids: Vec<String>,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new key pair: the secret goes in the agent's environment only, the
    /// public key in privacy.toml's `[pii] seal_to`.
    Generate,
}

#[derive(Subcommand)]
enum DestinationsCommand {
    /// Send one signed call that changes nothing and print the answer.
    Test {
        name: String,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Print what the next sync would send, add and remove, and how many consent
    /// withholds, without sending or writing anything.
    DryRun {
        name: String,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AudienceCommand {
    /// Validate an audiences file; prints every problem with its line. With
    /// `--privacy`, `requires` must name that file's consent categories.
    Check {
        #[arg(default_value = "audiences.toml")]
        file: PathBuf,
        #[arg(long)]
        privacy: Option<PathBuf>,
    },
    /// The audience's size now and a sample of its members.
    Preview {
        name: String,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// Validate a rules file; prints every problem with its line.
    Check { policy: PathBuf },
    /// Show what a rules file would keep, drop, anonymise and hash for a JSONL file of
    /// events (`{"event": {...}, "country": "FR", "gpc": true, ...}` per line).
    DryRun {
        policy: PathBuf,
        events: PathBuf,
        /// Hash with this key (`VERSION:SECRET`) instead of a throw-away one.
        #[arg(long)]
        key: Option<String>,
    },
    /// A person's request: erase, suppress, unsuppress or export; its status; the list.
    Request {
        #[command(subcommand)]
        command: RequestCommand,
    },
}

#[derive(Subcommand)]
enum RequestCommand {
    /// Erase the person (all their ids, through the identity graph) from the
    /// warehouse, the edge queue and the destinations that can delete, and suppress
    /// their ids at the edge.
    Erase(SubjectArgs),
    /// Stop collecting about them: the edge drops their events before storing them.
    Suppress(SubjectArgs),
    /// Lift a suppression.
    Unsuppress(SubjectArgs),
    /// Everything stored about them, as one JSON document (stdout, or --out).
    Export {
        #[command(flatten)]
        subject: SubjectArgs,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// A request's audit trail: each store's status with the rows before and after.
    Status {
        id: String,
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Every request, newest first.
    List {
        #[arg(long, default_value = "agent.toml")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct SubjectArgs {
    #[arg(long = "user-id")]
    user_id: Vec<String>,
    #[arg(long = "anonymous-id")]
    anonymous_id: Vec<String>,
    /// Matched through the edge's keyed hash (needs pii_key_env).
    #[arg(long)]
    email: Vec<String>,
    /// Your id for the request (a ticket number): submitting it again returns the
    /// stored request.
    #[arg(long)]
    id: Option<String>,
    #[arg(long, default_value = "agent.toml")]
    config: PathBuf,
    /// Return once the request is stored, without waiting for it to finish.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for it to finish.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: the allocators read their settings at process start.
    collector_agent::memory::reexec_with_settings();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
        .and_then(|rt| rt.block_on(agent_main()));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes, one line each: an error the agent expects (a
            // setting, a server that refused) is no crash, so no stack trace, even
            // with `RUST_BACKTRACE` set (a panic still prints one).
            eprintln!("Error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn agent_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::Run { config, once } => {
            let cfg = AgentConfig::load(&config)?;
            if once {
                let s = drain_once(&cfg).await?;
                println!(
                    "drained batches={} events={} inserted={} duplicates={} quarantined={} dead_letters={}",
                    s.batches, s.events, s.inserted, s.duplicates, s.quarantined, s.dead_letters
                );
                return Ok(());
            }
            run(cfg, shutdown_signal()).await
        }
        Command::Sql { query, config, csv } => {
            let cfg = AgentConfig::load(&config)?;
            let result = sql(&cfg, query).await?;
            print!(
                "{}",
                if csv {
                    to_csv(&result)
                } else {
                    to_table(&result)
                }
            );
            Ok(())
        }
        Command::Audience {
            command: AudienceCommand::Check { file, privacy },
        } => {
            let cats = match &privacy {
                Some(p) => Some(
                    collector_agent::privacy_cli::load(p)
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .categories
                        .into_iter()
                        .map(|c| c.name)
                        .collect::<Vec<_>>(),
                ),
                None => None,
            };
            match collector_agent::audiences::load(&file, cats.as_deref()) {
                Ok(list) => {
                    println!(
                        "{}: OK ({} audiences: {})",
                        file.display(),
                        list.len(),
                        list.iter()
                            .map(|a| a.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    Ok(())
                }
                Err(problems) => {
                    eprintln!("{problems}");
                    std::process::exit(1);
                }
            }
        }
        Command::Audience {
            command: AudienceCommand::Preview { name, config },
        } => {
            let cfg = AgentConfig::load(&config)?;
            let list = cfg.load_audiences()?;
            let Some(a) = list.iter().find(|a| a.name == name) else {
                anyhow::bail!(
                    "no audience {name:?} in {} (audiences: {})",
                    cfg.audiences
                        .as_deref()
                        .map_or("(no audiences file)".into(), |p| p.display().to_string()),
                    list.iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let dialect = cfg.warehouse.people_dialect();
            let members =
                collector_agent::audiences::members_sql(a, dialect, collector_agent::now_ms());
            let size = sql(
                &cfg,
                format!("SELECT count(DISTINCT person_id) AS members FROM ({members}) m"),
            )
            .await?;
            let sample = sql(
                &cfg,
                format!(
                    "SELECT p.person_id, CAST(p.user_ids AS VARCHAR) AS user_ids, p.last_seen, p.event_count
                     FROM profiles p WHERE p.person_id IN (SELECT person_id FROM ({members}) m)
                     ORDER BY p.last_seen DESC, p.person_id LIMIT 10"
                ),
            )
            .await?;
            println!(
                "{name}: {} members{}",
                size.rows
                    .first()
                    .and_then(|r| r[0].clone())
                    .unwrap_or_default(),
                a.description
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            );
            print!("{}", to_table(&sample));
            Ok(())
        }
        Command::Profile { id, config, json } => {
            let cfg = AgentConfig::load(&config)?;
            let found = collector_agent::identity::profile::lookup(
                cfg.warehouse.people_dialect(),
                &id,
                |q| sql(&cfg, q),
            )
            .await?;
            match found {
                Some(p) if json => println!("{}", serde_json::to_string_pretty(&p)?),
                Some(p) => print!("{}", p.to_text()),
                None => anyhow::bail!("no person has the id {id:?}"),
            }
            Ok(())
        }
        Command::Replay {
            destination: Some(name),
            config,
            ..
        } => {
            let cfg = AgentConfig::load(&config)?;
            let (d, _) = destination(&cfg, &name)?;
            let dialect = cfg.warehouse.people_dialect();
            let (count, update) = collector_agent::destinations::outbox::replay_dead_sql(
                dialect,
                &d.name,
                collector_agent::now_ms(),
            );
            let n = sql(&cfg, count).await?;
            write_sql(&cfg, update).await?;
            println!(
                "{name}: {} dead letters will be sent again at the next sync",
                n.rows
                    .first()
                    .and_then(|r| r[0].clone())
                    .unwrap_or_else(|| "0".into())
            );
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Generate,
        } => {
            let (secret, public) =
                collector_core::seal::OpenKey::generate_from(|b| getrandom::getrandom(b).is_ok())
                    .context("the system's random source failed")?;
            println!("# The agent's secret key. Only in the agent's environment (agent.toml: seal_key_env = \"COLLECTOR_SEAL_KEY\"); never in a file you commit.");
            println!("COLLECTOR_SEAL_KEY={secret}");
            println!();
            println!("# The public key, for privacy.toml (the edge seals to it):");
            println!("[pii]");
            println!("seal_to = \"{public}\"");
            Ok(())
        }
        Command::Destinations {
            command: DestinationsCommand::Test { name, config },
        } => {
            let cfg = AgentConfig::load(&config)?;
            let (d, _) = destination(&cfg, &name)?;
            let dest = collector_agent::destinations::open(d)?;
            match dest.test().await {
                Ok(answer) => {
                    println!("{name} ({}) answered {answer}", d.base_url);
                    Ok(())
                }
                Err(e) => anyhow::bail!("{name} ({}): {e}", d.base_url),
            }
        }
        Command::Destinations {
            command: DestinationsCommand::DryRun { name, config, json },
        } => {
            let cfg = AgentConfig::load(&config)?;
            let (d, categories) = destination(&cfg, &name)?;
            let dest = collector_agent::destinations::open(d)?;
            let contacts = cfg.contacts()?;
            let target = collector_agent::destinations::sync::Target {
                cfg: d,
                dest: dest.as_ref(),
                categories: &categories,
                contacts: contacts.as_ref(),
            };
            let mut session = CliSession {
                dialect: cfg.warehouse.people_dialect(),
                cfg: &cfg,
            };
            let r = collector_agent::destinations::sync::dry_run(
                &mut session,
                &target,
                collector_agent::now_ms(),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!(
                "{name}: would add {}, remove {}, forward {} events; consent withholds {} (entries whose stay ended: {}, retries among them: {})",
                r.add.len(),
                r.remove.len(),
                r.events.len(),
                r.withheld,
                r.superseded,
                r.retries
            );
            for (what, list) in [("add", &r.add), ("remove", &r.remove), ("event", &r.events)] {
                for x in list.iter().take(20) {
                    println!("  {what:<6} {x}");
                }
                if list.len() > 20 {
                    println!("  … and {} more", list.len() - 20);
                }
            }
            Ok(())
        }
        Command::Replay {
            message_ids,
            config,
            destination: None,
        } => {
            let cfg = AgentConfig::load(&config)?;
            let state = cfg.warehouse.state_file();
            let spinner = indicatif::ProgressBar::new_spinner();
            spinner.set_message("replaying through the running agent");
            spinner.enable_steady_tick(std::time::Duration::from_millis(120));
            let via_agent = admin::replay_all_running_agent(&state, &message_ids).await?;
            spinner.finish_and_clear();
            let r = match via_agent {
                Some(r) => r,
                None => {
                    let sink = collector_agent::sinks::open(&cfg.warehouse)
                        .await
                        .context("open the warehouse")?;
                    let bar = indicatif::ProgressBar::new(0);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "dead letters {bar:40} {pos}/{len}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    let progress = |done: u64, total: u64| {
                        bar.set_length(total);
                        bar.set_position(done);
                    };
                    let r =
                        collector_agent::sinks::replay_all(&*sink, &message_ids, &progress).await?;
                    bar.finish_and_clear();
                    r
                }
            };
            println!(
                "replayed: dead letters loaded={} still_dead={}; events inserted={} duplicates={} still_quarantined={}",
                r.dead_letters_loaded,
                r.dead_letters_left,
                r.loads.inserted,
                r.loads.duplicates,
                r.loads.quarantined
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config, connect },
        } => {
            let cfg =
                match AgentConfig::load(&config).and_then(|c| c.validate_secrets().map(|()| c)) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{e}");
                        std::process::exit(1);
                    }
                };
            let warehouse = match &cfg.warehouse {
                collector_agent::config::WarehouseConfig::DuckDb(d) => {
                    format!("duckdb {}", d.path.display())
                }
                collector_agent::config::WarehouseConfig::Postgres(p) => {
                    let tls = p
                        .driver_config()
                        .map(|(_, t)| t.describe())
                        .unwrap_or_default();
                    format!("postgres {} (schema {}, {tls})", p.url, p.schema)
                }
                collector_agent::config::WarehouseConfig::Parquet(p) => {
                    format!("parquet {}", p.path.display())
                }
                collector_agent::config::WarehouseConfig::ClickHouse(c) => {
                    format!("clickhouse {} (database {})", c.url, c.database)
                }
            };
            println!(
                "{}: OK (edge {}, warehouse {warehouse})",
                config.display(),
                cfg.edge_url
            );
            if connect {
                let client = collector_agent::edge::EdgeClient::new(&cfg)?;
                match client.info().await {
                    Ok(i) => println!("edge: OK ({} shards, formats {:?})", i.shards, i.formats),
                    Err(e) => {
                        eprintln!("edge: {e}");
                        std::process::exit(1);
                    }
                }
                match collector_agent::sinks::open(&cfg.warehouse).await {
                    Ok(s) => println!("warehouse: OK ({}, schema up to date)", s.kind()),
                    Err(e) => {
                        eprintln!("warehouse: {e}");
                        std::process::exit(1);
                    }
                }
            }
            Ok(())
        }
        Command::Quarantine {
            command: QuarantineCommand::List { config },
        } => {
            let cfg = AgentConfig::load(&config)?;
            let q = "SELECT message_id, type, shard, batch_id, reason, attempts, quarantined_at FROM quarantine ORDER BY quarantined_at, message_id";
            print!("{}", to_table(&sql(&cfg, q.into()).await?));
            Ok(())
        }
        Command::Quarantine {
            command:
                QuarantineCommand::Replay {
                    message_ids,
                    config,
                },
        } => {
            let cfg = AgentConfig::load(&config)?;
            let state = cfg.warehouse.state_file();
            let s = match admin::replay_running_agent(&state, &message_ids).await? {
                Some(s) => s,
                None => {
                    let sink = collector_agent::sinks::open(&cfg.warehouse)
                        .await
                        .context("open the warehouse")?;
                    sink.replay_quarantine(&message_ids).await?
                }
            };
            println!(
                "replayed: inserted={} duplicates={} still_quarantined={}",
                s.inserted, s.duplicates, s.quarantined
            );
            Ok(())
        }
        Command::Privacy {
            command: PrivacyCommand::Request { command },
        } => privacy_request(command).await,
        Command::Privacy { command } => {
            let result = match command {
                PrivacyCommand::Request { .. } => unreachable!("handled above"),
                PrivacyCommand::Check { policy } => collector_agent::privacy_cli::check(&policy),
                PrivacyCommand::DryRun {
                    policy,
                    events,
                    key,
                } => collector_agent::privacy_cli::dry_run(&policy, &events, key.as_deref()),
            };
            match result {
                Ok(report) => {
                    print!("{report}");
                    Ok(())
                }
                Err(problems) => {
                    eprintln!("{problems}");
                    std::process::exit(1);
                }
            }
        }
        Command::Status { config } => {
            let cfg = AgentConfig::load(&config)?;
            let client = collector_agent::edge::EdgeClient::new(&cfg)?;
            // Each side on its own: an edge that cannot be reached is when the
            // warehouse's side matters most, and the other way round.
            let (edge, warehouse) = tokio::join!(
                async {
                    client
                        .stats()
                        .await
                        .map_err(|e| collector_agent::causes(&e))
                },
                async {
                    sql(&cfg, collector_agent::status::WAREHOUSE_SQL.into())
                        .await
                        .map_err(|e| collector_agent::causes(e.as_ref()))
                }
            );
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            let status = collector_agent::status::Status::gather(now_ms, edge, warehouse);
            println!("{status}");
            if let Some(missing) = status.missing() {
                anyhow::bail!("status incomplete: {missing}");
            }
            Ok(())
        }
        Command::Stats { config } => {
            let cfg = AgentConfig::load(&config)?;
            let client = collector_agent::edge::EdgeClient::new(&cfg)?;
            println!("{}", serde_json::to_string_pretty(&client.stats().await?)?);
            Ok(())
        }
    }
}

async fn privacy_request(command: RequestCommand) -> anyhow::Result<()> {
    use collector_agent::privacy::{cli, Kind, NewRequest};
    let (kind, args, out) = match command {
        RequestCommand::Status { id, config, json } => {
            let r = cli::status(&AgentConfig::load(&config)?, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.render());
            }
            return Ok(());
        }
        RequestCommand::List { config } => {
            for r in cli::list(&AgentConfig::load(&config)?).await? {
                println!(
                    "{}  {:<10} {:<10} {}  {}",
                    r.id,
                    r.kind.as_str(),
                    r.status,
                    r.received_at,
                    r.requested_by
                );
            }
            return Ok(());
        }
        RequestCommand::Erase(a) => (Kind::Erase, a, None),
        RequestCommand::Suppress(a) => (Kind::Suppress, a, None),
        RequestCommand::Unsuppress(a) => (Kind::Unsuppress, a, None),
        RequestCommand::Export { subject, out } => (Kind::Export, subject, out),
    };
    let cfg = AgentConfig::load(&args.config)?;
    let new = NewRequest {
        kind: Some(kind),
        id: args.id.clone(),
        user_ids: args.user_id.clone(),
        anonymous_ids: args.anonymous_id.clone(),
        emails: args.email.clone(),
        requested_by: None,
    };
    let wait = (!args.no_wait).then(|| std::time::Duration::from_secs(args.timeout_s));
    let (request, document) = cli::submit(&cfg, new, wait).await?;
    if let Some(doc) = document {
        let text = serde_json::to_string_pretty(&doc)?;
        match out {
            Some(path) => {
                std::fs::write(&path, text)?;
                eprintln!(
                    "request {}: export written to {}",
                    request.id,
                    path.display()
                );
            }
            None => println!("{text}"),
        }
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&request)?);
    } else {
        print!("{}", request.render());
    }
    if wait.is_some() && !request.is_finished() {
        anyhow::bail!(
            "request {} is still {} after {} s; `privacy request status {}` follows it",
            request.id,
            request.status,
            args.timeout_s,
            request.id
        );
    }
    Ok(())
}

/// Runs a query through the running agent if there is one, else on the warehouse.
async fn sql(cfg: &AgentConfig, query: String) -> anyhow::Result<QueryResult> {
    if let Some(r) = admin::query_running_agent(&cfg.warehouse.state_file(), &query).await? {
        return Ok(r);
    }
    match cfg.warehouse.duckdb_path() {
        // No agent holds the file: read it directly, read-only.
        Some(path) => {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || -> anyhow::Result<QueryResult> {
                let conn = DuckDbSink::open_read_only(&path)
                    .with_context(|| format!("open {}", path.display()))?;
                collector_agent::sinks::duckdb::run_query(&conn, &query)
                    .map_err(|e| anyhow::anyhow!(e.query_error()))
            })
            .await?
        }
        // A server takes any number of clients.
        None => {
            let sink = collector_agent::sinks::open(&cfg.warehouse)
                .await
                .context("open the warehouse")?;
            sink.query(&query)
                .await
                .map_err(|e| anyhow::anyhow!(e.query_error()))
        }
    }
}

/// A destination of the config with the consent categories the policy requires for it.
fn destination<'a>(
    cfg: &'a AgentConfig,
    name: &str,
) -> anyhow::Result<(
    &'a collector_agent::destinations::DestinationConfig,
    Vec<String>,
)> {
    let d = cfg
        .destinations
        .iter()
        .find(|d| d.name == name)
        .with_context(|| {
            format!(
                "no destination {name:?} in the config (destinations: {})",
                cfg.destinations
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let categories = cfg
        .policy()?
        .and_then(|p| p.destinations.get(name).cloned())
        .with_context(|| {
            format!(
                "privacy.toml has no [destinations.{name}]: it receives nothing (deny by default)"
            )
        })?;
    Ok((d, categories))
}

/// Runs a statement that writes: through the running agent if there is one, else on
/// the warehouse opened for writing.
async fn write_sql(cfg: &AgentConfig, query: String) -> anyhow::Result<QueryResult> {
    if let Some(r) = admin::query_running_agent(&cfg.warehouse.state_file(), &query).await? {
        return Ok(r);
    }
    let sink = collector_agent::sinks::open(&cfg.warehouse)
        .await
        .context("open the warehouse")?;
    Ok(sink.query(&query).await?)
}

/// Read-only SQL for library code that takes a session, through [`sql`] (the running
/// agent, or the warehouse directly).
struct CliSession<'a> {
    cfg: &'a AgentConfig,
    dialect: collector_agent::sinks::Dialect,
}

#[async_trait::async_trait]
impl collector_agent::sinks::SqlSession for CliSession<'_> {
    fn dialect(&self) -> collector_agent::sinks::Dialect {
        self.dialect
    }
    async fn execute(&mut self, _: &str) -> Result<u64, collector_agent::sinks::SinkError> {
        Err(read_only())
    }
    async fn batch(&mut self, _: &str) -> Result<(), collector_agent::sinks::SinkError> {
        Err(read_only())
    }
    async fn query(&mut self, q: &str) -> Result<QueryResult, collector_agent::sinks::SinkError> {
        sql(self.cfg, q.to_string())
            .await
            .map_err(|e| collector_agent::sinks::SinkError::Permanent(e.to_string()))
    }
    async fn insert(
        &mut self,
        _: &str,
        _: Vec<Vec<Option<String>>>,
    ) -> Result<(), collector_agent::sinks::SinkError> {
        Err(read_only())
    }
}

fn read_only() -> collector_agent::sinks::SinkError {
    collector_agent::sinks::SinkError::Permanent("this command only reads".into())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn to_csv(r: &QueryResult) -> String {
    let mut out = r
        .columns
        .iter()
        .map(|c| csv_field(c))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in &r.rows {
        let line: Vec<String> = row
            .iter()
            .map(|v| v.as_deref().map(csv_field).unwrap_or_default())
            .collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

fn to_table(r: &QueryResult) -> String {
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
    let mut widths: Vec<usize> = r.columns.iter().map(|c| c.chars().count()).collect();
    for row in &r.rows {
        for (i, v) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell(v).chars().count().min(60));
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| {
                let c: String = c.chars().take(60).collect();
                format!("{c:<w$}", w = *w)
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let sep = format!(
        "+{}+\n",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    let mut out = sep.clone();
    out.push_str(&line(r.columns.clone()));
    out.push_str(&sep);
    for row in &r.rows {
        out.push_str(&line(row.iter().map(cell).collect()));
    }
    out.push_str(&sep);
    out.push_str(&format!(
        "({} row{})\n",
        r.rows.len(),
        if r.rows.len() == 1 { "" } else { "s" }
    ));
    out
}
