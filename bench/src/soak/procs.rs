//! The processes under test: one `redis-server` and two tokengate replicas
//! on fixed loopback ports (picked free at start, kept across restarts so
//! clients always know where to go), each incarnation's stdout and stderr
//! captured to a file of its own for the log checks.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::wire;
use crate::Result;

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sends SIGTERM through `kill(1)` (the harness has no libc binding, and a
/// process-management dependency is not worth one signal).
async fn sigterm(pid: u32) -> Result<()> {
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
    if !status.success() {
        return Err(format!("kill -TERM {pid} failed: {status}").into());
    }
    Ok(())
}

/// Both output streams of a child into one new file.
fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let f = File::create(path)?;
    let g = f.try_clone()?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// The redis-server both replicas share.
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    program: String,
    /// AOF with `appendfsync always` instead of no persistence at all.
    persist: bool,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Redis {
    /// Describes (does not start) a redis-server.
    pub fn new(program: String, persist: bool, dir: PathBuf) -> Result<Self> {
        Ok(Self { port: free_port()?, program, persist, dir, child: None, starts: 0 })
    }

    /// `redis://` URL for the replicas.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// What the deploy files use (`--save "" --appendonly no`), unless the
    /// persisted case was asked for.
    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["--port".into(), self.port.to_string(), "--bind".into(), "127.0.0.1".into()];
        a.extend(["--save".into(), String::new()]);
        if self.persist {
            a.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            a.extend(["--appendonly", "no"].map(String::from));
        }
        a.extend(["--dir".into(), self.dir.display().to_string()]);
        a
    }

    /// Starts it and waits for `PONG`.
    pub async fn start(&mut self) -> Result<()> {
        self.starts += 1;
        let (out, err) = log_file(&self.dir.join(format!("redis.{}.log", self.starts)))?;
        let child =
            Command::new(&self.program).args(self.args()).stdout(out).stderr(err).kill_on_drop(true).spawn().map_err(
                |e| {
                    format!(
                        "cannot run {} ({e}): install redis-server (Debian: apt-get install redis-server)",
                        self.program
                    )
                },
            )?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("redis-server did not answer on port {} within 10 s", self.port).into())
    }

    /// SIGTERM (a clean shutdown: it writes its AOF when persisting), then
    /// waits for the exit.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                sigterm(pid).await?;
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                child.kill().await?;
            }
        }
        Ok(())
    }
}

async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt).await.ok().flatten().unwrap_or(false)
}

/// One tokengate replica.
pub struct Replica {
    /// `a` or `b` (log file names, reports).
    pub name: &'static str,
    /// Its address, the same for every incarnation.
    pub addr: SocketAddr,
    binary: PathBuf,
    args: Vec<String>,
    secret: String,
    dir: PathBuf,
    child: Option<Child>,
    /// When the current incarnation was spawned (its periodic sweep of
    /// expired streams ticks from about then).
    pub started: Option<Instant>,
    /// Log files of every incarnation, in order.
    pub logs: Vec<PathBuf>,
}

impl Replica {
    /// Describes (does not start) a replica.
    pub fn new(name: &'static str, binary: PathBuf, args: Vec<String>, secret: String, dir: PathBuf) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        Ok(Self { name, addr, binary, args, secret, dir, child: None, started: None, logs: Vec::new() })
    }

    /// Its PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts a new incarnation (the secret goes through the environment,
    /// never the command line) and waits until `/readyz` answers 200.
    pub async fn start(&mut self) -> Result<()> {
        let path = self.dir.join(format!("replica-{}.{}.log", self.name, self.logs.len() + 1));
        let (out, err) = log_file(&path)?;
        self.logs.push(path);
        let child = Command::new(&self.binary)
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&self.args)
            .env("TOKENGATE_JWT_SECRET", &self.secret)
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {} ({e}); build it or pass --binary", self.binary.display()))?;
        self.child = Some(child);
        self.started = Some(Instant::now());
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Waits until `/readyz` answers 200 (it answers 503 until Redis has
    /// answered, and while Redis is away).
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let req = wire::Request { method: "GET", path: "/readyz", token: None, last_event_id: None, json: None };
        while Instant::now() < deadline {
            if let Ok((200, _)) = wire::call(self.addr, &req, Duration::from_secs(1)).await {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("replica {} exited during start-up ({status})", self.name).into());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(format!("replica {} not ready within {limit:?}", self.name).into())
    }

    /// SIGKILL: no drain, no goodbye; its leases just stop being renewed.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the drain to finish; the exit status (a drain
    /// that does not exit 0 within `limit` is a failure of the soak).
    pub async fn drain(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else { return Err("replica not running".into()) };
        let pid = child.id().ok_or("replica already exited")?;
        sigterm(pid).await?;
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                child.kill().await?;
                Err(format!("replica {} did not exit within {limit:?} of SIGTERM", self.name).into())
            }
        }
    }

    /// Stops it at the end of the run (SIGTERM, as an operator would).
    pub async fn stop(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.drain(Duration::from_secs(30)).await?;
        }
        Ok(())
    }
}
