//! Signals to child processes: the one place pushbus needs `unsafe` (kill(2)).
#![allow(unsafe_code)]

/// Sends `signal` (e.g. `libc::SIGTERM`) to the process `pid`, which the
/// caller spawned and has not reaped yet (so the pid cannot have been reused).
pub fn signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub use libc::{SIGCONT, SIGKILL, SIGSTOP, SIGTERM};
