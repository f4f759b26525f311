//! Proves the heartbeat hot path allocates nothing, with a counting allocator.
//! This file is its own test binary, so the allocator only affects it.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use protocol::{decode_heartbeat, encode_heartbeat, HeartbeatReceiver};

struct CountingAllocator;

thread_local! {
    // Per thread, so the test harness's own threads cannot disturb the count.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the only
// addition is a thread-local counter with const initialisation (no lazy setup, so
// it cannot recurse into the allocator).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

#[test]
fn decoding_and_accepting_heartbeats_allocates_nothing() {
    let key = key();
    let datagrams: Vec<Vec<u8>> = (0..1000)
        .map(|seq| encode_heartbeat(&heartbeat(7, seq), &key).unwrap())
        .collect();
    let mut forged = datagrams[0].clone();
    forged[40] ^= 1;
    let mut rx = HeartbeatReceiver::new(key.clone(), CLUSTER);
    // Warm-up: the receiver learns the host (one allocation for its entry).
    rx.receive(&datagrams[0]).unwrap();

    let before = allocations();
    for bytes in &datagrams[1..] {
        let hb = decode_heartbeat(bytes, &key).unwrap();
        std::hint::black_box(hb);
        rx.receive(bytes).unwrap();
    }
    assert!(decode_heartbeat(&forged, &key).is_err());
    assert!(rx.receive(&forged).is_err());
    assert!(rx.receive(&datagrams[5]).is_err());
    assert_eq!(allocations() - before, 0);
}

#[test]
fn pacing_the_acks_of_a_known_host_path_allocates_nothing() {
    let key = key();
    let datagrams: Vec<Vec<u8>> = (0..1000)
        .map(|seq| encode_heartbeat(&heartbeat(7, seq), &key).unwrap())
        .collect();
    let mut rx = HeartbeatReceiver::new(key.clone(), CLUSTER);
    // Warm-up: the host's entry and its path's pacing slot.
    rx.receive_paced(&datagrams[0], 0, true).unwrap();
    let before = allocations();
    let mut acked = 0;
    for (ms, bytes) in (1u64..).zip(&datagrams[1..]) {
        acked += usize::from(rx.receive_paced(bytes, ms * 10, true).unwrap().ack_due);
    }
    assert_eq!(allocations() - before, 0);
    assert!(acked > 0 && acked < 999, "paced: {acked}");
}

#[test]
fn encoding_a_heartbeat_into_a_reused_buffer_allocates_nothing() {
    let key = key();
    let mut buf = Vec::new();
    heartbeat(7, 0).encode_into(&key, &mut buf).unwrap();
    let before = allocations();
    for seq in 1..1000 {
        heartbeat(7, seq).encode_into(&key, &mut buf).unwrap();
    }
    assert_eq!(allocations() - before, 0);
}
