//! `defib-subreaper [--child-pidfile PATH] -- PROGRAM [ARGS...]`: runs PROGRAM as a child
//! subreaper's child, for the hostbed's daemons (`cargo xtask hostbed start`).
//!
//! libvirtd daemonizes every qemu it starts (a double fork), so a qemu's parent is the
//! nearest child subreaper, else PID 1. Where PID 1 reaps orphans slowly (this sandbox's
//! reaps every ~2 s), libvirtd, which waits for a killed qemu's pid to vanish, reports the
//! death seconds late. Under this process, every orphan below it is reaped at once.
//!
//! It starts a new session (so a terminal's Ctrl-C does not reach the daemon), sets
//! PR_SET_CHILD_SUBREAPER, spawns PROGRAM, forwards SIGTERM, SIGINT and SIGHUP to it, reaps
//! every child that exits, and exits with PROGRAM's status when PROGRAM exits.
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{Command, ExitCode};

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

fn usage() -> ExitCode {
    eprintln!("usage: defib-subreaper [--child-pidfile PATH] -- PROGRAM [ARGS...]");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut child_pidfile = None;
    let mut program = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--child-pidfile" => match args.next() {
                Some(p) => child_pidfile = Some(p),
                None => return usage(),
            },
            "--" => {
                program.extend(args.by_ref());
                break;
            }
            _ => return usage(),
        }
    }
    if program.is_empty() {
        return usage();
    }

    // Fails only if already a session leader, which is just as good.
    let _ = nix::unistd::setsid();
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("defib-subreaper: prctl(PR_SET_CHILD_SUBREAPER): {e}");
        return ExitCode::from(71);
    }

    // The signals are blocked and taken synchronously with sigwait: no handler, no race
    // between a SIGCHLD and the wait loop. The child gets an empty mask back (std's spawn
    // leaves the mask as it is: a daemon with SIGTERM blocked would never stop).
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        eprintln!("defib-subreaper: sigprocmask: {e}");
        return ExitCode::from(71);
    }

    let mut command = Command::new(&program[0]);
    command.args(&program[1..]);
    // SAFETY: between fork and exec only async-signal-safe calls (sigprocmask, signal).
    unsafe {
        command.pre_exec(|| {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)?;
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("defib-subreaper: spawn {}: {e}", program[0]);
            return ExitCode::from(71);
        }
    };
    let child_pid = Pid::from_raw(child.id() as i32);
    if let Some(path) = child_pidfile {
        if let Err(e) = std::fs::write(&path, format!("{child_pid}\n")) {
            eprintln!("defib-subreaper: writing {path}: {e}");
        }
    }

    loop {
        // Reap everything that has exited: the daemon itself and any orphan below it.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(WaitStatus::Exited(pid, code)) if pid == child_pid => {
                    return ExitCode::from(u8::try_from(code).unwrap_or(1));
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child_pid => {
                    let status = std::process::ExitStatus::from_raw(sig as i32);
                    eprintln!("defib-subreaper: {} ended by {status}", program[0]);
                    return ExitCode::from(128 + sig as u8);
                }
                Ok(_) => continue,
                // ECHILD: nothing left (cannot happen while the daemon runs).
                Err(nix::errno::Errno::ECHILD) => return ExitCode::from(1),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("defib-subreaper: waitpid: {e}");
                    break;
                }
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) => {}
            Ok(sig) => {
                let _ = kill(child_pid, sig);
            }
            Err(e) => eprintln!("defib-subreaper: sigwait: {e}"),
        }
    }
}
