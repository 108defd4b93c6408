//! Unmounts a view served over io_uring whose process was killed (SIGKILL, the OOM
//! killer), as fusermount3's `auto_unmount` does for a view on `/dev/fuse`.
//!
//! fusermount3 unmounts a dead server's mount only when opening the mountpoint fails
//! with ENOTCONN. Over `/dev/fuse` the kernel aborts the connection as the dying
//! process closes its descriptors, before fusermount3 looks. Over io_uring the ring's
//! pending commands hold the device open until the kernel has torn the ring down, a few
//! milliseconds later, so fusermount3's open is still waiting when the connection is
//! aborted, fails with ECONNABORTED instead, and the dead mount is left behind.
//!
//! The guardian is a forked child that waits for its server to end (a pipe's end of
//! file). It does not ask the mount whether it is alive: it looks in the mount table
//! for the very mount it guards (its device number, unique while it is mounted, at
//! its mountpoint), which is there only if the server ended without unmounting, and
//! detaches it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The guardian of one mount. Dropping it (the session ended, the view unmounted) lets
/// the child look, find its mount gone, and end; it is then reaped.
pub struct Guardian {
    /// The write end of the pipe the child waits on.
    alive: Option<OwnedFd>,
    child: nix::unistd::Pid,
}

/// The most of `/proc/self/mountinfo` the child reads (its buffer is made before the
/// fork: the child may not allocate).
const MOUNTINFO_MAX: usize = 1 << 20;

impl Guardian {
    /// Forks the guardian of the FUSE mount at `mountpoint` (canonical), known in
    /// `/proc/self/mountinfo` by `id` (the part of its line from the device number to
    /// the mountpoint, with spaces around). Nothing here asks the mount anything: it may
    /// not answer yet.
    ///
    /// # Errors
    /// The pipe or the fork failing.
    pub fn spawn(mountpoint: &Path, id: &str) -> std::io::Result<Guardian> {
        // Everything the child needs is made before the fork: after it, in a process
        // with threads, the child may only make async-signal-safe calls.
        let mnt = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut buf = vec![0u8; MOUNTINFO_MAX];
        let proc = c"/proc/self/mountinfo";
        // Close-on-exec: a command this process runs later must not hold it open.
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: the child only calls `dup2`, `close_range`, `close`, `signal`, `read`,
        // `open`, `umount2` and `_exit` (all async-signal-safe) on memory made above,
        // and never returns into Rust code.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => unsafe {
                watch(r.as_raw_fd(), &mnt, proc, id.as_bytes(), &mut buf)
            },
            nix::unistd::ForkResult::Parent { child } => {
                drop(r);
                Ok(Guardian {
                    alive: Some(w),
                    child,
                })
            }
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        drop(self.alive.take());
        let _ = nix::sys::wait::waitpid(self.child, None);
    }
}

/// The child: holds nothing but the pipe (not the FUSE device, which would keep the
/// connection alive), waits for its end of file, then detaches the mount if it is
/// still in the mount table.
///
/// # Safety
/// Only in the child of a `fork`; never returns.
unsafe fn watch(
    pipe: libc::c_int,
    mnt: &CString,
    proc: &std::ffi::CStr,
    line: &[u8],
    buf: &mut [u8],
) -> ! {
    unsafe {
        libc::dup2(pipe, 0);
        if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
            for fd in 1..65536 {
                libc::close(fd);
            }
        }
        // It must outlive its server to do its work: the signals that end a run (the
        // terminal's, systemd's SIGTERM) are not for it. It ends at the pipe's end.
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_IGN);
        }
        let mut b = [0u8; 1];
        while libc::read(0, b.as_mut_ptr().cast(), 1) < 0
            && *libc::__errno_location() == libc::EINTR
        {}
        let fd = libc::open(proc.as_ptr(), libc::O_RDONLY);
        if fd >= 0 {
            let mut len = 0;
            while len < buf.len() {
                let n = libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len);
                if n > 0 {
                    len += n as usize;
                } else if n == 0 || *libc::__errno_location() != libc::EINTR {
                    break;
                }
            }
            libc::close(fd);
            if buf[..len].windows(line.len()).any(|w| w == line) {
                libc::umount2(mnt.as_ptr(), libc::MNT_DETACH);
            }
        }
        libc::_exit(0)
    }
}
