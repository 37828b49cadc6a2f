//! A minimal init, PID 1 of a container that asks for one (`init = true`, as `docker run
//! --init` runs tini): it reaps every process that ends in the container (orphans a
//! workload leaves behind would otherwise stay zombies: only PID 1 reaps them), forwards
//! every signal it is sent to the workload (a PID 1 without handlers would ignore them), and
//! exits as the workload did: its exit code, or 128 + the signal that killed it.
//!
//! It runs in the child forked by [`crate::workload`] just before the workload's `execve`, so
//! it has the workload's user, capabilities and seccomp filter and holds no descriptor but
//! stdio.

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Runs until the workload `child` ends, then exits the process with its status.
pub fn run(child: Pid) -> ! {
    // Every signal waits in the signalfd: blocked signals reach even a PID 1 that has no
    // handler for them.
    let all = SigSet::all();
    let sfd = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&all), None)
        .and_then(|()| SignalFd::with_flags(&all, SfdFlags::SFD_CLOEXEC));
    let sfd = match sfd {
        Ok(fd) => Some(fd),
        Err(e) => {
            // Still reap, without forwarding: better than leaving the workload unwatched.
            eprintln!("init: signals: {e}");
            None
        }
    };
    loop {
        // Reap everything that has ended; the workload's end is ours.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                    std::process::exit(128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                // ECHILD: nothing left to wait for, the workload included (cannot happen
                // before its exit is seen above, but never spin on it).
                Err(nix::errno::Errno::ECHILD) => std::process::exit(255),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        match &sfd {
            Some(fd) => {
                if let Ok(Some(info)) = fd.read_signal() {
                    let signo = info.ssi_signo as i32;
                    if signo != Signal::SIGCHLD as i32
                        && let Ok(sig) = Signal::try_from(signo)
                    {
                        let _ = kill(child, sig);
                    }
                }
            }
            None => {
                // Without a signalfd: block in waitpid for the next child to end.
                match waitpid(None, None) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                        std::process::exit(128 + sig as i32)
                    }
                    Err(nix::errno::Errno::ECHILD) => std::process::exit(255),
                    _ => {}
                }
            }
        }
    }
}
