//! Any text as the watchdog's config file, through the parse and validate the daemon
//! runs at start (`WatchdogConfig::parse`, then `validate`): neither may panic, both
//! are deterministic, and a config that validates yields its derived settings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchdog::config::WatchdogConfig;

fuzz_target!(|data: &[u8]| {
    // The daemon reads the file with read_to_string: non-UTF-8 is refused before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = WatchdogConfig::parse(text) else {
        return;
    };
    // No serializer exists, so the cheap property is determinism: the same text parses
    // to the same config, and validating it twice gives the same verdict.
    assert_eq!(WatchdogConfig::parse(text).ok().as_ref(), Some(&cfg));
    let verdict = cfg.validate();
    assert_eq!(cfg.validate(), verdict, "validation is not deterministic");
    if verdict.is_err() {
        return;
    }
    // What the daemon derives from a valid config right after validating it.
    let _ = cfg.name_patterns();
    let _ = cfg.libvirt.enabled_for_run();
    if let Some(controller) = &cfg.controller {
        let _ = controller.heartbeat_socket_addrs();
        let _ = controller.event_socket_addrs();
    }
});
