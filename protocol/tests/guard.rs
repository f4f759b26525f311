mod common;

use common::*;
use protocol::{
    encode_ack, encode_heartbeat, AckReceiver, EventDedup, EventVerdict, Freshness, Heartbeat,
    HeartbeatReceiver, RejectReason, ReplayGuard, SequenceWindow, REORDER_WINDOW,
};

fn receiver() -> HeartbeatReceiver {
    HeartbeatReceiver::new(key(), CLUSTER)
}

fn send(rx: &mut HeartbeatReceiver, hb: &Heartbeat<'_>) -> Result<Freshness, RejectReason> {
    let bytes = encode_heartbeat(hb, &key()).unwrap();
    rx.receive(&bytes).map(|a| a.freshness)
}

#[test]
fn the_first_heartbeat_from_a_host_is_accepted_as_first() {
    let mut rx = receiver();
    assert_eq!(send(&mut rx, &heartbeat(7, 100)), Ok(Freshness::First));
    assert_eq!(send(&mut rx, &heartbeat(7, 101)), Ok(Freshness::Current));
    assert_eq!(rx.counters().total(), 0);
}

#[test]
fn a_replayed_heartbeat_is_rejected_and_counted_as_replayed() {
    let mut rx = receiver();
    let bytes = encode_heartbeat(&heartbeat(7, 100), &key()).unwrap();
    assert!(rx.receive(&bytes).is_ok());
    assert_eq!(rx.receive(&bytes).unwrap_err(), RejectReason::Replayed);
    assert_eq!(rx.counters().get(RejectReason::Replayed), 1);
}

#[test]
fn a_heartbeat_older_than_the_reorder_window_is_rejected_as_replayed() {
    let mut rx = receiver();
    send(&mut rx, &heartbeat(7, 1000)).unwrap();
    assert_eq!(
        send(&mut rx, &heartbeat(7, 1000 - REORDER_WINDOW)),
        Err(RejectReason::Replayed)
    );
    assert_eq!(
        send(&mut rx, &heartbeat(7, 1000 - REORDER_WINDOW + 1)),
        Ok(Freshness::Current)
    );
}

#[test]
fn heartbeats_reordered_between_paths_are_each_accepted_once() {
    let mut rx = receiver();
    for seq in [10, 12, 11, 15, 13, 14] {
        assert!(send(&mut rx, &heartbeat(7, seq)).is_ok(), "seq {seq}");
    }
    for seq in 10..=15 {
        assert_eq!(
            send(&mut rx, &heartbeat(7, seq)),
            Err(RejectReason::Replayed)
        );
    }
}

#[test]
fn a_newer_incarnation_resets_the_sequence_window() {
    let mut rx = receiver();
    send(&mut rx, &heartbeat(7, 5000)).unwrap();
    assert_eq!(
        send(&mut rx, &heartbeat(8, 0)),
        Ok(Freshness::NewIncarnation { rebooted: false })
    );
    assert_eq!(send(&mut rx, &heartbeat(8, 1)), Ok(Freshness::Current));
}

#[test]
fn a_new_boot_with_a_higher_incarnation_is_reported_as_a_reboot() {
    let mut rx = receiver();
    send(&mut rx, &heartbeat(7, 5000)).unwrap();
    let hb = Heartbeat {
        boot_id: boot(2),
        ..heartbeat(8, 0)
    };
    assert_eq!(
        send(&mut rx, &hb),
        Ok(Freshness::NewIncarnation { rebooted: true })
    );
}

#[test]
fn a_heartbeat_from_an_older_incarnation_is_rejected_as_stale() {
    let mut rx = receiver();
    send(&mut rx, &heartbeat(8, 0)).unwrap();
    assert_eq!(
        send(&mut rx, &heartbeat(7, 9999)),
        Err(RejectReason::StaleIncarnation)
    );
    assert_eq!(rx.counters().get(RejectReason::StaleIncarnation), 1);
}

#[test]
fn a_heartbeat_from_an_old_boot_id_is_rejected_as_stale() {
    let mut rx = receiver();
    // The host rebooted: boot 2, incarnation 8.
    let now = Heartbeat {
        boot_id: boot(2),
        ..heartbeat(8, 0)
    };
    send(&mut rx, &now).unwrap();
    // A datagram captured before the reboot (boot 1, incarnation 7) is replayed.
    assert_eq!(
        send(&mut rx, &heartbeat(7, 100)),
        Err(RejectReason::StaleIncarnation)
    );
    // Another boot claiming the current incarnation cannot be genuine either.
    let clash = Heartbeat {
        boot_id: boot(3),
        ..heartbeat(8, 1)
    };
    assert_eq!(send(&mut rx, &clash), Err(RejectReason::StaleIncarnation));
    // And the genuine stream carries on.
    let next = Heartbeat {
        boot_id: boot(2),
        ..heartbeat(8, 1)
    };
    assert_eq!(send(&mut rx, &next), Ok(Freshness::Current));
}

