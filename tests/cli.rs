//! The `sessions` CLI, run as a process against a real redis-server.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::redis::RedisServer;

fn cli(args: &[&str], redis_url: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"));
    command
        .args(args)
        .env_remove("MCP_SESSION_REDIS_URL")
        .env_remove("RUST_LOG");
    if let Some(url) = redis_url {
        command.env("MCP_SESSION_REDIS_URL", url);
    }
    command.output().expect("run the binary")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn seed(redis: &RedisServer) {
    let record = |id: &str, user: &str, extra: &str| {
        format!(
            r#"{{"connection_id": "{id}", "created_at": "2026-01-15T10:00:00.000000", "last_activity_at": "2026-01-15T10:05:00.000000", "metadata": {{"user_id": "{user}"}}{extra}}}"#
        )
    };
    redis
        .cli(&[
            "SET",
            "mcp:session:s-1",
            &record(
                "s-1",
                "alice",
                r#", "state": "active", "owner_pod": "web-0""#,
            ),
            "EX",
            "600",
        ])
        .unwrap();
    redis
        .cli(&[
            "SET",
            "mcp:session:s-2",
            &record("s-2", "bob", r#", "state": "draining""#),
            "EX",
            "7200",
        ])
        .unwrap();
    redis
        .cli(&[
            "SET",
            "mcp:session:s-3",
            &record("s-3", "carol", ""),
            "EX",
            "86400",
        ])
        .unwrap();
    redis.cli(&["SET", "mcp:session:broken", "{oops"]).unwrap();
}

#[test]
fn list_get_delete_stats() {
    let redis = RedisServer::start();
    seed(&redis);
    let url = redis.url();

    let table = cli(&["sessions", "list"], Some(&url));
    let text = stdout(&table);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID"), "{text}");
    for header in ["USER", "CREATED", "LAST ACTIVITY", "TTL", "STATE", "POD"] {
        assert!(lines[0].contains(header), "{header} in {text}");
    }
    assert_eq!(lines.len(), 4, "{text}");
    assert!(text.contains("alice") && text.contains("web-0") && text.contains("draining"));
    assert!(
        stderr(&table)
            .contains("warning: skipped record mcp:session:broken: malformed session JSON"),
        "{}",
        stderr(&table)
    );
    assert!(
        !stderr(&table).contains('\u{1b}'),
        "no progress bar drawn when piped"
    );

    let json: Value = serde_json::from_str(&stdout(&cli(
        &["sessions", "list", "-o", "json", "--state", "draining"],
        Some(&url),
    )))
    .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    assert_eq!(json[0]["id"], "s-2");
    let yaml = stdout(&cli(
        &["sessions", "list", "-o", "yaml", "--pod", "web-0"],
        Some(&url),
    ));
    assert!(yaml.contains("id: s-1") && !yaml.contains("s-3"), "{yaml}");
    let limited: Value = serde_json::from_str(&stdout(&cli(
        &["sessions", "list", "-o", "json", "--limit", "2"],
        Some(&url),
    )))
    .unwrap();
    assert_eq!(limited.as_array().unwrap().len(), 2);

    let one: Value = serde_json::from_str(&stdout(&cli(
        &["sessions", "get", "s-3", "-o", "json"],
        Some(&url),
    )))
    .unwrap();
    assert_eq!(one["metadata"]["user_id"], "carol");
    assert!(one["ttl_millis"].as_u64().unwrap() > 86_000_000);

    let stats_text = stdout(&cli(&["sessions", "stats"], Some(&url)));
    assert!(
        stats_text.contains("Unreadable:  1 (malformed: 1)"),
        "{stats_text}"
    );
    let stats: Value = serde_json::from_str(&stdout(&cli(
        &["sessions", "stats", "-o", "json"],
        Some(&url),
    )))
    .unwrap();
    assert_eq!(stats["scanned"]["total"], 3);
    assert_eq!(stats["scanned"]["draining"], 1);
    assert_eq!(stats["indexed"], Value::Null, "seed-written: no index yet");
    assert_eq!(stats["readOnly"], true);
    assert_eq!(stats["scanned"]["per_pod"]["web-0"], 1);
    assert_eq!(stats["unreadable"]["malformed"], 1);
    assert_eq!(stats["oldestCreated"], "2026-01-15T10:00:00Z");
    assert!(stats["memory"]["mean_bytes"].as_u64().unwrap() > 100);

    assert_eq!(
        stdout(&cli(&["sessions", "delete", "s-1"], Some(&url))).trim(),
        "session s-1 deleted"
    );
    let gone = cli(&["sessions", "get", "s-1"], Some(&url));
    assert_eq!(gone.status.code(), Some(1));
    assert!(stderr(&gone).contains("session s-1 not found"));
    assert_eq!(
        cli(&["sessions", "delete", "s-1"], Some(&url))
            .status
            .code(),
        Some(1)
    );
    // The unreadable record is still there: nothing deletes what it cannot parse.
    assert_eq!(
        redis.cli(&["GET", "mcp:session:broken"]).unwrap().trim(),
        "{oops"
    );
}

#[test]
fn unreachable_redis_is_one_clear_line_with_the_password_masked() {
    let url = format!("redis://:topsecret@127.0.0.1:{}/0", support::free_port());
    let output = cli(&["sessions", "list", "--redis-url", &url], None);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot reach Redis at redis://:***@127.0.0.1:"),
        "{err}"
    );
    assert!(!err.contains("topsecret"));
}

/// `sessions stats|list|get` on a Redis under memory pressure: they read and never write, so a
/// full Redis (which refuses writes) answers them, and an evicting one (which evicts a session
/// for every write it takes) loses nothing to them. 2,000 seed-written sessions and no index,
/// which a counting pass that wrote would build.
#[test]
fn stats_writes_nothing_on_a_full_or_an_evicting_redis() {
    let redis = RedisServer::start();
    redis
        .cli(&[
            "EVAL",
            r#"for i = 1, 2000 do
                 local id = 'bulk-' .. i
                 redis.call('SET', 'mcp:session:' .. id, '{"connection_id": "' .. id .. '", "created_at": "2026-01-15T10:00:00.000000", "last_activity_at": "2026-01-15T10:05:00.000000", "owner_pod": "web-' .. (i % 3) .. '", "metadata": {"user_id": "u' .. i .. '"}}', 'EX', 3600)
               end"#,
            "0",
        ])
        .unwrap();
    let keys = || {
        redis
            .cli(&["DBSIZE"])
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(keys(), 2000);

    // Full: noeviction at its limit refuses every write.
    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .unwrap();
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).unwrap();
    let output = cli(&["sessions", "stats"], Some(&redis.url()));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("Index:       none yet"), "{text}");
    assert!(text.contains("Read only:   nothing was written"), "{text}");
    let json: Value = serde_json::from_str(&stdout(&cli(
        &["sessions", "stats", "-o", "json"],
        Some(&redis.url()),
    )))
    .unwrap();
    assert_eq!(json["scanned"]["total"], 2000);
    assert_eq!(json["indexed"], Value::Null);
    assert_eq!(json["readOnly"], true);
    let all_succeed = |commands: &[&[&str]]| {
        for args in commands {
            let output = cli(args, Some(&redis.url()));
            assert_eq!(
                output.status.code(),
                Some(0),
                "{args:?}: {}",
                stderr(&output)
            );
        }
    };
    all_succeed(&[
        &["sessions", "list", "--limit", "5"],
        &["sessions", "get", "bulk-7"],
    ]);

    // Evicting: any key may go to make room for a write, or for replies waiting in Redis's
    // output buffer; 64 KiB of room is more than a page of replies and less than an index of
    // 2,000 sessions takes.
    redis.limit_memory("allkeys-lru", 64 * 1024);
    let (keys_before, evicted_before) = (keys(), redis.info_number("evicted_keys"));
    all_succeed(&[
        &["sessions", "stats"],
        &["sessions", "stats", "-o", "json"],
        &["sessions", "list"],
    ]);
    assert_eq!(
        (keys(), redis.info_number("evicted_keys")),
        (keys_before, evicted_before),
        "no session evicted by reading"
    );
}

