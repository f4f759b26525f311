//! The namespace lab network itself: paths connect, and a cut link cuts only that host.
use defib_tests::netns::LabNet;
use defib_tests::{have_command, is_root, require};

#[test]
fn a_cut_link_isolates_only_that_host_on_that_path() {
    require!(is_root(), "root (network namespaces)");
    require!(have_command("ping"), "ping (iputils-ping)");
    let net = LabNet::new(2, 2);
    let ctl = net.controller_ns();
    for h in 0..2 {
        for p in 0..2 {
            assert!(
                net.reachable(&ctl, &net.host_addr(h, p)),
                "host {h} path {p} unreachable"
            );
        }
    }
    net.set_link(0, 1, false);
    assert!(
        !net.reachable(&ctl, &net.host_addr(0, 1)),
        "cut link still passes traffic"
    );
    assert!(
        net.reachable(&ctl, &net.host_addr(0, 0)),
        "the other path of host 0 was cut too"
    );
    assert!(
        net.reachable(&ctl, &net.host_addr(1, 1)),
        "host 1 was cut too"
    );
    net.set_link(0, 1, true);
    assert!(
        net.reachable(&ctl, &net.host_addr(0, 1)),
        "restored link does not pass traffic"
    );
}
