//! Losing a Redis master: decisions may fail while Sentinel or the Cluster promotes a replica,
//! and come back by themselves, with no restart of Sluice.

mod common;

use std::time::{Duration, Instant};

use common::redis::{MASTER_NAME, RedisCluster, SentinelSetup};
use sluice::bucket::Shape;
use sluice::store::{Charge, Mode, RedisSettings, RedisStore, Topology};

fn settings(topology: Topology) -> RedisSettings {
    RedisSettings {
        topology,
        password: None,
        timeout: Duration::from_millis(500),
        connections: 2,
        tls_ca: None,
    }
}

/// Charges on `spread` keys, which land on different Cluster slots.
fn charges(round: usize, spread: usize) -> Vec<Vec<Charge>> {
    let shape = Shape::new(1_000_000, 1_000_000, 1_000_000).expect("a shape");
    (0..spread)
        .map(|k| {
            let key = format!("failover:{k}:{}", round % 7).into_bytes();
            vec![Charge {
                key,
                shape: Some(shape),
                hits: 1,
                mode: Mode::Enforce,
            }]
        })
        .collect()
}

/// Decides until every key succeeds again; returns how many decisions failed on the way.
async fn recover(store: &RedisStore, spread: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut failed = 0;
    let mut round = 0;
    loop {
        round += 1;
        let mut all_ok = true;
        for charge in charges(round, spread) {
            if store.charge(&charge).await.is_err() {
                failed += 1;
                all_ok = false;
            }
        }
        if all_ok {
            return failed;
        }
        assert!(
            Instant::now() < deadline,
            "decisions did not recover within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed() {
    let mut setup = SentinelSetup::start();
    let topology = Topology::Sentinel {
        sentinels: setup.sentinels(),
        master: MASTER_NAME.to_owned(),
    };
    let store = RedisStore::connect(&settings(topology))
        .await
        .expect("the master answers");
    assert_eq!(recover(&store, 4, Duration::from_secs(5)).await, 0);

    let old_master = setup.master.port;
    setup.master.kill();
    recover(&store, 4, Duration::from_secs(60)).await;
    assert_eq!(setup.current_master_port(), setup.replica.port);
    assert_ne!(setup.current_master_port(), old_master);
    // The promoted replica holds the buckets now.
    assert!(
        setup
            .replica
            .cli(&["KEYS", "failover:*"])
            .contains("failover:")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_failover_is_followed() {
    let mut cluster = RedisCluster::start_with_replicas();
    let topology = Topology::Cluster {
        nodes: cluster.seeds(),
    };
    let store = RedisStore::connect(&settings(topology))
        .await
        .expect("the cluster answers");
    assert_eq!(recover(&store, 12, Duration::from_secs(5)).await, 0);

    // Kill a node that is a master now.
    let master = cluster
        .nodes
        .iter()
        .position(|node| node.cli(&["ROLE"]).starts_with("master"))
        .expect("a master");
    cluster.nodes[master].kill();
    recover(&store, 12, Duration::from_secs(60)).await;
}