#[test]
fn a_heartbeat_from_another_cluster_is_rejected_as_unknown_cluster() {
    let mut rx = receiver();
    let hb = Heartbeat {
        cluster_id: "staging",
        ..heartbeat(7, 1)
    };
    assert_eq!(send(&mut rx, &hb), Err(RejectReason::UnknownCluster));
    assert_eq!(rx.counters().get(RejectReason::UnknownCluster), 1);
    assert!(rx.guard(HOST).is_none(), "a refused heartbeat adds no host");
}

#[test]
fn a_forged_heartbeat_is_counted_as_bad_mac_and_does_not_move_the_window() {
    let mut rx = receiver();
    send(&mut rx, &heartbeat(7, 1)).unwrap();
    let forged = encode_heartbeat(&heartbeat(9, 1_000_000), &other_key()).unwrap();
    assert_eq!(rx.receive(&forged).unwrap_err(), RejectReason::BadMac);
    assert_eq!(rx.counters().get(RejectReason::BadMac), 1);
    assert_eq!(rx.guard(HOST).unwrap().epoch(), Some((boot(1), 7)));
    assert_eq!(send(&mut rx, &heartbeat(7, 2)), Ok(Freshness::Current));
}

#[test]
fn every_decoding_rejection_is_counted_under_its_own_reason() {
    let mut rx = receiver();
    let good = encode_heartbeat(&heartbeat(7, 1), &key()).unwrap();
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    let mut bad_version = good.clone();
    bad_version[4] = 9;
    let truncated = good[..good.len() - 1].to_vec();
    let oversize = vec![0u8; 2000];
    let mut malformed = good.clone();
    malformed[7] = 0xff;
    let wrong_kind = encode_ack(&ack_for(&heartbeat(7, 1)), &key()).unwrap();
    for (bytes, reason) in [
        (bad_magic, RejectReason::BadMagic),
        (bad_version, RejectReason::BadVersion),
        (truncated, RejectReason::Truncated),
        (oversize, RejectReason::Oversize),
        (malformed, RejectReason::Malformed),
        (wrong_kind, RejectReason::WrongKind),
    ] {
        assert_eq!(rx.receive(&bytes).unwrap_err(), reason);
        assert_eq!(rx.counters().get(reason), 1, "{reason}");
    }
    assert_eq!(rx.counters().total(), 6);
    assert_eq!(rx.counters().iter().count(), RejectReason::ALL.len());
}

#[test]
fn hosts_are_guarded_independently() {
    let mut rx = receiver();
    let a = heartbeat(7, 100);
    let b = Heartbeat {
        host_id: "compute-18",
        ..heartbeat(3, 100)
    };
    assert_eq!(send(&mut rx, &a), Ok(Freshness::First));
    assert_eq!(send(&mut rx, &b), Ok(Freshness::First));
    assert!(rx.forget_host("compute-18").is_some());
    assert_eq!(send(&mut rx, &b), Ok(Freshness::First));
}

#[test]
fn a_sequence_window_accepts_a_big_jump_and_forgets_what_fell_behind() {
    let mut w = SequenceWindow::new();
    w.accept(0).unwrap();
    w.accept(1000).unwrap();
    assert_eq!(w.accept(0), Err(RejectReason::Replayed));
    assert_eq!(w.accept(999), Ok(()));
    assert_eq!(w.accept(u64::MAX), Ok(()));
    assert_eq!(w.accept(u64::MAX), Err(RejectReason::Replayed));
    assert_eq!(w.highest(), Some(u64::MAX));
}

#[test]
fn a_replay_guard_changes_nothing_when_it_rejects() {
    let mut g = ReplayGuard::new();
    g.check(boot(1), 5, 10).unwrap();
    let before = g.clone();
    assert!(g.check(boot(1), 4, 11).is_err());
    assert!(g.check(boot(1), 5, 10).is_err());
    assert_eq!(g, before);
}

fn ack_receiver() -> AckReceiver {
    AckReceiver::new(key(), CLUSTER, HOST, boot(1), 7)
}

#[test]
fn an_ack_for_a_heartbeat_we_sent_marks_us_reachable_as_of_its_send_time() {
    let mut rx = ack_receiver();
    assert_eq!(rx.newest_acked_send_mono_ns(), None);
    let hb = heartbeat(7, 10);
    let bytes = encode_ack(&ack_for(&hb), &key()).unwrap();
    let ack = rx.receive(&bytes, 10).unwrap();
    assert_eq!(ack.sequence, 10);
    assert_eq!(rx.newest_acked_send_mono_ns(), Some(hb.sent_mono_ns));
    assert_eq!(
        rx.newest_acked_send_mono_ns_on_path(0),
        Some(hb.sent_mono_ns)
    );
    assert_eq!(rx.newest_acked_send_mono_ns_on_path(1), None);
}

