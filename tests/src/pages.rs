//! A small static web server on loopback for pages that embed the SDK: the browser
//! tests' pages and `cargo xtask dev`'s demo page. `{{NAME}}` placeholders in HTML files
//! are replaced (the built snippet, the edge URL, the write key). Stops when dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct PageServer {
    pub url: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PageServer {
    /// Serves the files below `root` on `127.0.0.1:port` (0 = a free port).
    pub fn start(
        root: &Path,
        port: u16,
        vars: Vec<(String, String)>,
    ) -> anyhow::Result<PageServer> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let url = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_path_buf();
        let flag = stop.clone();
        let vars = Arc::new(vars);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (root, vars) = (root.clone(), vars.clone());
                        std::thread::spawn(move || {
                            let _ = answer(stream, &root, &vars);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(PageServer {
            url,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The vars every page gets: the built snippet, the edge, the write key.
pub fn sdk_page_vars(
    root: &Path,
    edge_url: &str,
    write_key: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let snippet_path = root.join("sdk-js/dist/snippet.min.js");
    let snippet = std::fs::read_to_string(&snippet_path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}; build the SDK first (`cargo xtask build-edge`)",
            snippet_path.display()
        )
    })?;
    Ok(vec![
        ("SNIPPET".into(), snippet.trim().to_string()),
        ("API_HOST".into(), edge_url.to_string()),
        ("WRITE_KEY".into(), write_key.to_string()),
    ])
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("css") => "text/css",
        _ => "application/octet-stream",
    }
}

fn answer(stream: TcpStream, root: &Path, vars: &[(String, String)]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let rel = if path.ends_with('/') {
        format!("{path}index.html")
    } else {
        path.to_string()
    };
    let file: Option<PathBuf> = if rel.split('/').any(|seg| seg == "..") {
        None
    } else {
        Some(root.join(rel.trim_start_matches('/')))
    };
    let mut stream = stream;
    match file.filter(|f| f.is_file()) {
        Some(f) => {
            let mut body = std::fs::read(&f)?;
            if f.extension().is_some_and(|e| e == "html") {
                let mut text = String::from_utf8_lossy(&body).into_owned();
                for (k, v) in vars {
                    text = text.replace(&format!("{{{{{k}}}}}"), v);
                }
                body = text.into_bytes();
            }
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                content_type(&f),
                body.len()
            )?;
            stream.write_all(&body)
        }
        None => {
            let body = b"not found";
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(body)
        }
    }
}
