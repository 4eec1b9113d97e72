//! A small disk for one command: a tmpfs of a few MiB mounted on a folder inside a user
//! and mount namespace of its own (`unshare -Urm`, util-linux; no privileges needed),
//! so a test can fill the disk under a running agent and free it again. The mount lives
//! as long as the namespace: nothing is left mounted after the test, even after a
//! panic. The test reaches the disk through `/proc/<pid>/root` of the namespace's shell;
//! when the command exits, the shell copies what the disk holds to a folder the test
//! sees.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The namespace's shell: mounts the disk, runs the command in the background (its
/// pid in `$4`, so the test can signal it), waits for it, copies the disk out.
const SHELL: &str = r#"mib=$1 dir=$2 out=$3 pidfile=$4
shift 4
mount -t tmpfs -o "size=${mib}m" tmpfs "$dir" || exit 97
"$@" &
child=$!
echo "$child" > "$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
wait "$child"
rc=$?
cp -a "$dir"/. "$out"/ || exit 98
exit $rc
"#;

pub struct SmallDisk {
    shell: Child,
    /// The command's pid (a child of the shell, in the test's pid namespace).
    pid: u32,
    /// Where the disk is mounted, as the command sees it.
    dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB on `dir` (an existing folder) in a new namespace and
    /// runs `cmd` there; when `cmd` exits, what the disk holds is copied to `out` (an
    /// existing folder).
    pub fn run(dir: &Path, mib: u32, out: &Path, cmd: &Command) -> anyhow::Result<SmallDisk> {
        let pidfile = out.with_extension("pid");
        let mut c = Command::new("unshare");
        c.args(["-Urm", "sh", "-c", SHELL, "small-disk"])
            .arg(mib.to_string())
            .arg(dir)
            .arg(out)
            .arg(&pidfile)
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let mut shell = c.spawn().context("unshare (util-linux)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break pid;
            }
            if let Some(status) = shell.try_wait()? {
                bail!("the small disk's shell exited ({status}): can this machine create user namespaces?");
            }
            if Instant::now() > deadline {
                let _ = shell.kill();
                bail!("the small disk's command did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(SmallDisk {
            shell,
            pid,
            dir: dir.to_path_buf(),
        })
    }

    /// `rel` on the disk, as the test reaches it.
    pub fn path(&self, rel: &str) -> PathBuf {
        let inside = self.dir.strip_prefix("/").unwrap_or(&self.dir);
        PathBuf::from(format!("/proc/{}/root", self.shell.id()))
            .join(inside)
            .join(rel)
    }

    /// Fills the disk: writes `filler` until the disk has no room left, then gives
    /// `leave` bytes back. The bytes `filler` holds.
    pub fn fill(&self, leave: u64) -> anyhow::Result<u64> {
        let mut f = std::fs::File::create(self.path("filler"))?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
        // The last partial page too.
        while let Ok(n) = f.write(&chunk[..1]) {
            if n == 0 {
                break;
            }
            written += 1;
        }
        let kept = written.saturating_sub(leave);
        f.set_len(kept)?;
        Ok(kept)
    }

    /// Frees what [`SmallDisk::fill`] took.
    pub fn free(&self) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.path("filler"))?)
    }

    /// Stops the command with SIGTERM; its exit status once the disk is copied out.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.pid.to_string()])
            .status();
        Ok(self.shell.wait()?)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let Ok(None) = self.shell.try_wait() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", &self.pid.to_string()])
                .status();
            let _ = self.shell.kill();
            let _ = self.shell.wait();
        }
    }
}
