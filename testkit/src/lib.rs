//! Test harness shared by every crate's integration tests: starts a real `nats-server` on a
//! random loopback port and kills it (by pid) when dropped. No mocks: tests talk to the same
//! server binary that production uses.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `nats-server` child process.
pub struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    /// Starts a plain core-NATS server on 127.0.0.1 and a port the OS picks.
    pub fn start() -> NatsServer {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra command-line arguments (e.g. `-js`).
    pub fn start_with_args(extra: &[&str]) -> NatsServer {
        let binary = nats_server_binary();
        let mut child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", "-1"])
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
                panic!("nats-server did not start listening within {START_TIMEOUT:?} (exit: {status:?})");
            }
        };
        NatsServer { child, port }
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