#[test]
fn a_replayed_old_ack_does_not_move_reachability_forward() {
    let mut rx = ack_receiver();
    let old = encode_ack(&ack_for(&heartbeat(7, 10)), &key()).unwrap();
    let new = encode_ack(&ack_for(&heartbeat(7, 20)), &key()).unwrap();
    rx.receive(&new, 30).unwrap();
    let reachable = rx.newest_acked_send_mono_ns();
    rx.receive(&old, 30).unwrap();
    assert_eq!(rx.newest_acked_send_mono_ns(), reachable);
}

#[test]
fn an_ack_for_a_heartbeat_never_sent_is_rejected_as_not_for_us() {
    let mut rx = ack_receiver();
    let bytes = encode_ack(&ack_for(&heartbeat(7, 11)), &key()).unwrap();
    assert_eq!(rx.receive(&bytes, 10).unwrap_err(), RejectReason::NotForUs);
    assert_eq!(rx.newest_acked_send_mono_ns(), None);
}

#[test]
fn an_ack_for_another_host_is_rejected_as_not_for_us() {
    let mut rx = ack_receiver();
    let hb = Heartbeat {
        host_id: "compute-18",
        ..heartbeat(7, 1)
    };
    let bytes = encode_ack(&ack_for(&hb), &key()).unwrap();
    assert_eq!(rx.receive(&bytes, 10).unwrap_err(), RejectReason::NotForUs);
}

#[test]
fn an_ack_for_a_previous_incarnation_or_boot_is_rejected_as_stale() {
    let mut rx = ack_receiver();
    let older = encode_ack(&ack_for(&heartbeat(6, 1)), &key()).unwrap();
    assert_eq!(
        rx.receive(&older, 10).unwrap_err(),
        RejectReason::StaleIncarnation
    );
    let other_boot = Heartbeat {
        boot_id: boot(9),
        ..heartbeat(7, 1)
    };
    let bytes = encode_ack(&ack_for(&other_boot), &key()).unwrap();
    assert_eq!(
        rx.receive(&bytes, 10).unwrap_err(),
        RejectReason::StaleIncarnation
    );
    assert_eq!(rx.counters().get(RejectReason::StaleIncarnation), 2);
}

#[test]
fn a_forged_ack_or_one_from_another_cluster_is_rejected() {
    let mut rx = ack_receiver();
    let forged = encode_ack(&ack_for(&heartbeat(7, 1)), &other_key()).unwrap();
    assert_eq!(rx.receive(&forged, 10).unwrap_err(), RejectReason::BadMac);
    let hb = Heartbeat {
        cluster_id: "staging",
        ..heartbeat(7, 1)
    };
    let bytes = encode_ack(&ack_for(&hb), &key()).unwrap();
    assert_eq!(
        rx.receive(&bytes, 10).unwrap_err(),
        RejectReason::UnknownCluster
    );
}

#[test]
fn an_event_at_or_below_the_high_water_mark_is_a_duplicate() {
    let mut dedup = EventDedup::new();
    assert_eq!(dedup.check(HOST, 1), EventVerdict::New { missing: 0 });
    dedup.commit(HOST, 1);
    dedup.commit(HOST, 2);
    assert_eq!(dedup.check(HOST, 1), EventVerdict::Duplicate);
    assert_eq!(dedup.check(HOST, 2), EventVerdict::Duplicate);
    assert_eq!(dedup.check(HOST, 3), EventVerdict::New { missing: 0 });
    assert_eq!(dedup.highest(HOST), 2);
}

#[test]
fn an_event_is_not_a_duplicate_until_it_is_committed() {
    let dedup = EventDedup::new();
    assert_eq!(dedup.check(HOST, 1), EventVerdict::New { missing: 0 });
    // The store failed; the watchdog resends after reconnecting.
    assert_eq!(dedup.check(HOST, 1), EventVerdict::New { missing: 0 });
}

#[test]
fn event_ids_are_deduplicated_per_host_and_gaps_are_reported() {
    let mut dedup = EventDedup::new();
    dedup.restore(HOST, 100);
    assert_eq!(dedup.check(HOST, 100), EventVerdict::Duplicate);
    assert_eq!(dedup.check(HOST, 105), EventVerdict::New { missing: 4 });
    assert_eq!(
        dedup.check("compute-18", 100),
        EventVerdict::New { missing: 99 }
    );
    dedup.commit(HOST, 50);
    assert_eq!(dedup.highest(HOST), 100, "the mark never moves down");
}
