//! One decision through a real `redis-server` (started here on a unix socket): the script call
//! with 1 and with 5 descriptors, sequential and with 64 decisions in flight.

use std::hint::black_box;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::bucket::Shape;
use sluice::store::{Charge, Mode, RedisSettings, RedisStore, Topology};

struct Server {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Server {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("redis.sock");
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
        ])
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed (scripts/install-test-deps)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Server {
        child,
        url: format!("redis+unix://{}", socket.display()),
        _dir: dir,
    }
}

fn charges(count: usize, salt: u64) -> Vec<Charge> {
    let shape = Shape::new(1_000_000, 1_000_000, 1_000_000).expect("a shape");
    (0..count)
        .map(|i| Charge {
            key: format!("bench:{}:{i}", salt % 10_000).into_bytes(),
            shape: Some(shape),
            hits: 1,
            mode: Mode::Enforce,
        })
        .collect()
}

fn bench_redis(c: &mut Criterion) {
    let server = start_redis();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let settings = RedisSettings {
        topology: Topology::Standalone {
            url: server.url.clone(),
        },
        password: None,
        timeout: Duration::from_secs(1),
        connections: 2,
        tls_ca: None,
    };
    let store = Arc::new(
        runtime
            .block_on(RedisStore::connect(&settings))
            .expect("connected"),
    );
    for descriptors in [1, 5] {
        let name = format!("redis/decision {descriptors} descriptor(s), one at a time");
        let mut salt = 0;
        c.bench_function(&name, |b| {
            b.to_async(&runtime).iter(|| {
                salt += 1;
                let charges = charges(descriptors, salt);
                let store = store.clone();
                async move { black_box(store.charge(&charges).await.expect("a decision")) }
            })
        });
    }
    let mut group = c.benchmark_group("redis/64 in flight");
    group.throughput(Throughput::Elements(64));
    for descriptors in [1, 5] {
        group.bench_function(format!("{descriptors} descriptor(s)"), |b| {
            let mut salt = 0;
            b.to_async(&runtime).iter(|| {
                let batch: Vec<_> = (0..64)
                    .map(|_| {
                        salt += 1;
                        let charges = charges(descriptors, salt);
                        let store = store.clone();
                        tokio::spawn(async move { store.charge(&charges).await.map(|d| d.passed) })
                    })
                    .collect();
                async move {
                    for task in batch {
                        black_box(task.await.expect("joined").expect("a decision"));
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_redis);
criterion_main!(benches);
