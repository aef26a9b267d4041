//! Rules that change while serving: edited files, an atomic `mv`, a Kubernetes ConfigMap
//! symlink swap, broken files, SIGHUP; and SIGTERM while calls are in flight.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Harness, descriptor, request};
use sluice::proto::Code;

fn rules(per_minute: u32) -> String {
    format!(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: minute, requests_per_unit: {per_minute}}}\n"
    )
}

/// Writes `text` beside `path`, then renames it over `path`, as editors and deploy tools do.
fn replace_atomically(path: &Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).expect("the staged file is written");
    std::fs::rename(&staged, path).expect("the file is replaced");
}

/// The requests per unit that a decision on ("k", value) reports.
async fn limit_of(h: &mut Harness, value: &str) -> Option<u32> {
    let response = h.one("d", &[("k", value)]).await;
    response.statuses[0]
        .current_limit
        .as_ref()
        .map(|limit| limit.requests_per_unit)
}

async fn eventually_limit(h: &mut Harness, expected: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while limit_of(h, "probe").await != Some(expected) {
        assert!(
            Instant::now() < deadline,
            "the rules did not change to {expected} per minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn watch(h: &Harness, paths: Vec<std::path::PathBuf>) -> tokio::sync::watch::Sender<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The fingerprint is taken now, before the test changes anything.
    let loaded = sluice::reload::fingerprint(&paths);
    let every = Duration::from_millis(50);
    let watcher = sluice::reload::watch_files(h.limiter.clone(), paths, loaded, every, stopped);
    tokio::spawn(watcher);
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_or_replaced_file_takes_effect() {
    let mut h = Harness::start(Backend::Memory, &rules(3)).await;
    let _stop = watch(&h, vec![h.rules_path()]);
    assert_eq!(limit_of(&mut h, "probe").await, Some(3));

    std::fs::write(h.rules_path(), rules(7)).expect("the file is edited");
    eventually_limit(&mut h, 7).await;
    replace_atomically(&h.rules_path(), &rules(11));
    eventually_limit(&mut h, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_takes_effect() {
    let mut h = Harness::start(Backend::Memory, &rules(3)).await;
    // A ConfigMap mount: rules.yaml -> ..data/rules.yaml, ..data -> ..v1.
    let mount = tempfile::tempdir().expect("a directory");
    let version = |name: &str, per_minute: u32| {
        let dir = mount.path().join(name);
        std::fs::create_dir(&dir).expect("a version directory");
        std::fs::write(dir.join("rules.yaml"), rules(per_minute)).expect("written");
    };
    version("..v1", 3);
    std::os::unix::fs::symlink("..v1", mount.path().join("..data")).expect("a link");
    std::os::unix::fs::symlink("..data/rules.yaml", mount.path().join("rules.yaml"))
        .expect("a link");
    let _stop = watch(&h, vec![mount.path().to_owned()]);
    sluice::reload::reload(&h.limiter, &[mount.path().to_owned()]).expect("the mount loads");

    version("..v2", 13);
    std::os::unix::fs::symlink("..v2", mount.path().join("..data_tmp")).expect("a link");
    std::fs::rename(mount.path().join("..data_tmp"), mount.path().join("..data")).expect("swapped");
    eventually_limit(&mut h, 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_under_load_keep_the_old_rules() {
    let mut h = Harness::start(Backend::Memory, &rules(5)).await;
    let _stop = watch(&h, vec![h.rules_path()]);

    // Steady load on other keys while the file goes bad in several ways.
    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..4)
        .map(|t| {
            let (mut client, stop) = (h.client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let ask = request("d", vec![descriptor(&[("k", &format!("load-{t}-{i}"))])]);
                    if client.should_rate_limit(ask).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();

    let broken = [
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n".to_owned(),
        String::new(),
        rules(5)[..20].to_owned(),
        "\u{0}\u{1}binary".to_owned(),
    ];
    for text in &broken {
        replace_atomically(&h.rules_path(), text);
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.limiter.rules_error().is_none() {
            assert!(
                Instant::now() < deadline,
                "the broken file was not noticed: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The old limit, 5 per minute, still holds.
        assert_eq!(limit_of(&mut h, "old").await, Some(5));
        // A good file clears the error before the next broken one.
        replace_atomically(&h.rules_path(), &rules(5));
        while h.limiter.rules_error().is_some() {
            assert!(Instant::now() < deadline, "the good file was not noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The bucket of "old" survived every reload: 5 minus the 4 asks above.
    assert_eq!(
        common::codes(&h.one("d", &[("k", "old")]).await),
        [(Code::Ok, 0)]
    );

    replace_atomically(&h.rules_path(), &rules(9));
    eventually_limit(&mut h, 9).await;
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        assert_eq!(
            loader.await.expect("a load task ends"),
            0,
            "a decision failed"
        );
    }
}
