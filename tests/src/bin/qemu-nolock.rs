//! `defib-qemu-nolock ARGS...`: runs `/usr/bin/qemu-system-x86_64 ARGS...` with qemu's own
//! image locking switched off, as a domain's `<emulator>`, for the virtlockd tests.
//!
//! On one kernel, qemu's OFD locks on an image refuse a second qemu on the same disk
//! before libvirt's lock manager is even asked (virtlockd takes its lease when the vCPUs
//! start). Between real hosts those locks reach each other only if the shared file
//! system carries them, so a test that wants to see virtlockd's own refusal, as a second
//! host would meet it, turns qemu's off: every `-blockdev` whose JSON names the `file`
//! or `host_device` driver gets `"locking":"off"`. Everything else passes through
//! untouched, and qemu replaces this process (same pid, so libvirt's pid file is right).
use std::os::unix::process::CommandExt as _;
use std::process::{Command, ExitCode};

use serde_json::Value;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The `-blockdev` value with qemu's image locking off, if it is a protocol node that
/// locks (anything else, and any value that is not JSON, is returned as it is).
fn without_locking(value: &str) -> String {
    let Ok(Value::Object(mut node)) = serde_json::from_str::<Value>(value) else {
        return value.to_string();
    };
    let locks = matches!(
        node.get("driver").and_then(Value::as_str),
        Some("file" | "host_device")
    );
    if !locks {
        return value.to_string();
    }
    node.insert("locking".into(), Value::String("off".into()));
    Value::Object(node).to_string()
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    for i in 1..args.len() {
        if args[i - 1] == "-blockdev" {
            args[i] = without_locking(&args[i]);
        }
    }
    let err = Command::new(QEMU).args(&args).exec();
    eprintln!("defib-qemu-nolock: cannot run {QEMU}: {err}");
    ExitCode::from(127)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_file_protocol_nodes_lose_their_locks() {
        let file = r#"{"driver":"file","filename":"/d.raw","node-name":"libvirt-1-storage"}"#;
        let got: Value = serde_json::from_str(&without_locking(file)).unwrap();
        assert_eq!(got["locking"], "off");
        assert_eq!(got["filename"], "/d.raw");
        let format =
            r#"{"node-name":"libvirt-1-format","driver":"raw","file":"libvirt-1-storage"}"#;
        assert_eq!(without_locking(format), format);
        assert_eq!(
            without_locking("driver=file,filename=/d"),
            "driver=file,filename=/d"
        );
    }
}
