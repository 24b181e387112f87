//! Every shipped example config loads; every bad config is refused with a
//! message that names the offending key.

use std::path::Path;

use usher::config::Config;

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("usher.example.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners.len(), 2);
    assert!(
        config.tls.as_ref().unwrap().cert.exists(),
        "example cert path resolves"
    );
    assert!(config.limits.idle_timeout.as_secs() >= 30 * 60);
}

#[test]
fn bad_configs_name_the_key() {
    let expected = [
        ("admin_not_loopback.toml", "admin.address"),
        ("bad_address.toml", "address"),
        ("bad_duration.toml", "failure_delay"),
        ("bad_protocol.toml", "protocol"),
        ("bad_trusted_network.toml", "trusted_proxies"),
        ("duplicate_address.toml", "listener[1].address"),
        ("health_down_after_zero.toml", "health.down_after"),
        ("health_password_without_user.toml", "health.test_password"),
        ("idle_timeout_short.toml", "limits.idle_timeout"),
        ("master_without_password.toml", "backends.master_user"),
        ("proxy_protocol_not_bool.toml", "proxy_protocol"),
        ("proxy_without_trusted.toml", "listener[0].trusted_proxies"),
        ("tls_without_cert.toml", "listener[0].tls"),
        ("trusted_without_proxy.toml", "listener[0].proxy_protocol"),
        ("unknown_limit_key.toml", "line_buffer"),
        ("unknown_top_key.toml", "surprise"),
        ("unsupported_store.toml", "store.url"),
        ("zero_literal.toml", "limits.literal_bytes"),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/bad");
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, expected.len(), "every bad config has an expectation");
    for (file, key) in expected {
        match Config::load(&dir.join(file)) {
            Ok(_) => panic!("{file} was accepted"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(key), "{file}: {msg:?} does not name {key}");
            }
        }
    }
}

/// `usher check-config` reads every file the configuration names, as
/// `serve` does: a missing key or master-password file is named with its
/// key, and the shipped example passes.
#[test]
fn check_config_reads_the_files_it_names() {
    let usher = env!("CARGO_BIN_EXE_usher");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("usher.example.toml");
    let run = |config: &Path| {
        std::process::Command::new(usher)
            .arg("check-config")
            .arg("--config")
            .arg(config)
            .output()
            .unwrap()
    };
    assert!(run(&example).status.success());

    let text = std::fs::read_to_string(&example).unwrap();
    let certs = root.join("certs-example");
    let text = text.replace("certs-example/", &format!("{}/", certs.display()));
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            text.replace("localhost.key", "missing.key"),
            "tls.cert / tls.key",
            "missing.key",
        ),
        (
            text.replace(
                "master_password = \"change-me\"",
                "master_password_file = \"/nonexistent/master-password\"",
            ),
            "backends.master_password_file",
            "/nonexistent/master-password",
        ),
        (
            text.replace("certs-example/ca.crt", "certs-example/missing-ca.crt"),
            "backends.ca",
            "missing-ca.crt",
        ),
        (
            text.replace("sqlite://usher.db", "sqlite:///nonexistent/dir/usher.db"),
            "store.url",
            "/nonexistent/dir",
        ),
    ];
    for (i, (config, key, file)) in cases.iter().enumerate() {
        assert_ne!(config, &text, "case {i} changed nothing");
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, config).unwrap();
        let out = run(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(err.contains(key) && err.contains(file), "case {i}: {err}");
    }
}
