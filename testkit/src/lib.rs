//! Test harness shared by every crate's integration tests: starts a real `nats-server` on a
//! random loopback port (or a cluster of them, joined by routes) and kills it (by pid) when
//! dropped. No mocks: tests talk to the same server binary that production uses.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
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
    /// The HTTP monitoring port (`/healthz`, `/jsz`), when started with one.
    monitor: Option<u16>,
}

impl NatsServer {
    /// Starts a plain core-NATS server on 127.0.0.1 and a port the OS picks.
    pub fn start() -> NatsServer {
        Self::start_with_args(&[])
    }

    /// Starts a server with JetStream enabled, storing in a fresh temporary directory.
    pub fn start_jetstream() -> NatsServer {
        let store = new_store_dir();
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
            monitor: None,
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
        self.start_again();
    }

    /// Stops the server gracefully (SIGTERM: it closes its clients and routes and syncs its
    /// store), waits for it to exit, and starts it again on the same port and store.
    pub fn restart_gracefully(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
        let stopping = std::time::Instant::now();
        while self
            .child
            .try_wait()
            .expect("polling nats-server")
            .is_none()
        {
            assert!(
                stopping.elapsed() < START_TIMEOUT,
                "nats-server did not exit within {START_TIMEOUT:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.start_again();
    }

    fn start_again(&mut self) {
        let (child, port) = spawn_server(&self.port.to_string(), &self.extra);
        assert_eq!(port, self.port);
        self.child = child;
    }

    /// Whether `/healthz` on the monitoring port answers 200: the server is up and, with
    /// JetStream in a cluster, has joined the meta group and caught up. Panics if the server
    /// was started without a monitoring port.
    pub fn is_healthy(&self) -> bool {
        let port = self.monitor.expect("started without a monitoring port");
        http_status(port, "/healthz") == Some(200)
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

/// A fresh directory name for a JetStream store (created by the server, removed on drop).
fn new_store_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "testkit-jetstream-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// `nats-server`s on loopback joined into one cluster by routes, each with JetStream and a
/// store of its own: the production shape for durable requests. Nodes are named `n1`, `n2`,
/// ... (the names JetStream reports as stream leaders and peers); each can be killed and
/// restarted by pid on the same ports and store.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` clustered JetStream servers and waits until every one is healthy (the
    /// JetStream meta group has a leader and every node has caught up with it).
    pub fn start(size: usize) -> NatsCluster {
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let cluster = format!(
            "testkit-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        // Route ports must be known before any node starts (each lists all of them).
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(i, route_port)| {
                let store = new_store_dir();
                let monitor = free_port();
                let args = [
                    "-n".to_string(),
                    format!("n{}", i + 1),
                    "--cluster_name".to_string(),
                    cluster.clone(),
                    "--cluster".to_string(),
                    format!("nats-route://127.0.0.1:{route_port}"),
                    "--routes".to_string(),
                    routes.clone(),
                    "-js".to_string(),
                    "-sd".to_string(),
                    store.to_string_lossy().into_owned(),
                    "-m".to_string(),
                    monitor.to_string(),
                ];
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut node = NatsServer::start_with_args(&args);
                node.store = Some(store);
                node.monitor = Some(monitor);
                node
            })
            .collect();
        let cluster = NatsCluster { nodes };
        cluster.wait_healthy(START_TIMEOUT);
        cluster
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (0-based; its server name is `n{i+1}`).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Node `i`, to kill or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// The index of the node with server name `name` (`n1` ... as JetStream reports it).
    pub fn index_of(&self, name: &str) -> usize {
        name.strip_prefix('n')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=self.nodes.len()).contains(n))
            .map(|n| n - 1)
            .unwrap_or_else(|| panic!("no node named {name:?} in this cluster"))
    }

    /// Every node's client URL, comma-separated (as NATS clients take a server list).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every node answers `/healthz` with 200; panics after `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) {
        let started = std::time::Instant::now();
        for (i, node) in self.nodes.iter().enumerate() {
            while !node.is_healthy() {
                assert!(
                    started.elapsed() < timeout,
                    "cluster node n{} not healthy within {timeout:?}",
                    i + 1
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A loopback port that was free a moment ago (bound to port 0, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("binding a free loopback port")
}

/// The status code of `GET path` on a loopback HTTP port; `None` if it does not answer.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split_whitespace().nth(1)?.parse().ok()
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
    let pid = child.id();
    let (port_tx, port_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut port_tx = Some(port_tx);
        // `TESTKIT_SERVER_LOG=1` shows every server's log (to see what a cluster did).
        let show = std::env::var_os("TESTKIT_SERVER_LOG").is_some();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if show {
                eprintln!("nats-server {pid}: {line}");
            }
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

    /// Whether it is still running (not exited, whatever the way).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("polling the child").is_none()
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

    #[test]
    fn cluster_nodes_route_to_each_other_and_come_back_after_a_kill() {
        let mut cluster = NatsCluster::start(3);
        assert_eq!(cluster.len(), 3);
        assert_eq!(cluster.index_of("n3"), 2);
        let ports: Vec<u16> = (0..3).map(|i| cluster.node(i).port()).collect();
        let mut distinct = ports.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{ports:?}");
        // Each node knows its two routes (the monitoring endpoint counts them).
        for i in 0..3 {
            let routes = http_body(cluster.node(i).monitor.unwrap(), "/routez");
            assert!(routes.contains("\"num_routes\": 2"), "n{}: {routes}", i + 1);
        }
        let old_pid = cluster.node(1).pid();
        cluster.node_mut(1).stop();
        assert!(!cluster.node(1).is_healthy());
        cluster.node_mut(1).restart();
        assert_ne!(cluster.node(1).pid(), old_pid);
        cluster.wait_healthy(Duration::from_secs(20));
        assert!(TcpStream::connect(("127.0.0.1", ports[1])).is_ok());
    }

    fn http_body(port: u16, path: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    fn is_zombie(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    }
}