#[test]
fn a_port_that_is_not_redis_is_one_line() {
    // Something that answers HTTP where Redis was expected.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::Write as _;
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let output = cli(
        &[
            "sessions",
            "stats",
            "--redis-url",
            &format!("redis://127.0.0.1:{port}"),
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(
        err.trim_end(),
        format!(
            "error: the server at redis://127.0.0.1:{port} does not speak the Redis protocol: is this the Redis port?"
        )
    );
}

#[test]
fn usage_errors_exit_2() {
    let cases: [(&[&str], Option<&str>, &str); 6] = [
        (&["sessions", "list"], None, "no Redis URL"),
        (
            &["sessions", "get", "bad id"],
            Some("redis://127.0.0.1:1"),
            "invalid session id",
        ),
        (
            &["sessions", "get", "x*"],
            Some("redis://127.0.0.1:1"),
            "invalid session id",
        ),
        (
            &["sessions", "list", "--redis-url", "http://nope"],
            None,
            "invalid Redis URL",
        ),
        (
            &["sessions", "list", "--state", "zombie"],
            Some("redis://127.0.0.1:1"),
            "unknown session state",
        ),
        (&["sessions", "frobnicate"], None, "unrecognized subcommand"),
    ];
    // `crd` prints the committed CRD.
    let crd = cli(&["crd"], None);
    assert_eq!(
        String::from_utf8_lossy(&crd.stdout),
        include_str!("../crds/mcpsessionpolicies.yaml")
    );
    for (args, url, message) in cases {
        let output = cli(args, url);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(message),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let output = cli(&["proxy", "--listen", "127.0.0.1:1"], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--upstream"),
        "{}",
        stderr(&output)
    );
    let output = cli(
        &["proxy", "--listen", "127.0.0.1:1", "--upstream", "ftp://x"],
        None,
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("the upstream is http://HOST:PORT"),
        "{}",
        stderr(&output)
    );
}
