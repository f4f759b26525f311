//! The unsafe edge: libvirt's process-wide event loop, and the domain event and
//! connection close callbacks, which the `virt` crate does not wrap (no release of it
//! has `domain_event_register_any`), so they are registered through `virt::sys`.
//!
//! Callbacks run on the event loop thread. They copy what they need out of libvirt's
//! objects (name and UUID are local reads, no RPC) and hand a [`Raw`] to the watcher's
//! thread over a channel; they never call back into the connection.
use std::ffi::{c_char, c_int, c_ulonglong, c_void, CStr};
use std::sync::mpsc::Sender;
use std::sync::OnceLock;

use virt::connect::Connect;
use virt::sys;

use crate::procfs::VmIdentity;

/// What a callback saw, before it is named and stamped.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Lifecycle {
        vm: VmIdentity,
        event: i32,
        detail: i32,
    },
    IoError {
        vm: VmIdentity,
        src_path: String,
        dev_alias: String,
        action: i32,
        reason: String,
    },
    Watchdog {
        vm: VmIdentity,
        action: i32,
    },
    Reboot {
        vm: VmIdentity,
    },
    BlockThreshold {
        vm: VmIdentity,
        dev: String,
        path: String,
        threshold: u64,
        excess: u64,
    },
    ControlError {
        vm: VmIdentity,
    },
    /// The connection closed (`virConnectCloseReason`).
    Closed {
        reason: i32,
    },
}

/// A message to the watcher's thread.
#[derive(Debug)]
pub enum Msg {
    /// From a callback of connection number `generation`.
    Event { generation: u64, raw: Raw },
    /// Stop the watcher.
    Stop,
}

static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers libvirt's default event loop implementation and starts the one thread
/// that runs it, once per process, before any connection is opened (a connection only
/// gets keepalives and events if the loop was registered first). Also silences
/// libvirt's default error handler, which would print every error to stderr: errors
/// are returned and logged by the watcher instead.
pub fn ensure_event_loop() -> Result<(), String> {
    EVENT_LOOP
        .get_or_init(|| {
            virt::error::clear_error_callback();
            virt::event::event_register_default_impl()
                .map_err(|e| format!("registering libvirt's event loop: {e}"))?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(run_event_loop)
                .map(|_| ())
                .map_err(|e| format!("starting the libvirt event loop thread: {e}"))
        })
        .clone()
}

/// The event loop: one iteration dispatches whatever is ready (sockets, timers,
/// keepalives) and waits for the next. Runs for the life of the process.
#[allow(
    clippy::disallowed_methods,
    reason = "a dedicated OS thread outside the async runtime: sleeping here blocks no task"
)]
fn run_event_loop() {
    let mut failures: u64 = 0;
    loop {
        match virt::event::event_run_default_impl() {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(600) {
                    tracing::error!(error = %e, failures, "libvirt event loop iteration failed");
                }
                // Never spin on a broken loop.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

struct Ctx {
    tx: Sender<Msg>,
    generation: u64,
}

impl Ctx {
    fn send(&self, raw: Raw) {
        // The watcher may be gone (stopping): nothing to do then.
        let _ = self.tx.send(Msg::Event {
            generation: self.generation,
            raw,
        });
    }
}

/// # Safety
/// `opaque` is a `Box<Ctx>` made by [`new_ctx`], freed once by libvirt.
unsafe extern "C" fn free_ctx(opaque: *mut c_void) {
    if !opaque.is_null() {
        drop(Box::from_raw(opaque.cast::<Ctx>()));
    }
}

fn new_ctx(tx: &Sender<Msg>, generation: u64) -> *mut Ctx {
    Box::into_raw(Box::new(Ctx {
        tx: tx.clone(),
        generation,
    }))
}

/// # Safety
/// `s` is null or a NUL-terminated string that lives for the call.
unsafe fn string(s: *const c_char) -> String {
    if s.is_null() {
        String::new()
    } else {
        CStr::from_ptr(s).to_string_lossy().into_owned()
    }
}

/// # Safety
/// `dom` is the valid domain pointer libvirt passed to a callback.
unsafe fn identity(dom: sys::virDomainPtr) -> VmIdentity {
    if dom.is_null() {
        return VmIdentity::default();
    }
    let name = sys::virDomainGetName(dom);
    let name = (!name.is_null()).then(|| string(name));
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    let uuid = (sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0)
        .then(|| string(buf.as_ptr()).to_ascii_lowercase());
    VmIdentity { uuid, name }
}

/// # Safety (all callbacks)
/// Called by libvirt with a valid domain and the `Ctx` registered with them.
unsafe fn ctx<'a>(opaque: *mut c_void) -> &'a Ctx {
    &*opaque.cast::<Ctx>()
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    ctx(opaque).send(Raw::Lifecycle {
        vm: identity(dom),
        event,
        detail,
    });
    0
}

unsafe extern "C" fn on_io_error_reason(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    src_path: *const c_char,
    dev_alias: *const c_char,
    action: c_int,
    reason: *const c_char,
    opaque: *mut c_void,
) {
    ctx(opaque).send(Raw::IoError {
        vm: identity(dom),
        src_path: string(src_path),
        dev_alias: string(dev_alias),
        action,
        reason: string(reason),
    });
}

unsafe extern "C" fn on_watchdog(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    action: c_int,
    opaque: *mut c_void,
) {
    ctx(opaque).send(Raw::Watchdog {
        vm: identity(dom),
        action,
    });
}

unsafe extern "C" fn on_generic_reboot(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    opaque: *mut c_void,
) {
    ctx(opaque).send(Raw::Reboot { vm: identity(dom) });
}

unsafe extern "C" fn on_generic_control_error(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    opaque: *mut c_void,
) {
    ctx(opaque).send(Raw::ControlError { vm: identity(dom) });
}

unsafe extern "C" fn on_block_threshold(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    dev: *const c_char,
    path: *const c_char,
    threshold: c_ulonglong,
    excess: c_ulonglong,
    opaque: *mut c_void,
) {
    ctx(opaque).send(Raw::BlockThreshold {
        vm: identity(dom),
        dev: string(dev),
        path: string(path),
        threshold,
        excess,
    });
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    ctx(opaque).send(Raw::Closed { reason });
}

type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// The domain events the watcher subscribes to: (libvirt event id, name, callback
/// cast to the generic type, as `VIR_DOMAIN_EVENT_CALLBACK` does in C).
fn subscriptions() -> [(c_int, &'static str, Generic); 6] {
    // SAFETY: libvirt calls each callback with the signature its event id documents;
    // the generic type is only how the registration function takes them.
    unsafe {
        [
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                "lifecycle",
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        c_int,
                        c_int,
                        *mut c_void,
                    ) -> c_int,
                    Generic,
                >(on_lifecycle),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON as c_int,
                "io-error-reason",
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        *const c_char,
                        *const c_char,
                        c_int,
                        *const c_char,
                        *mut c_void,
                    ),
                    Generic,
                >(on_io_error_reason),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_WATCHDOG as c_int,
                "watchdog",
                std::mem::transmute::<
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, *mut c_void),
                    Generic,
                >(on_watchdog),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_REBOOT as c_int,
                "reboot",
                on_generic_reboot as Generic,
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_CONTROL_ERROR as c_int,
                "control-error",
                on_generic_control_error as Generic,
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD as c_int,
                "block-threshold",
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        *const c_char,
                        *const c_char,
                        c_ulonglong,
                        c_ulonglong,
                        *mut c_void,
                    ),
                    Generic,
                >(on_block_threshold),
            ),
        ]
    }
}

