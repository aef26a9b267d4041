//! The `sluice` binary as users and scripts run it: `check-config` and `serve`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{codes, descriptor, request};
use sluice::proto::{Code, RateLimitServiceClient};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

const RULES: &str = "
domain: web
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10, burst: 20}
    descriptors:
      - key: path
        value: /login
        rate_limit: {unit: minute, requests_per_unit: 5}
  - key: client
    value: internal
    rate_limit: {unlimited: true}
";

fn write_rules(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("web.yaml");
    std::fs::write(&file, text).expect("the rules are written");
    (dir, file)
}

#[test]
fn check_config_prints_what_each_domain_limits() {
    let (_dir, file) = write_rules(RULES);
    let out = Command::new(SLUICE)
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("it runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!(
        "domain web ({})\n  remote_address: 10 per second, burst 20\n    \
         path=/login: 5 per minute\n  client=internal: unlimited\n",
        file.display()
    );
    assert_eq!(stdout, expected);
}

#[test]
fn check_config_exits_1_naming_the_fault() {
    let (_dir, file) =
        write_rules("domain: web\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight}\n");
    let out = Command::new(SLUICE)
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("it runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        format!(
            "invalid rules: {}:4:24: descriptors[0].rate_limit.unit: unknown unit `fortnight` \
             (expected one of: second, minute, hour, day, week, month, year)\n",
            file.display()
        )
    );
}

