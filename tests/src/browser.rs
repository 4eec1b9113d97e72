//! Debian's Chromium, driven through `tests/browser/driver.mjs` (npm playwright-core)
//! with one JSON command per line. The driver process (and the Chromium it launched) is
//! stopped when the `Browser` is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::Toolchain;

pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: std::path::PathBuf,
    /// Chromium's version, as it reports it.
    pub version: String,
}

impl Browser {
    /// Starts Chromium (headless). `log` collects the page's console and errors.
    pub fn launch(log: &std::path::Path) -> anyhow::Result<Browser> {
        let tools = Toolchain::discover();
        anyhow::ensure!(
            tools.chromium.exists(),
            "{} not found: the browser tests need Debian's chromium (`cargo xtask setup`)",
            tools.chromium.display()
        );
        let log_file = std::fs::File::create(log)?;
        let mut cmd = Command::new(&tools.node);
        cmd.arg(tools.root.join("tests/browser/driver.mjs"))
            .current_dir(&tools.root)
            .env("CHROMIUM", &tools.chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().context("start the browser driver")?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("driver stdout")?);
        let mut b = Browser {
            child,
            stdin,
            stdout,
            log: log.to_path_buf(),
            version: String::new(),
        };
        let hello = b.read_answer().context("the browser did not start")?;
        b.version = hello.as_str().unwrap_or_default().to_string();
        Ok(b)
    }

    fn read_answer(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the browser driver exited:\n{}", self.log_tail());
        }
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("driver said {line:?}"))?;
        if v["ok"] == json!(true) {
            Ok(v["value"].clone())
        } else {
            bail!(
                "browser: {}\n--- page log ---\n{}",
                v["error"].as_str().unwrap_or("?"),
                self.log_tail()
            )
        }
    }

    fn send(&mut self, cmd: Value) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        self.read_answer()
    }

    /// A fresh context (a new visitor: no cookies, no storage) with one page.
    /// `init_script` runs in every document before the page's own scripts.
    pub fn open(&mut self, init_script: Option<&str>) -> anyhow::Result<()> {
        self.send(json!({"op": "open", "initScript": init_script}))
            .map(|_| ())
    }

    pub fn goto(&mut self, url: &str) -> anyhow::Result<()> {
        self.send(json!({"op": "goto", "url": url})).map(|_| ())
    }

    pub fn reload(&mut self) -> anyhow::Result<()> {
        self.send(json!({"op": "reload"})).map(|_| ())
    }

    /// Evaluates a JavaScript expression in the page (promises are awaited).
    pub fn eval(&mut self, js: &str) -> anyhow::Result<Value> {
        self.send(json!({"op": "eval", "js": js}))
    }

    /// Polls a JavaScript expression until it is truthy; returns its value.
    pub fn wait_for(&mut self, js: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.send(json!({"op": "waitFor", "js": js, "timeoutMs": timeout.as_millis() as u64}))
    }

    /// Presses a key (`Tab`, `Enter`); the focused element after it (`tag`, `id`, `text`).
    pub fn press(&mut self, key: &str) -> anyhow::Result<Value> {
        self.send(json!({"op": "press", "key": key}))
    }

    /// Saves a PNG of the page (the whole page when `full_page`) at a viewport of
    /// `width`×`height`; its size in bytes.
    pub fn screenshot(
        &mut self,
        path: &std::path::Path,
        full_page: bool,
        width: u32,
        height: u32,
    ) -> anyhow::Result<u64> {
        let v = self.send(json!({"op": "screenshot", "path": path, "fullPage": full_page, "width": width, "height": height}))?;
        v.as_u64()
            .ok_or_else(|| anyhow::anyhow!("screenshot answered {v}"))
    }

    /// The page's console output and errors so far (for failure messages).
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Playwright kills the browsers it launched when its process is terminated.
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{pgid}")])
            .status();
        std::thread::sleep(Duration::from_secs(2));
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
    }
}
