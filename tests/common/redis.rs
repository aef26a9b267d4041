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

/// A free port for a Cluster node: Redis also listens 10000 above it for the cluster bus, so
/// that one must be free and exist (an ephemeral port above 55535 has no bus port, and such a
/// node would not start).
fn free_cluster_port() -> u16 {
    for _ in 0..1_000 {
        let port = free_port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port with a free cluster bus port 10000 above it");
}

/// One `redis-server` process.
pub struct RedisProcess {
    child: Child,
    /// The port, for TCP servers.
    pub port: Option<u16>,
    /// The unix socket, for socket servers.
    pub socket: Option<PathBuf>,
    /// Extra `redis-cli` arguments: a password, TLS settings.
    cli_extra: Vec<String>,
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
        RedisProcess::on_socket_with_password(None)
    }

    /// A standalone server on a unix socket that requires `password`, if given.
    pub fn on_socket_with_password(password: Option<&str>) -> RedisProcess {
        require_redis();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("redis.sock");
        let socket_arg = socket.display().to_string();
        let mut args: Vec<String> = [
            "--port",
            "0",
            "--unixsocket",
            &socket_arg,
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(str::to_owned)
        .to_vec();
        let mut cli_extra = Vec::new();
        if let Some(password) = password {
            args.extend(["--requirepass".to_owned(), password.to_owned()]);
            cli_extra = ["--no-auth-warning", "-a", password]
                .map(str::to_owned)
                .to_vec();
        }
        let child = RedisProcess::spawn(dir.path(), &args);
        let process = RedisProcess {
            child,
            port: None,
            socket: Some(socket),
            cli_extra,
            _dir: Some(dir),
        };
        process.wait_until_ready();
        process
    }

    /// A server that speaks only TLS, on a free port, with a certificate for 127.0.0.1 signed
    /// by a certificate authority made for it; returns it and the authority's PEM file.
    pub fn with_tls() -> (RedisProcess, PathBuf) {
        require_redis();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl runs");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "openssl {args:?}: {stderr}");
        };
        let (ca_key, ca, key, csr, cert) = (
            path("ca.key"),
            path("ca.pem"),
            path("server.key"),
            path("server.csr"),
            path("server.pem"),
        );
        let subject = "/CN=sluice test ca";
        openssl(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
            "-keyout", &ca_key, "-out", &ca,
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        let extensions = path("san.ext");
        std::fs::write(&extensions, "subjectAltName=IP:127.0.0.1\n").expect("written");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extensions,
            "-out",
            &cert,
        ]);
        let port = free_port().to_string();
        let args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port,
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(str::to_owned)
        .to_vec();
        let child = RedisProcess::spawn(dir.path(), &args);
        let cli_extra = ["--tls", "--cacert", &ca].map(str::to_owned).to_vec();
        let port = port.parse().ok();
        let ca = dir.path().join("ca.pem");
        let process = RedisProcess {
            child,
            port,
            socket: None,
            cli_extra,
            _dir: Some(dir),
        };
        process.wait_until_ready();
        (process, ca)
    }

    /// A server on a free TCP port with extra arguments, in `dir`.
    pub fn on_port(dir: &Path, extra: &[&str]) -> RedisProcess {
        RedisProcess::on_given_port(dir, free_port(), extra)
    }

    /// A Cluster node on a free TCP port whose cluster bus port (10000 above it) is free too.
    fn cluster_node(dir: &Path, extra: &[&str]) -> RedisProcess {
        RedisProcess::on_given_port(dir, free_cluster_port(), extra)
    }

    fn on_given_port(dir: &Path, port: u16, extra: &[&str]) -> RedisProcess {
        require_redis();
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
            cli_extra: Vec::new(),
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
            .args(&self.cli_extra)
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

    /// Sends a signal (`STOP`, `CONT`, …) to the server.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status();
        assert!(
            sent.is_ok_and(|status| status.success()),
            "kill -{name} {pid}"
        );
    }

    /// Starts a killed socket server again, on the same socket, empty.
    pub fn restart(&mut self) {
        let socket = self.socket.clone().expect("a socket server");
        let _ = std::fs::remove_file(&socket);
        let dir = socket
            .parent()
            .expect("the socket is in a directory")
            .to_owned();
        let socket_arg = socket.display().to_string();
        let args = [
            "--port",
            "0",
            "--unixsocket",
            &socket_arg,
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(str::to_owned);
        self.child = RedisProcess::spawn(&dir, &args);
        self.wait_until_ready();
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
        RedisCluster::start_nodes(3, 0)
    }

    fn start_nodes(count: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let nodes: Vec<RedisProcess> = (0..count)
            .map(|i| {
                let node_dir = dir.path().join(format!("node{i}"));
                std::fs::create_dir(&node_dir).expect("a node directory");
                RedisProcess::cluster_node(
                    &node_dir,
                    // A replica of a lost master takes over however long ago it last heard from
                    // it: an idle test cluster would otherwise count as too stale to fail over.
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
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
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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

impl RedisCluster {
    /// Starts six cluster-enabled servers, three masters each with a replica.
    pub fn start_with_replicas() -> RedisCluster {
        RedisCluster::start_nodes(6, 1)
    }
}

/// A master, a replica, and three sentinels watching them under the name `mymaster`.
pub struct SentinelSetup {
    /// The master at start.
    pub master: RedisProcess,
    /// The replica at start.
    pub replica: RedisProcess,
    sentinels: Vec<(Child, u16)>,
    _dir: tempfile::TempDir,
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for (child, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The name the sentinels know the master by.
pub const MASTER_NAME: &str = "mymaster";

impl SentinelSetup {
    /// Starts the master, the replica and the sentinels, and waits until the sentinels know
    /// the replica and each other (so that a failover can be agreed).
    pub fn start() -> SentinelSetup {
        SentinelSetup::start_waiting(true)
    }

    /// Starts it all, waiting only until the sentinels name the master: enough to serve.
    pub fn start_serving() -> SentinelSetup {
        SentinelSetup::start_waiting(false)
    }

    fn start_waiting(for_quorum: bool) -> SentinelSetup {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let master = RedisProcess::on_port(dir.path(), &[]);
        let master_port = master.port.expect("a port").to_string();
        let replica_dir = dir.path().join("replica");
        std::fs::create_dir(&replica_dir).expect("a directory");
        let replica =
            RedisProcess::on_port(&replica_dir, &["--replicaof", "127.0.0.1", &master_port]);
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let config = dir.path().join(format!("sentinel{i}.conf"));
                let text = format!(
                    "port {port}\nbind 127.0.0.1\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n"
                );
                std::fs::write(&config, text).expect("the sentinel config is written");
                let child = Command::new("redis-server")
                    .arg(&config)
                    .arg("--sentinel")
                    .current_dir(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("a sentinel starts");
                (child, port)
            })
            .collect();
        let setup = SentinelSetup {
            master,
            replica,
            sentinels,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        for (_, port) in &setup.sentinels {
            loop {
                let knows_replica =
                    setup.sentinel_cli(*port, &["SENTINEL", "REPLICAS", MASTER_NAME]);
                let knows_others =
                    setup.sentinel_cli(*port, &["SENTINEL", "SENTINELS", MASTER_NAME]);
                let others = knows_others.lines().filter(|l| l.trim() == "name").count();
                let names_master = setup
                    .sentinel_cli(*port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]);
                let settled = knows_replica.contains("slave") && others >= 2;
                if (for_quorum && settled) || (!for_quorum && names_master.contains("127.0.0.1")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the sentinels did not settle within 60 s"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        setup
    }

    fn sentinel_cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The sentinels, as `host:port`.
    pub fn sentinels(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, port)| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// The port of the master the sentinels name now.
    pub fn current_master_port(&self) -> Option<u16> {
        let (_, port) = self.sentinels.first()?;
        let answer =
            self.sentinel_cli(*port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]);
        answer.lines().nth(1)?.trim().parse().ok()
    }
}
