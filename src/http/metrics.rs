//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4), written by hand.
//! Every metric has `# HELP` and `# TYPE`; every sample is `name{labels} value`.

use std::fmt::Write as _;

use chatlog_raft::node::Node;

use super::counters::ClientCounters;
use super::status::GroupView;

/// Builds the exposition text one metric family at a time.
#[derive(Debug, Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The samples of one histogram: cumulative `_bucket{…,le="…"}`, `_sum`, `_count`
    /// (the family's `# HELP`/`# TYPE histogram` come first, once).
    fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, String)],
        h: &chatlog_storage::HistogramSnapshot,
    ) {
        let bucket = format!("{name}_bucket");
        for &(bound, n) in &h.buckets {
            let mut with_le = labels.to_vec();
            with_le.push((
                "le",
                if bound.is_infinite() {
                    "+Inf".to_owned()
                } else {
                    bound.to_string()
                },
            ));
            self.sample(&bucket, &with_le, n);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count);
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric of the node.
pub fn render(
    node: &Node,
    groups: &[GroupView],
    clients: &ClientCounters,
    uptime_s: f64,
    disk: &super::disk::DiskUsage,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut e = Exposition::default();
    let node_id = node.node_id().to_string();
    let s = node.engine().stats();

    e.family(
        "chatlog_node_info",
        "gauge",
        "Always 1; labels name this node, its version and the storage I/O backend.",
    );
    e.sample(
        "chatlog_node_info",
        &[
            ("node", node_id.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("io_backend", format!("{:?}", s.backend)),
        ],
        1,
    );
    e.single(
        "chatlog_uptime_seconds",
        "gauge",
        "Seconds since the process started serving.",
        uptime_s,
    );

    // Storage engine (one per node, shared by all groups).
    e.single(
        "chatlog_storage_segments",
        "gauge",
        "Segment files in use.",
        s.segments,
    );
    e.single(
        "chatlog_storage_segment_bytes",
        "gauge",
        "Bytes of the segment files on disk.",
        s.segment_bytes,
    );
    e.single(
        "chatlog_storage_logs",
        "gauge",
        "Logs the engine knows.",
        s.logs,
    );
    e.single(
        "chatlog_storage_entries",
        "gauge",
        "Entries currently held across all logs.",
        s.entries,
    );
    e.single(
        "chatlog_storage_index_memory_bytes",
        "gauge",
        "Heap bytes of the storage index.",
        s.index_memory_bytes,
    );
    e.single(
        "chatlog_storage_read_cache_bytes",
        "gauge",
        "Heap bytes of checked records held for reads.",
        s.read_cache_bytes,
    );
    e.single(
        "chatlog_storage_records_written_total",
        "counter",
        "Records written since the engine opened (one record holds many groups' appends).",
        s.records_written,
    );
    e.single(
        "chatlog_storage_bytes_written_total",
        "counter",
        "Bytes written since the engine opened, headers and padding included.",
        s.bytes_written,
    );
    e.single(
        "chatlog_storage_syncs_total",
        "counter",
        "fdatasync calls since the engine opened.",
        s.syncs,
    );
    e.single(
        "chatlog_storage_sync_mean_seconds",
        "gauge",
        "Mean time of one write + fdatasync since the engine opened.",
        s.sync_mean_us / 1e6,
    );
    e.single(
        "chatlog_storage_compacted_bytes_total",
        "counter",
        "Bytes rewritten by compaction since the engine opened.",
        s.compacted_bytes,
    );
    e.single(
        "chatlog_storage_segments_freed_total",
        "counter",
        "Segment files deleted or recycled since the engine opened.",
        s.segments_freed,
    );

    // ---- ops metrics (issue 7): storage latency, entries, queue, disk ----
    e.single(
        "chatlog_storage_entries_written_total",
        "counter",
        "Entries appended since the engine opened (rate() gives entries/s).",
        s.entries_written,
    );
    e.single(
        "chatlog_storage_write_queue_bytes",
        "gauge",
        "Bytes of batches queued for the storage I/O thread now.",
        s.queued_bytes,
    );
    e.family(
        "chatlog_storage_append_latency_seconds",
        "histogram",
        "Submit-to-durable time of each write batch (queue, group commit, write, fdatasync).",
    );
    e.histogram(
        "chatlog_storage_append_latency_seconds",
        &[],
        &s.append_latency,
    );
    e.family(
        "chatlog_storage_sync_latency_seconds",
        "histogram",
        "Write + fdatasync time of each group commit.",
    );
    e.histogram("chatlog_storage_sync_latency_seconds", &[], &s.sync_latency);
    e.single(
        "chatlog_disk_data_dir_bytes",
        "gauge",
        "Bytes allocated to the files under the data directory (a lower bound if the walk stopped at its limit).",
        disk.data_dir_bytes,
    );
    if let Some(free) = disk.free_bytes {
        e.single(
            "chatlog_disk_free_bytes",
            "gauge",
            "Bytes free for the server on the file system holding the data directory.",
            free,
        );
    }
    e.single(
        "chatlog_client_rate_limited_total",
        "counter",
        "Client requests refused with RATE_LIMITED since start.",
        clients.rate_limited.load(Relaxed),
    );
    let pushes = &crate::gateway::PUSH_COUNTERS;
    e.single(
        "chatlog_pushes_total",
        "counter",
        "Pushes queued to client connections since start (one per connection reached).",
        pushes.queued.load(Relaxed),
    );
    e.single(
        "chatlog_push_slow_reader_cutoffs_total",
        "counter",
        "Pushes refused because a connection's push queue was full (that connection closes).",
        pushes.slow_reader_cutoffs.load(Relaxed),
    );
    e.single(
        "chatlog_remote_subscription_looks_total",
        "counter",
        "Reads of a subscribed chat from a node holding its group, for subscriptions on this node to chats of groups it holds no replica of, since start.",
        crate::service::forward::REMOTE_SUBSCRIPTION_LOOKS.load(Relaxed),
    );
    e.single(
        "chatlog_read_barriers_total",
        "counter",
        "Read barriers this node asked for (each linearizable read's: a quorum round at the group's leader, through the transport from a follower), since start.",
        node.read_barriers(),
    );
    e.single(
        "chatlog_forwarded_requests_served_total",
        "counter",
        "Client requests this node answered for other nodes (forwarded to it by a node without a replica of the request's group), since start.",
        crate::service::forward::FORWARDED_REQUESTS_SERVED.load(Relaxed),
    );
    // ---- end ops metrics ----

    // Client gateway.
    e.single(
        "chatlog_client_connections",
        "gauge",
        "Client connections open now (handshake accepted, not yet closed).",
        clients.connections_open(),
    );
    e.single(
        "chatlog_client_connections_total",
        "counter",
        "Client connections whose handshake was accepted since start.",
        clients.connections_opened.load(Relaxed),
    );
    e.single(
        "chatlog_client_requests_total",
        "counter",
        "Client requests answered by the service since start (pings excluded).",
        clients.requests.load(Relaxed),
    );
    e.single(
        "chatlog_client_request_errors_total",
        "counter",
        "Client requests answered with an error since start.",
        clients.request_errors.load(Relaxed),
    );

    // Per group replica.
    let g_label = |g: &GroupView| vec![("group", g.id.to_string())];
    type Field = fn(&GroupView) -> u64;
    let per_group: [(&str, &str, &str, Field); 10] = [
        (
            "chatlog_group_running",
            "gauge",
            "1 while the group's Raft core runs, 0 after a fatal error.",
            |g| u64::from(g.fatal.is_none()),
        ),
        (
            "chatlog_group_term",
            "gauge",
            "Current Raft term of this replica.",
            |g| g.term,
        ),
        (
            "chatlog_group_leader",
            "gauge",
            "Node id of the leader this replica knows; 0 when it knows none.",
            |g| g.leader.unwrap_or(0),
        ),
        (
            "chatlog_group_is_leader",
            "gauge",
            "1 when this node leads the group.",
            |g| u64::from(g.role == "leader"),
        ),
        (
            "chatlog_group_last_log_index",
            "gauge",
            "Last Raft log index appended here (0 also when the log is empty).",
            |g| g.last_log_index.unwrap_or(0),
        ),
        (
            "chatlog_group_committed_index",
            "gauge",
            "Last Raft log index this replica knows as committed.",
            |g| g.committed.unwrap_or(0),
        ),
        (
            "chatlog_group_applied_index",
            "gauge",
            "Last Raft log index applied to this replica's state machine.",
            |g| g.applied.unwrap_or(0),
        ),
        (
            "chatlog_group_apply_lag_entries",
            "gauge",
            "Committed entries not yet applied here.",
            |g| {
                g.committed
                    .unwrap_or(0)
                    .saturating_sub(g.applied.unwrap_or(0))
            },
        ),
        (
            "chatlog_group_elections_total",
            "counter",
            "Term increases (elections) this replica saw since the process started.",
            |g| g.elections,
        ),
        (
            "chatlog_group_leader_changes_total",
            "counter",
            "Times this replica saw a new leader since the process started (the first counts).",
            |g| g.leader_changes,
        ),
    ];
    for (name, kind, help, field) in per_group {
        e.family(name, kind, help);
        for g in groups {
            e.sample(name, &g_label(g), field(g));
        }
    }

    // ---- ops metrics (issue 7): per group ----
    type Gauge = fn(&GroupView) -> u64;
    let per_group_ops: [(&str, &str, Gauge); 3] = [
        (
            "chatlog_group_commit_lag_entries",
            "Entries appended here that this replica does not yet know as committed.",
            |g| {
                g.last_log_index
                    .unwrap_or(0)
                    .saturating_sub(g.committed.unwrap_or(0))
            },
        ),
        (
            "chatlog_group_disk_bytes",
            "Estimated bytes of this replica on this node's disk: the live share of the segment bytes of the group's Raft log and checkpoint logs.",
            |g| g.disk_bytes,
        ),
        (
            "chatlog_group_proposal_queue_length",
            "Proposals waiting for this replica's batcher.",
            |g| g.proposal_queue_len as u64,
        ),
    ];
    for (name, help, field) in per_group_ops {
        e.family(name, "gauge", help);
        for g in groups {
            e.sample(name, &g_label(g), field(g));
        }
    }
    e.family(
        "chatlog_group_commit_latency_seconds",
        "histogram",
        "Propose-to-applied time of each entry proposed here as leader (one entry batches many commands).",
    );
    for g in groups {
        e.histogram(
            "chatlog_group_commit_latency_seconds",
            &g_label(g),
            &g.commit_latency,
        );
    }
    // ---- end ops metrics ----

    // Per follower, from the leader's replication state (groups led here only).
    let follower_labels = |g: &GroupView, f: &super::status::FollowerView| {
        vec![
            ("group", g.id.to_string()),
            ("follower", f.node.to_string()),
        ]
    };
    e.family(
        "chatlog_group_follower_matched_index",
        "gauge",
        "Highest log index known replicated to the follower (groups led here; 0 also when none).",
    );
    for g in groups {
        for f in &g.followers {
            e.sample(
                "chatlog_group_follower_matched_index",
                &follower_labels(g, f),
                f.matched.unwrap_or(0),
            );
        }
    }
    e.family(
        "chatlog_group_follower_lag_entries",
        "gauge",
        "Entries the follower is behind the leader's last log index (groups led here).",
    );
    for g in groups {
        for f in &g.followers {
            e.sample(
                "chatlog_group_follower_lag_entries",
                &follower_labels(g, f),
                f.lag,
            );
        }
    }
    e.family(
        "chatlog_group_follower_last_ack_seconds",
        "gauge",
        "Seconds since the follower last acknowledged the leader (groups led here; absent before the first).",
    );
    for g in groups {
        for f in &g.followers {
            if let Some(ms) = f.last_ack_ms {
                e.sample(
                    "chatlog_group_follower_last_ack_seconds",
                    &follower_labels(g, f),
                    ms as f64 / 1000.0,
                );
            }
        }
    }
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_have_cumulative_buckets_sum_and_count() {
        let h = chatlog_storage::Histogram::default();
        h.record(std::time::Duration::from_micros(80));
        h.record(std::time::Duration::from_millis(20));
        let mut e = Exposition::default();
        e.histogram("lat_seconds", &[("group", "2".into())], &h.snapshot());
        let lines: Vec<&str> = e.out.lines().collect();
        assert_eq!(lines[0], "lat_seconds_bucket{group=\"2\",le=\"0.00005\"} 0");
        assert_eq!(lines[1], "lat_seconds_bucket{group=\"2\",le=\"0.0001\"} 1");
        assert!(
            e.out
                .contains("lat_seconds_bucket{group=\"2\",le=\"0.025\"} 2\n")
        );
        assert!(
            e.out
                .contains("lat_seconds_bucket{group=\"2\",le=\"+Inf\"} 2\n")
        );
        assert!(e.out.contains("lat_seconds_sum{group=\"2\"} 0.02008\n"));
        assert!(e.out.ends_with("lat_seconds_count{group=\"2\"} 2\n"));
    }

    #[test]
    fn labels_are_escaped() {
        let mut e = Exposition::default();
        e.sample("m", &[("a", "x\"y\\z\n".into())], 1);
        assert_eq!(e.out, "m{a=\"x\\\"y\\\\z\\n\"} 1\n");
    }
}
