//! The documentation and the shipped files follow the code: every configuration field
//! of both daemons is in docs/configuration.md and in the example configuration, and
//! every metric the controller and the watchdog expose is in docs/metrics.md (and the
//! other way round), and the Grafana dashboard asks only for metrics that exist.
//!
//! The fields are found from the binaries themselves: their configurations refuse
//! unknown fields, and serde's refusal lists the fields a section has, so probing
//! `[section] __probe__ = 1` walks the whole tree. A field added to a config struct
//! fails this test until it is documented.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use defib_tests::{built_binary, workspace_root};

/// The names a section's "unknown field `__probe__`, expected one of `a`, `b`" lists;
/// None when the probe is refused for another reason (the path is not a struct).
fn fields_of(bin: &Path, section: &str, dir: &Path) -> Option<Vec<String>> {
    let file = dir.join("probe.toml");
    let text = if section.is_empty() {
        "__probe__ = 1\n".to_string()
    } else {
        format!("[{section}]\n__probe__ = 1\n")
    };
    std::fs::write(&file, text).expect("write probe");
    let out = Command::new(bin)
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .expect("run check-config");
    assert_eq!(out.status.code(), Some(64), "{section}: not refused");
    let err = String::from_utf8_lossy(&out.stderr);
    let rest = err.split("unknown field `__probe__`, expected ").nth(1)?;
    let line = rest.lines().next().unwrap_or("");
    Some(
        line.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// Every leaf field, as dotted paths (`probes.watch_names`).
fn config_leaves(bin: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut leaves = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(section) = todo.pop() {
        let fields = fields_of(bin, &section, dir.path())
            .unwrap_or_else(|| panic!("section [{section}] lists no fields"));
        for f in fields {
            let path = if section.is_empty() {
                f
            } else {
                format!("{section}.{f}")
            };
            if fields_of(bin, &path, dir.path()).is_some() {
                todo.push(path);
            } else {
                leaves.push(path);
            }
        }
    }
    leaves.sort();
    leaves
}

/// The part of docs/configuration.md about one daemon: from its `## <binary>` heading
/// to the next `## `.
fn doc_part(binary: &str) -> String {
    let doc = std::fs::read_to_string(workspace_root().join("docs/configuration.md"))
        .expect("docs/configuration.md");
    let start = doc
        .find(&format!("\n## {binary}"))
        .unwrap_or_else(|| panic!("docs/configuration.md has no `## {binary}` section"));
    let part = &doc[start + 1..];
    let end = part[3..].find("\n## ").map_or(part.len(), |e| e + 3);
    part[..end].to_string()
}

/// Whether an example TOML lists `section.field` (set or commented out): a `field =`
/// line under `[section]`, or a `[section.field]` / `[[section.field]]` table.
fn example_lists(example: &str, path: &str) -> bool {
    let (section, field) = path.rsplit_once('.').unwrap_or(("", path));
    let mut current = String::new();
    for line in example.lines() {
        let l = line.trim_start_matches('#').trim();
        if l.starts_with('[') {
            let name = l.trim_matches(|c| c == '[' || c == ']').trim();
            if name == path {
                return true;
            }
            // A header only counts when it is a TOML header, not prose in a comment.
            if l.ends_with(']') && !name.contains(' ') {
                current = name.to_string();
            }
            continue;
        }
        if current == section {
            if let Some((key, _)) = l.split_once('=') {
                if key.trim() == field {
                    return true;
                }
            }
        }
    }
    false
}

fn check_config_docs(package: &str, binary: &str, example: &str) {
    let leaves = config_leaves(&built_binary(package, binary));
    assert!(leaves.len() > 10, "too few fields found: {leaves:?}");
    let doc = doc_part(binary);
    let example_text =
        std::fs::read_to_string(workspace_root().join("packaging/config").join(example))
            .expect("example config");
    let undocumented: Vec<&String> = leaves
        .iter()
        .filter(|p| !doc.contains(&format!("`{p}`")))
        .collect();
    let not_in_example: Vec<&String> = leaves
        .iter()
        .filter(|p| !example_lists(&example_text, p))
        .collect();
    assert!(
        undocumented.is_empty(),
        "{binary}: fields missing from docs/configuration.md (## {binary}): {undocumented:?}"
    );
    assert!(
        not_in_example.is_empty(),
        "{binary}: fields missing from packaging/config/{example}: {not_in_example:?}"
    );
}

#[test]
fn every_watchdog_config_field_is_in_the_reference_and_the_example() {
    check_config_docs("defib-watchdog", "defib-watchdog", "watchdog.toml");
}

#[test]
fn every_controller_config_field_is_in_the_reference_and_the_example() {
    check_config_docs("defib-controller", "defib-controller", "controller.toml");
}

#[test]
fn the_example_configs_need_only_their_key_file_and_the_api_token_to_pass_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("cluster.key");
    defib_tests::write_secret(&key, "docs-test-key-0123456789abcdef\n").expect("key");
    // The controller's API wants a token (controller.api_token_file is set).
    let token = dir.path().join("api.token");
    defib_tests::write_secret(&token, "docs-test-api-token-0123456789\n").expect("token");
    for (package, binary, example) in [
        ("defib-watchdog", "defib-watchdog", "watchdog.toml"),
        ("defib-controller", "defib-controller", "controller.toml"),
    ] {
        let text = std::fs::read_to_string(workspace_root().join("packaging/config").join(example))
            .expect("example");
        // The controller's key_file is commented out (its default is the same path).
        let text = text
            .replace(
                "# key_file = \"/etc/defib/cluster.key\"",
                "key_file = \"/etc/defib/cluster.key\"",
            )
            .replace("/etc/defib/cluster.key", &key.display().to_string())
            .replace("/etc/defib/api.token", &token.display().to_string());
        let file = dir.path().join(example);
        std::fs::write(&file, text).expect("write");
        let out = Command::new(built_binary(package, binary))
            .arg("--config")
            .arg(&file)
            .arg("check-config")
            .output()
            .expect("check-config");
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `GET path` over plain HTTP/1.1; the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// (family name, type) from `# TYPE` lines.
fn exposed_families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// The sample names a family of each type is asked for by: counters by `_total`
/// (as documented), histograms also by `_bucket`, `_sum` and `_count`.
fn exposed_names(families: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let mut documented_as = Vec::new();
    let mut queryable = Vec::new();
    for (n, t) in families {
        match t.as_str() {
            "counter" => {
                documented_as.push(format!("{n}_total"));
                queryable.push(format!("{n}_total"));
            }
            "histogram" => {
                documented_as.push(n.clone());
                for suffix in ["_bucket", "_sum", "_count"] {
                    queryable.push(format!("{n}{suffix}"));
                }
            }
            _ => {
                documented_as.push(n.clone());
                queryable.push(n.clone());
            }
        }
    }
    (documented_as, queryable)
}

/// The metric names documented in docs/metrics.md under `### {heading}`.
fn documented_metrics(heading: &str) -> Vec<String> {
    let doc =
        std::fs::read_to_string(workspace_root().join("docs/metrics.md")).expect("docs/metrics.md");
    let start = doc
        .find(&format!("\n### {heading}\n"))
        .unwrap_or_else(|| panic!("docs/metrics.md has no `### {heading}`"));
    let part = &doc[start + 1..];
    let end = part[4..].find("\n#").map_or(part.len(), |e| e + 4);
    part[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `defib_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("defib_{n}"))
        .collect()
}

/// Every `defib_…` name the Grafana dashboard queries: in its panels' targets and its
/// template variables.
fn dashboard_metrics() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("packaging/grafana/defib.json"))
            .expect("dashboard"),
    )
    .expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        // A row has no targets.
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(q) = var["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let mut asked = Vec::new();
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("defib_") && !asked.iter().any(|a| a == word) {
                asked.push(word.to_string());
            }
        }
    }
    asked
}

/// What a daemon's `/metrics` shows against the reference: nothing undocumented,
/// nothing documented that is not exposed, and every dashboard query of its metrics
/// (those `is_its` picks) asks for one that exists.
fn check_metrics_docs(text: &str, heading: &str, is_its: impl Fn(&str) -> bool) {
    let families = exposed_families(text);
    assert!(families.len() >= 5, "{text}");
    let (exposed, queryable) = exposed_names(&families);
    let documented = documented_metrics(heading);
    let missing: Vec<&String> = exposed.iter().filter(|n| !documented.contains(n)).collect();
    let stale: Vec<&String> = documented.iter().filter(|n| !exposed.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "exposed but not in docs/metrics.md ({heading}): {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "in docs/metrics.md ({heading}) but not exposed: {stale:?}"
    );
    let asked: Vec<String> = dashboard_metrics()
        .into_iter()
        .filter(|n| is_its(n))
        .collect();
    assert!(!asked.is_empty(), "the dashboard asks for none of them");
    let unknown: Vec<&String> = asked.iter().filter(|n| !queryable.contains(n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard asks for metrics that do not exist: {unknown:?}"
    );
}

#[test]
fn the_metrics_reference_and_the_dashboard_match_what_the_controller_exposes() {
    let dir = tempfile::tempdir().expect("tempdir");
    defib_tests::write_secret(dir.path().join("key"), "metrics-test-key-0123456789abcdef")
        .expect("key");
    let api = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "[controller]\nid = \"docs\"\nkey_file = {:?}\nheartbeat_listen = [\"127.0.0.1:0\"]\n\
         event_listen = \"127.0.0.1:0\"\napi_listen = \"{api}\"\nstore_path = {:?}\n\
         [api]\ninsecure_no_token = true\n",
        dir.path().join("key").display().to_string(),
        dir.path().join("s.sqlite").display().to_string(),
    );
    std::fs::write(dir.path().join("c.toml"), cfg).expect("config");
    let mut child = Command::new(built_binary("defib-controller", "defib-controller"))
        .arg("--config")
        .arg(dir.path().join("c.toml"))
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn controller");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if std::net::TcpStream::connect(&api).is_ok() {
            let t = http_get(&api, "/metrics");
            // The engine publishes the host gauges on its first snapshot.
            if t.contains("defib_hosts{") {
                break t;
            }
        }
        assert!(Instant::now() < deadline, "no /metrics from the controller");
        std::thread::sleep(Duration::from_millis(50));
    };
    defib_tests::stop_child(&mut child, Duration::from_secs(5));
    check_metrics_docs(&text, "Controller metrics", |n| {
        !n.starts_with("defib_watchdog_")
    });
}

#[test]
fn the_metrics_reference_and_the_dashboards_host_row_match_what_the_watchdog_exposes() {
    defib_tests::require!(defib_tests::is_root(), "root (the watchdog's BPF probes)");
    let dir = tempfile::tempdir().expect("tempdir");
    defib_tests::write_secret(dir.path().join("key"), "metrics-test-key-0123456789abcdef")
        .expect("key");
    let metrics = format!("127.0.0.1:{}", free_port());
    // No controller listens there: the watchdog runs (and serves) all the same.
    let cfg = format!(
        "[probes]\npin_dir = \"\"\n[host]\nid = \"docs\"\ncluster_id = \"docs\"\nstate_dir = {:?}\n\
         [controller]\nheartbeat_addrs = [\"127.0.0.1:{}\"]\nevent_addr = \"127.0.0.1:{}\"\nkey_file = {:?}\n\
         [libvirt]\nenabled = false\n[metrics]\nlisten = \"{metrics}\"\n",
        dir.path().join("state").display().to_string(),
        free_port(),
        free_port(),
        dir.path().join("key").display().to_string(),
    );
    std::fs::write(dir.path().join("w.toml"), cfg).expect("config");
    let mut child = Command::new(built_binary("defib-watchdog", "defib-watchdog"))
        .arg("--config")
        .arg(dir.path().join("w.toml"))
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watchdog");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if std::net::TcpStream::connect(&metrics).is_ok() {
            let t = http_get(&metrics, "/metrics");
            // Heartbeats go out from the start; the first one creates its path's series.
            if t.contains("defib_watchdog_heartbeats_sent_total{") {
                break t;
            }
        }
        assert!(Instant::now() < deadline, "no /metrics from the watchdog");
        std::thread::sleep(Duration::from_millis(50));
    };
    defib_tests::stop_child(&mut child, Duration::from_secs(5));
    check_metrics_docs(&text, "Watchdog metrics", |n| {
        n.starts_with("defib_watchdog_")
    });
}
