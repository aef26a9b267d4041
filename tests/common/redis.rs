//! Real `redis-server` processes for the tests: a standalone server on a unix socket, a
//! Cluster of three masters, and a master with a replica watched by three sentinels. Each is
//! started on its own socket or free ports, in its own directory, and killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fails the test, saying how to install Redis, when `redis-server` is missing.
fn require_redis() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    if !found.is_ok_and(|status| status.success()) {
        panic!(
            "redis-server is not installed; install it with `apt-get install redis-server` \
             (scripts/install-test-deps does this)"
        );
    }
}

/// A free loopback TCP port (released just before the server binds it).
pub fn free_port() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").expect("a free port");
    socket.local_addr().expect("an address").port()
}

/// One `redis-server` process.
pub struct RedisProcess {
    child: Child,
    /// The port, for TCP servers.
    pub port: Option<u16>,
    /// The unix socket, for socket servers.
    pub socket: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisProcess {
    fn spawn(dir: &Path, args: &[String]) -> Child {
        Command::new("redis-server")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts")
    }

    /// A standalone server listening only on a unix socket.
    pub fn on_socket() -> RedisProcess {
        require_redis();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("redis.sock");
        let args = [
            "--port",
            "0",
            "--unixsocket",
            &socket.display().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(str::to_owned);
        let child = RedisProcess::spawn(dir.path(), &args);
        let process = RedisProcess {
            child,
            port: None,
            socket: Some(socket),
            _dir: Some(dir),
        };
        process.wait_until_ready();
        process
    }

    /// A server on a free TCP port with extra arguments, in `dir`.
    pub fn on_port(dir: &Path, extra: &[&str]) -> RedisProcess {
        require_redis();
        let port = free_port();
        let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
            .map(str::to_owned)
            .to_vec();
        args.extend(["--save", "", "--appendonly", "no"].map(str::to_owned));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let child = RedisProcess::spawn(dir, &args);
        let process = RedisProcess {
            child,
            port: Some(port),
            socket: None,
            _dir: None,
        };
        process.wait_until_ready();
        process
    }

    /// `redis-cli` arguments that reach this server.
    pub fn cli_args(&self) -> Vec<String> {
        match (&self.socket, self.port) {
            (Some(socket), _) => vec!["-s".into(), socket.display().to_string()],
            (None, Some(port)) => vec!["-p".into(), port.to_string()],
            (None, None) => unreachable!("a server listens somewhere"),
        }
    }

    /// Runs `redis-cli` against this server and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(self.cli_args())
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL Sluice connects with.
    pub fn url(&self) -> String {
        match (&self.socket, self.port) {
            (Some(socket), _) => format!("redis+unix://{}", socket.display()),
            (None, Some(port)) => format!("redis://127.0.0.1:{port}"),
            (None, None) => unreachable!("a server listens somewhere"),
        }
    }

    /// Stops the server at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of three masters.
pub struct RedisCluster {
    /// The masters.
    pub nodes: Vec<RedisProcess>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them with `redis-cli --cluster create`.
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let nodes: Vec<RedisProcess> = (0..3)
            .map(|i| {
                let node_dir = dir.path().join(format!("node{i}"));
                std::fs::create_dir(&node_dir).expect("a node directory");
                RedisProcess::on_port(
                    &node_dir,
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port.expect("a port")))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not settle within 30 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes, _dir: dir }
    }

    /// Seed nodes, as `host:port`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port.expect("a port")))
            .collect()
    }
}
