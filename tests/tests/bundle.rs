//! `cargo xtask bundle` makes one tarball that installs into a fresh root: the
//! checksum matches, install.sh creates the user, directories and configurations and
//! never overwrites a configuration on a second run, the installed binaries run, and
//! the installed units pass `systemd-analyze verify`.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use defib_tests::{have_command, is_root, require, workspace_root};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Packs the bundle from dev builds, built here like every test's binaries (xtask only
/// packs them: a cargo nested in xtask sees another environment and would rebuild).
fn build_bundle(out: &Path) -> PathBuf {
    for (package, bin) in [
        ("defib-watchdog", "defib-watchdog"),
        ("defib-controller", "defib-controller"),
        ("defibctl", "defibctl"),
    ] {
        defib_tests::built_binary(package, bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = run(defib_tests::scrub_cargo_env(&mut Command::new(cargo))
        .args([
            "run",
            "--quiet",
            "-p",
            "xtask",
            "--",
            "bundle",
            "--profile",
            "dev",
            "--no-build",
            "--out",
        ])
        .arg(out)
        .current_dir(workspace_root()));
    let path = PathBuf::from(
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or(""),
    );
    assert!(path.exists(), "xtask bundle printed {path:?}");
    path
}

#[test]
fn the_bundle_installs_into_a_fresh_root_where_its_binaries_run_and_its_units_verify() {
    require!(is_root(), "root (install.sh sets owners)");
    require!(
        have_command("systemd-analyze"),
        "systemd-analyze (Debian package systemd; cargo xtask setup installs it)"
    );
    require!(
        have_command("systemd-sysusers"),
        "systemd-sysusers (Debian package systemd)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let tarball = build_bundle(&tmp.path().join("out"));
    let name = tarball.file_name().unwrap().to_string_lossy().to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        name.starts_with(&format!("defib-{version}")) && name.ends_with("-linux.tar.gz"),
        "{name}"
    );

    // The checksum beside it, in sha256sum's format.
    run(Command::new("sha256sum")
        .args(["--check", "--strict", &format!("{name}.sha256")])
        .current_dir(tarball.parent().unwrap()));

    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpacked));
    let top: Vec<PathBuf> = std::fs::read_dir(&unpacked)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(top.len(), 1, "one top directory: {top:?}");
    let bundle = &top[0];
    for f in [
        "bin/defib-watchdog",
        "bin/defib-controller",
        "bin/defibctl",
        "systemd/defib-watchdog.service",
        "systemd/defib-controller.service",
        "sysusers.d/defib.conf",
        "config/watchdog.toml",
        "config/controller.toml",
        "grafana/defib.json",
        "docs/operator-guide.md",
        "docs/configuration.md",
        "install.sh",
        "VERSION",
    ] {
        assert!(bundle.join(f).exists(), "the bundle has no {f}");
    }

    // A fresh root, installed twice; the second run keeps an edited configuration.
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let install = || {
        run(Command::new(bundle.join("install.sh"))
            .arg("--root")
            .arg(&root))
    };
    install();
    let wd_conf = root.join("etc/defib/watchdog.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(&wd_conf).expect("watchdog.toml installed")
    );
    std::fs::write(&wd_conf, &edited).unwrap();
    let second = install();
    assert!(String::from_utf8_lossy(&second.stdout)
        .contains("kept the existing /etc/defib/watchdog.toml"));
    assert_eq!(
        std::fs::read_to_string(&wd_conf).unwrap(),
        edited,
        "install.sh overwrote a configuration"
    );
    assert!(root.join("etc/defib/watchdog.toml.example").exists());
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    assert_eq!(
        passwd.lines().filter(|l| l.starts_with("defib:")).count(),
        1,
        "{passwd}"
    );
    for d in [
        "var/lib/defib-controller",
        "var/lib/defib-watchdog",
        "etc/defib",
    ] {
        assert!(root.join(d).is_dir(), "no {d}");
    }

    // The installed binaries run.
    let bin = root.join("usr/local/bin");
    for b in ["defib-watchdog", "defib-controller", "defibctl"] {
        let out = run(Command::new(bin.join(b)).arg("--version"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(version),
            "{b} --version: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The installed configurations pass check-config once the key is there (paths
    // moved under the fresh root), and name the key file when it is not. The
    // controller's also wants its API token (the packaged config names the file).
    let key = root.join("etc/defib/cluster.key");
    let token = tmp.path().join("api.token");
    std::fs::write(&token, "bundle-test-api-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for (b, conf) in [
        ("defib-watchdog", "watchdog.toml"),
        ("defib-controller", "controller.toml"),
    ] {
        let text = std::fs::read_to_string(root.join("etc/defib").join(conf))
            .unwrap()
            .replace(
                "# key_file = \"/etc/defib/cluster.key\"",
                "key_file = \"/etc/defib/cluster.key\"",
            )
            .replace("/etc/defib/cluster.key", &key.display().to_string())
            .replace("/etc/defib/api.token", &token.display().to_string());
        let moved = tmp.path().join(conf);
        std::fs::write(&moved, text).unwrap();
        let out = Command::new(bin.join(b))
            .arg("--config")
            .arg(&moved)
            .arg("check-config")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{b} without a key: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("key_file"),
            "{out:?}"
        );
        defib_tests::write_secret(&key, "bundle-test-key-0123456789abcdef\n").unwrap();
        run(Command::new(bin.join(b))
            .arg("--config")
            .arg(&moved)
            .arg("check-config"));
        std::fs::remove_file(&key).unwrap();
    }

    // The installed units verify (their binaries resolved inside the fresh root).
    let units = tmp.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let mut paths = Vec::new();
    for unit in ["defib-watchdog.service", "defib-controller.service"] {
        let text = std::fs::read_to_string(root.join("etc/systemd/system").join(unit))
            .expect("unit installed");
        for needed in [
            "Type=notify",
            "WatchdogSec=",
            "Restart=always",
            "StateDirectory=",
        ] {
            assert!(text.contains(needed), "{unit} lacks {needed}");
        }
        let p = units.join(unit);
        std::fs::write(
            &p,
            text.replace("/usr/local/bin/", &format!("{}/", bin.display())),
        )
        .unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // The controller's runs as its own user; the watchdog's holds only its capabilities.
    let ctl = std::fs::read_to_string(&paths[1]).unwrap();
    assert!(ctl.contains("User=defib"));
    let wd = std::fs::read_to_string(&paths[0]).unwrap();
    let caps = wd
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the watchdog unit bounds its capabilities");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_KILL"] {
        assert!(caps.contains(cap), "{caps}");
    }
    // No CAP_SYS_RESOURCE: BPF memory is charged to the memory cgroup on every
    // supported kernel (docs/security.md).
    for cap in ["CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_DAC_OVERRIDE"] {
        assert!(!caps.contains(cap), "{caps}");
    }

    // And the watchdog attaches its probes with exactly that capability set.
    let set: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut child = Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{}", set.join(",")))
        .arg(bin.join("defib-watchdog"))
        .args(["events", "--watch-name", "dfcaps-none"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    let stderr = child.stderr.take().unwrap();
    let attached = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .take_while(|l| !l.contains("probes attached"))
        .collect::<Vec<_>>();
    let exited = child.try_wait().unwrap();
    defib_tests::stop_child(&mut child, std::time::Duration::from_secs(5));
    assert!(
        exited.is_none(),
        "the watchdog did not attach with only {caps}:\n{}",
        attached.join("\n")
    );
}
