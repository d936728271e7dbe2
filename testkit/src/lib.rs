//! Test harness shared by every crate's integration tests: starts a real `nats-server` on a
//! random loopback port and kills it (by pid) when dropped. No mocks: tests talk to the same
//! server binary that production uses.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `nats-server` child process.
pub struct NatsServer {
    child: Child,
    port: u16,
    extra: Vec<String>,
    /// JetStream's store directory, removed on drop.
    store: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a plain core-NATS server on 127.0.0.1 and a port the OS picks.
    pub fn start() -> NatsServer {
        Self::start_with_args(&[])
    }

    /// Starts a server with JetStream enabled, storing in a fresh temporary directory.
    pub fn start_jetstream() -> NatsServer {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let store = std::env::temp_dir().join(format!(
            "testkit-jetstream-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut server = Self::start_with_args(&["-js", "-sd", &store.to_string_lossy()]);
        server.store = Some(store);
        server
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with_args(extra: &[&str]) -> NatsServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, port) = spawn_server("-1", &extra);
        NatsServer {
            child,
            port,
            extra,
            store: None,
        }
    }

    /// Kills the server (SIGKILL: a crash) and leaves it down; [`NatsServer::restart`] brings
    /// it back on the same port.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server (if it runs) and starts it again on the same port with the same arguments (and
    /// the same JetStream store), as a server restart in production.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, port) = spawn_server(&self.port.to_string(), &self.extra);
        assert_eq!(port, self.port);
        self.child = child;
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(store) = &self.store {
            let _ = std::fs::remove_dir_all(store);
        }
    }
}

/// Starts `nats-server` on `port` (`-1`: any free one) and returns it with the port it bound.
fn spawn_server(port: &str, extra: &[String]) -> (Child, u16) {
    let binary = nats_server_binary();
    let mut child = Command::new(&binary)
        .args(["-a", "127.0.0.1", "-p", port])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    // The server logs the port it bound; read it, then keep draining the log so the
    // server never blocks on a full pipe.
    let stderr = child.stderr.take().expect("piped stderr");
    let (port_tx, port_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut port_tx = Some(port_tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                let port = rest
                    .trim()
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok());
                if let (Some(port), Some(tx)) = (port, port_tx.take()) {
                    let _ = tx.send(port);
                }
            }
        }
    });
    let port = match port_rx.recv_timeout(START_TIMEOUT) {
        Ok(port) => port,
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            panic!(
                "nats-server did not start listening within {START_TIMEOUT:?} (exit: {status:?})"
            );
        }
    };
    (child, port)
}

/// A child process (e.g. a `processor` binary) with its stderr collected; killed on drop.
pub struct ChildProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl ChildProcess {
    /// Spawns `command` and waits until a line of its stderr contains `ready` (panics, with
    /// the log, if it exits or takes longer than `timeout`).
    pub fn spawn(mut command: Command, ready: &str, timeout: Duration) -> ChildProcess {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (marker, lines) = (ready.to_string(), log.clone());
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(&marker) {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        let mut process = ChildProcess { child, log };
        if ready_rx.recv_timeout(timeout).is_err() {
            let _ = process.child.kill();
            panic!(
                "{command:?} did not log {ready:?} within {timeout:?}; its log:\n{}",
                process.log()
            );
        }
        process
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now and at its peak (`VmRSS`, `VmHWM` of /proc/PID/status), in
    /// MiB.
    pub fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading /proc/PID/status");
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The first line of its log containing `marker`, if any.
    pub fn log_line(&self, marker: &str) -> Option<String> {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .find(|line| line.contains(marker))
            .cloned()
    }

    /// Everything it wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Sends SIGKILL (a crash) and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit; panics (with the log) if it does not.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the child") {
                return status;
            }
            if started.elapsed() > timeout {
                panic!("still running after {timeout:?}; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$NATS_SERVER_BIN`, else `nats-server` on the PATH or in /usr/sbin (Debian's package).
fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/local/sbin".into()]);
    for dir in dirs {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "nats-server not found: install it with `sudo apt-get install -y nats-server` \
         (scripts/test does this), or set NATS_SERVER_BIN"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn server_listens_and_dies_with_its_handle() {
        let server = NatsServer::start();
        let port = server.port();
        let pid = server.pid();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(server);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    fn is_zombie(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    }
}
