//! Any text as the controller's config file, through what the daemon runs at start:
//! `ControllerConfig::parse`, then `resolve` (every check, and the secrets read), then
//! `engine_config`. None may panic, and parsing is deterministic.
//!
//! `resolve` reads the files the config names. So that the fuzzer gets past the key
//! check to the later ones, the target works in a directory holding a valid key, API
//! token and password under short relative names (`key`, `token`, `pass`), which the
//! seed corpus uses.
#![no_main]

use std::sync::Once;

use controller::config::ControllerConfig;
use libfuzzer_sys::fuzz_target;

static FIXTURES: Once = Once::new();

/// Makes the fixture directory and enters it, once per process. A failure here is the
/// machine's, not the input's: aborting says so at once instead of fuzzing blind.
fn enter_fixtures() {
    FIXTURES.call_once(|| {
        let dir =
            std::env::temp_dir().join(format!("defib-fuzz-controller-{}", std::process::id()));
        let files: [(&str, &str); 3] = [
            ("key", "0123456789abcdef0123456789abcdef\n"),
            ("token", "fuzzing-api-token-0123456789\n"),
            ("pass", "secret\n"),
        ];
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            files.iter().try_for_each(|(name, text)| {
                // 0600: the controller refuses secret files open to group or others.
                std::fs::write(dir.join(name), text).and_then(|()| {
                    std::fs::set_permissions(
                        dir.join(name),
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )
                })
            })
        });
        if let Err(e) = made.and_then(|()| std::env::set_current_dir(&dir)) {
            panic!(
                "cannot prepare the fixture directory {}: {e}",
                dir.display()
            );
        }
    });
}

/// Whether `resolve` may read the files this text names. Device, proc and sys files
/// can block or never end (/dev/zero, a FIFO): that is an operator's choice of path,
/// not a parser bug, and would only show up as a fuzzer timeout. TOML escapes could
/// spell such a path in disguise, so texts with them are only parsed.
fn safe_to_resolve(text: &str) -> bool {
    !["dev", "proc", "sys", "\\u", "\\U", "\\x"]
        .iter()
        .any(|word| text.contains(word))
}

fuzz_target!(|data: &[u8]| {
    enter_fixtures();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = ControllerConfig::parse(text) else {
        return;
    };
    // No serializer exists; determinism is the cheap property. Debug, not PartialEq:
    // `engine.max_dead_share = nan` parses, and NaN is not equal to itself.
    let again = ControllerConfig::parse(text).map(|c| format!("{c:?}"));
    assert_eq!(
        again.ok(),
        Some(format!("{cfg:?}")),
        "parsing is not deterministic"
    );
    if !safe_to_resolve(text) {
        return;
    }
    let Ok(resolved) = cfg.resolve() else {
        return;
    };
    let _ = resolved.cfg.engine_config();
});