/// A `sluice serve` process, killed when dropped.
struct Serving {
    child: Child,
    lines: mpsc::Receiver<String>,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `sluice serve` with `args` and `envs`; returns it once it logs that it listens.
fn serve(args: &[&str], envs: &[(&str, &str)]) -> Result<Serving, String> {
    let mut child = Command::new(SLUICE)
        .arg("serve")
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("SLUICE_GRPC_ADDR")
        .env_remove("SLUICE_HTTP_ADDR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    let fail = |child: &mut Child, seen: &str| {
        let _ = child.kill();
        let status = child.wait().expect("the process ends");
        Err(format!("{status}: {seen}"))
    };
    loop {
        let Ok(line) = lines.recv_timeout(Duration::from_secs(20)) else {
            return fail(&mut child, &seen);
        };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("listening") {
            return match (field(&line, "grpc="), field(&line, "http=")) {
                (Some(grpc), Some(http)) => Ok(Serving {
                    child,
                    lines,
                    grpc,
                    http,
                }),
                _ => fail(&mut child, &seen),
            };
        }
    }
}

fn field(line: &str, name: &str) -> Option<SocketAddr> {
    let start = line.find(name)? + name.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

fn loopback_args(file: &std::path::Path) -> Vec<String> {
    let rules = file.display().to_string();
    let addrs = ["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
    [
        "--rules",
        &rules,
        addrs[0],
        addrs[1],
        addrs[2],
        addrs[3],
        "--shutdown-grace",
        "1s",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test]
async fn serve_answers_grpc_and_healthcheck_then_stops_on_sigterm() {
    let (_dir, file) = write_rules(RULES);
    let args = loopback_args(&file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut serving = serve(&args, &[]).expect("sluice serves");

    let health = common::http::get(serving.http, "/healthcheck")
        .await
        .expect("an answer");
    assert_eq!(health.status, 200);
    let body: serde_json::Value = serde_json::from_str(&health.body).expect("JSON");
    assert_eq!(body["status"], "serving");
    assert_eq!(body["store"], "memory");
    assert_eq!(body["redis_breaker"], serde_json::Value::Null);
    assert_eq!(body["rules"]["domains"], 1);
    assert_eq!(body["rules"]["hash"].as_str().map(str::len), Some(16));

    let url = format!("http://{}", serving.grpc);
    let mut client = RateLimitServiceClient::connect(url)
        .await
        .expect("a connection");
    let ask = || {
        request(
            "web",
            vec![descriptor(&[
                ("remote_address", "10.0.0.1"),
                ("path", "/login"),
            ])],
        )
    };
    for remaining in (0..5).rev() {
        let response = client
            .should_rate_limit(ask())
            .await
            .expect("a decision")
            .into_inner();
        assert_eq!(codes(&response), [(Code::Ok, remaining)]);
    }
    let response = client
        .should_rate_limit(ask())
        .await
        .expect("a decision")
        .into_inner();
    assert_eq!(codes(&response), [(Code::OverLimit, 0)]);

    // The connection stays open, as Envoy's would: shutdown must not wait on it forever.
    let pid = serving.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = serving.child.wait().expect("sluice exits");
    assert!(status.success(), "exit status {status}");
    let rest: Vec<String> = serving.lines.try_iter().collect();
    assert!(
        rest.iter().any(|line| line.contains("shutting down")),
        "{rest:?}"
    );
}

#[test]
fn serve_reads_its_settings_from_the_environment() {
    let (_dir, file) = write_rules(RULES);
    let rules = file.display().to_string();
    let envs = [
        ("SLUICE_RULES", rules.as_str()),
        ("SLUICE_MAX_DESCRIPTORS", "2"),
    ];
    let serving = serve(
        &["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        &envs,
    )
    .expect("sluice serves");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let url = format!("http://{}", serving.grpc);
        let mut client = RateLimitServiceClient::connect(url)
            .await
            .expect("a connection");
        let three = (0..3)
            .map(|_| descriptor(&[("client", "internal")]))
            .collect();
        let status = client
            .should_rate_limit(request("web", three))
            .await
            .unwrap_err();
        assert_eq!(
            status.message(),
            "the request has 3 descriptors; at most 2 are allowed"
        );
    });
}

#[test]
fn serve_refuses_invalid_rules() {
    let (_dir, file) = write_rules("domain: web\ndescriptors:\n  - key: a\n    valeu: typo\n");
    let args = loopback_args(&file);
    let out = Command::new(SLUICE)
        .arg("serve")
        .args(&args)
        .output()
        .expect("it runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "sluice: invalid rules: {}:4:5: descriptors[0].valeu: unknown key `valeu`",
        file.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn serve_refuses_an_address_that_is_taken() {
    let (_dir, file) = write_rules(RULES);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("an address").to_string();
    let rules = file.display().to_string();
    let args = [
        "serve",
        "--rules",
        &rules,
        "--grpc-addr",
        &addr,
        "--http-addr",
        "127.0.0.1:0",
    ];
    let out = Command::new(SLUICE).args(args).output().expect("it runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("sluice: cannot listen for gRPC on {addr}")),
        "{stderr}"
    );
}

#[test]
fn serve_requires_rules() {
    let out = Command::new(SLUICE)
        .arg("serve")
        .env_remove("SLUICE_RULES")
        .output()
        .expect("it runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rules"));
}

/// Asks `serving` one decision about ("remote_address", `value`) in the `web` domain.
fn decide(serving: &Serving, value: &str) -> sluice::proto::RateLimitResponse {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let url = format!("http://{}", serving.grpc);
        let mut client = RateLimitServiceClient::connect(url)
            .await
            .expect("a connection");
        let ask = request("web", vec![descriptor(&[("remote_address", value)])]);
        client
            .should_rate_limit(ask)
            .await
            .expect("a decision")
            .into_inner()
    })
}

/// Asks `serving` one decision of the `web` rules and returns its remaining count.
fn ask_once(serving: &Serving) -> u32 {
    let response = decide(serving, "10.9.9.9");
    assert_eq!(response.overall_code, Code::Ok as i32);
    response.statuses[0].limit_remaining
}

#[test]
fn serve_keeps_buckets_in_redis_with_a_password_from_a_file() {
    let (dir, file) = write_rules(RULES);
    let redis = common::redis::RedisProcess::on_socket_with_password(Some("s3cret pass"));
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "s3cret pass\n").expect("the password is written");
    let mut args = loopback_args(&file);
    args.extend(["--redis-url".to_owned(), redis.url()]);
    args.extend([
        "--redis-password-file".to_owned(),
        password_file.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serving = serve(&args, &[]).expect("sluice serves");
    assert_eq!(ask_once(&serving), 19);
    assert_eq!(ask_once(&serving), 18);
    assert!(redis.cli(&["KEYS", "sl:*"]).contains("10.9.9.9"));

    // Without the password, Redis refuses and serve says so.
    let mut args = loopback_args(&file);
    args.extend(["--redis-url".to_owned(), redis.url()]);
    let out = Command::new(SLUICE)
        .arg("serve")
        .args(&args)
        .output()
        .expect("it runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot use Redis"), "{stderr}");
}

#[test]
fn serve_keeps_buckets_in_redis_over_tls() {
    let (_dir, file) = write_rules(RULES);
    let (redis, ca) = common::redis::RedisProcess::with_tls();
    let url = format!("rediss://127.0.0.1:{}", redis.port.expect("a port"));
    let mut args = loopback_args(&file);
    args.extend(["--redis-url".to_owned(), url.clone()]);
    args.extend(["--redis-ca-file".to_owned(), ca.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serving = serve(&args, &[]).expect("sluice serves");
    assert_eq!(ask_once(&serving), 19);
    assert!(redis.cli(&["KEYS", "sl:*"]).contains("10.9.9.9"));

    // A certificate the system does not trust is refused without the authority's file.
    let mut args = loopback_args(&file);
    args.extend(["--redis-url".to_owned(), url]);
    let out = Command::new(SLUICE)
        .arg("serve")
        .args(&args)
        .output()
        .expect("it runs");
    assert!(!out.status.success());
}

/// The `requests_per_unit` that a decision on ("remote_address", "limit") reports.
fn limit_in_force(serving: &Serving) -> u32 {
    let response = decide(serving, "limit");
    let limit = response.statuses[0].current_limit.as_ref();
    limit.map_or(0, |limit| limit.requests_per_unit)
}

#[test]
fn sighup_reloads_the_rules() {
    let text = |per_minute: u32| {
        format!(
            "domain: web\ndescriptors:\n  - key: remote_address\n    \
             rate_limit: {{unit: minute, requests_per_unit: {per_minute}}}\n"
        )
    };
    let (_dir, file) = write_rules(&text(3));
    let mut args = loopback_args(&file);
    args.extend(["--rules-poll-interval".to_owned(), "0s".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serving = serve(&args, &[]).expect("sluice serves");
    assert_eq!(limit_in_force(&serving), 3);

    std::fs::write(&file, text(30)).expect("the rules are rewritten");
    // Not watched: nothing changes until SIGHUP.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(limit_in_force(&serving), 3);

    let pid = serving.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill runs")
            .success()
    );
    let reloaded = std::iter::from_fn(|| serving.lines.recv_timeout(Duration::from_secs(10)).ok())
        .any(|line| line.contains("rules reloaded"));
    assert!(reloaded, "no reload was logged");
    assert_eq!(limit_in_force(&serving), 30);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let metrics = runtime
        .block_on(common::http::get(serving.http, "/metrics"))
        .expect("metrics");
    let loaded: Vec<&str> = metrics
        .body
        .lines()
        .filter(|line| line.starts_with("sluice_rules_loaded{"))
        .collect();
    // The hash before the reload at 0, the one after at 1.
    assert_eq!(loaded.len(), 2, "{loaded:?}");
    assert_eq!(
        loaded.iter().filter(|line| line.ends_with(" 1")).count(),
        1,
        "{loaded:?}"
    );
    let reloads = r#"sluice_rules_reloads_total{result="ok"} 1"#;
    assert!(metrics.body.contains(reloads), "{}", metrics.body);
}

/// Whether a failed call was cut off by the connection closing (the transport, HTTP/2), as
/// opposed to a status the service chose.
fn cut_off(status: &tonic::Status) -> bool {
    let message = status.message().to_ascii_lowercase();
    let transport = [
        "h2",
        "transport",
        "connection",
        "stream",
        "broken pipe",
        "reset",
        "goaway",
    ]
    .iter()
    .any(|word| message.contains(word));
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled
    ) || transport
}

#[test]
fn sigterm_under_load_lets_calls_in_flight_finish() {
    let (_dir, file) = write_rules(RULES);
    let args = loopback_args(&file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut serving = serve(&args, &[]).expect("sluice serves");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let url = format!("http://{}", serving.grpc);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|t| {
            let (url, stop) = (url.clone(), stop.clone());
            runtime.spawn(async move {
                let mut client = RateLimitServiceClient::connect(url)
                    .await
                    .expect("a connection");
                let (mut decided, mut refused, mut broken) = (0, 0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ask = request(
                        "web",
                        vec![descriptor(&[("remote_address", &format!("{t}"))])],
                    );
                    match client.should_rate_limit(ask).await {
                        Ok(_) => decided += 1,
                        // Refused or cut off at the connection once the server stops
                        // accepting: not a decision gone wrong.
                        Err(status) if cut_off(&status) => {
                            refused += 1;
                            if refused > 20 {
                                break;
                            }
                        }
                        Err(status) => broken.push(format!("{status:?}")),
                    }
                }
                (decided, refused, broken)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let pid = serving.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success()
    );
    let status = serving.child.wait().expect("sluice exits");
    assert!(status.success(), "exit status {status}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut decided = 0;
    for task in load {
        let (d, _refused, broken) = runtime.block_on(task).expect("a load task ends");
        decided += d;
        assert!(broken.is_empty(), "{broken:?}");
    }
    assert!(decided > 100, "{decided}");
}

#[test]
fn a_redis_outage_shows_in_health_and_metrics() {
    let (_dir, file) = write_rules(RULES);
    let mut redis = common::redis::RedisProcess::on_socket();
    let mut args = loopback_args(&file);
    args.extend(["--redis-url".to_owned(), redis.url()]);
    args.extend(["--redis-timeout".to_owned(), "200ms".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serving = serve(&args, &[]).expect("sluice serves");
    assert_eq!(ask_once(&serving), 19);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let health = runtime
        .block_on(common::http::get(serving.http, "/healthcheck"))
        .expect("health");
    let body: serde_json::Value = serde_json::from_str(&health.body).expect("JSON");
    assert_eq!(
        (body["store"].as_str(), body["redis_breaker"].as_str()),
        (Some("redis"), Some("closed"))
    );

    redis.kill();
    // Decided by the fallback, which has buckets of its own.
    assert_eq!(ask_once(&serving), 19);
    assert_eq!(ask_once(&serving), 18);
    let health = runtime
        .block_on(common::http::get(serving.http, "/healthcheck"))
        .expect("health");
    let body: serde_json::Value = serde_json::from_str(&health.body).expect("JSON");
    assert_eq!(
        (health.status, body["redis_breaker"].as_str()),
        (200, Some("open"))
    );
    let metrics = runtime
        .block_on(common::http::get(serving.http, "/metrics"))
        .expect("metrics");
    let value = |name: &str| -> Option<f64> {
        metrics
            .body
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
    };
    assert_eq!(
        value("sluice_redis_breaker_state "),
        Some(1.0),
        "{}",
        metrics.body
    );
    assert_eq!(
        value("sluice_fallback_decisions_total "),
        Some(2.0),
        "{}",
        metrics.body
    );
    let lines: Vec<String> = serving.lines.try_iter().collect();
    let warnings = lines
        .iter()
        .filter(|line| line.contains("Redis failed"))
        .count();
    assert_eq!(warnings, 1, "one log line per change of state: {lines:?}");
}

#[test]
fn metrics_and_rlconfig_after_a_known_sequence() {
    let (_dir, file) = write_rules(RULES);
    let args = loopback_args(&file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serving = serve(&args, &[]).expect("sluice serves");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let url = format!("http://{}", serving.grpc);
        let mut client = RateLimitServiceClient::connect(url)
            .await
            .expect("a connection");
        for _ in 0..6 {
            let entries = [("remote_address", "1.1.1.1"), ("path", "/login")];
            let ask = request("web", vec![descriptor(&entries)]);
            client.should_rate_limit(ask).await.expect("a decision");
        }
        let ask = request("elsewhere", vec![descriptor(&[("a", "b")])]);
        client.should_rate_limit(ask).await.expect("a decision");
    });
    let metrics = runtime
        .block_on(common::http::get(serving.http, "/metrics"))
        .expect("metrics");
    let value = |line_start: &str| -> Option<f64> {
        let line = metrics
            .body
            .lines()
            .find(|line| line.starts_with(line_start))?;
        line.rsplit(' ').next()?.parse().ok()
    };
    let rule = r#"{domain="web",rule="web.remote_address.path_/login"}"#;
    // Five of 5 per minute pass: 1, 2 and 3 used leave room, 4 and 5 are at 80% and more.
    assert_eq!(
        value(&format!("sluice_rule_total_hits{rule} ")),
        Some(6.0),
        "{}",
        metrics.body
    );
    assert_eq!(
        value(&format!("sluice_rule_within_limit{rule} ")),
        Some(3.0)
    );
    assert_eq!(value(&format!("sluice_rule_near_limit{rule} ")), Some(2.0));
    assert_eq!(value(&format!("sluice_rule_over_limit{rule} ")), Some(1.0));
    assert_eq!(value(r#"sluice_decisions_total{outcome="ok"} "#), Some(6.0));
    assert_eq!(
        value(r#"sluice_decisions_total{outcome="over_limit"} "#),
        Some(1.0)
    );
    assert_eq!(value("sluice_unknown_domain_total "), Some(1.0));
    assert_eq!(value("sluice_decision_seconds_count "), Some(7.0));
    // Every decision but the unknown domain's asked the store.
    assert_eq!(
        value(r#"sluice_store_call_seconds_count{store="memory",result="ok"} "#),
        Some(6.0),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("# HELP sluice_rule_total_hits"),
        "described once"
    );

    let config = runtime
        .block_on(common::http::get(serving.http, "/rlconfig"))
        .expect("rules");
    assert_eq!(config.status, 200);
    assert!(
        config.body.contains("    path=/login: 5 per minute\n"),
        "{}",
        config.body
    );
}

#[test]
fn json_logs_carry_one_span_per_decision() {
    let (_dir, file) = write_rules(RULES);
    let mut child = Command::new(SLUICE)
        .args(["serve", "--rules"])
        .arg(&file)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("SLUICE_LOG", "sluice=debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sluice starts");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let listening: serde_json::Value = lines
        .by_ref()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .find(|log| log["fields"]["message"] == "listening")
        .expect("a listening line");
    let grpc = listening["fields"]["grpc"]
        .as_str()
        .expect("the gRPC address")
        .to_owned();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let mut client = RateLimitServiceClient::connect(format!("http://{grpc}"))
            .await
            .expect("a connection");
        let ask = request("web", vec![descriptor(&[("remote_address", "2.2.2.2")])]);
        client.should_rate_limit(ask).await.expect("a decision");
    });
    let decided: serde_json::Value = lines
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .find(|log| log["fields"]["message"] == "decided")
        .expect("a decided line");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(decided["level"], "DEBUG");
    assert_eq!(decided["span"]["name"], "decide");
    assert_eq!(decided["span"]["domain"], "web");
    assert_eq!(decided["span"]["descriptors"], 1);
    assert_eq!(decided["span"]["store"], "memory");
    assert_eq!(decided["span"]["outcome"], "ok");
}

#[test]
fn descriptor_values_are_metric_labels_only_where_a_rule_asks() {
    let rules = "domain: m\ndescriptors:\n  - key: route\n    value_to_metric: true\n    rate_limit: {unit: minute, requests_per_unit: 100}\n  - key: tenant\n    descriptors:\n      - key: path\n        detailed_metric: true\n        rate_limit: {unit: minute, requests_per_unit: 100}\n  - key: plain\n    rate_limit: {unit: minute, requests_per_unit: 100}\n";
    let (_dir, file) = write_rules(rules);
    let args = loopback_args(&file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serving = serve(&args, &[]).expect("sluice serves");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let url = format!("http://{}", serving.grpc);
        let mut client = RateLimitServiceClient::connect(url)
            .await
            .expect("a connection");
        let asks: [&[(&str, &str)]; 4] = [
            &[("route", "/a")],
            &[("tenant", "t1"), ("path", "/x")],
            &[("plain", "p1")],
            &[("plain", "p2")],
        ];
        for entries in asks {
            let ask = request("m", vec![descriptor(entries)]);
            client.should_rate_limit(ask).await.expect("a decision");
        }
    });
    let metrics = runtime
        .block_on(common::http::get(serving.http, "/metrics"))
        .expect("metrics");
    let hits: Vec<&str> = metrics
        .body
        .lines()
        .filter(|line| line.starts_with("sluice_rule_total_hits{"))
        .collect();
    let expected = [
        r#"sluice_rule_total_hits{domain="m",rule="m.plain"} 2"#,
        r#"sluice_rule_total_hits{domain="m",rule="m.route_/a"} 1"#,
        r#"sluice_rule_total_hits{domain="m",rule="m.tenant_t1.path_/x"} 1"#,
    ];
    for line in expected {
        assert!(hits.contains(&line), "{line} not in {hits:?}");
    }
    assert_eq!(hits.len(), 3, "{hits:?}");
}