/// The callbacks registered on one connection.
pub struct Registration {
    callback_ids: Vec<c_int>,
    close_callback: bool,
    /// Subscriptions libvirt refused on this connection, with its reason.
    pub refused: Vec<(&'static str, String)>,
}

/// Registers every domain event callback, and the close callback, on `conn`; their
/// messages carry `generation`. A subscription the driver refuses is reported in
/// `refused`, not fatal (the test driver, for one, has no close callback).
pub fn register(conn: &Connect, tx: &Sender<Msg>, generation: u64) -> Registration {
    let mut reg = Registration {
        callback_ids: Vec::new(),
        close_callback: false,
        refused: Vec::new(),
    };
    for (id, name, cb) in subscriptions() {
        let ctx = new_ctx(tx, generation);
        // SAFETY: a valid connection; `ctx` is freed by `free_ctx` once libvirt lets go
        // of it, or below if the registration failed (libvirt does not call freecb then).
        let ret = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                id,
                Some(cb),
                ctx.cast(),
                Some(free_ctx),
            )
        };
        if ret < 0 {
            reg.refused
                .push((name, virt::error::Error::last_error().to_string()));
            // SAFETY: not handed over to libvirt.
            drop(unsafe { Box::from_raw(ctx) });
        } else {
            reg.callback_ids.push(ret);
        }
    }
    let ctx = new_ctx(tx, generation);
    // SAFETY: as above.
    let ret = unsafe {
        sys::virConnectRegisterCloseCallback(
            conn.as_ptr(),
            Some(on_close),
            ctx.cast(),
            Some(free_ctx),
        )
    };
    if ret < 0 {
        reg.refused
            .push(("close", virt::error::Error::last_error().to_string()));
        // SAFETY: not handed over to libvirt.
        drop(unsafe { Box::from_raw(ctx) });
    } else {
        reg.close_callback = true;
    }
    reg
}

/// Removes the callbacks (best effort: on a dead connection libvirt drops them
/// locally and the RPC fails, which is fine) so the connection can be closed.
pub fn deregister(conn: &Connect, reg: Registration) {
    for id in reg.callback_ids {
        // SAFETY: an id this connection returned.
        unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
    }
    if reg.close_callback {
        // SAFETY: the callback registered on this connection.
        unsafe { sys::virConnectUnregisterCloseCallback(conn.as_ptr(), Some(on_close)) };
    }
}
