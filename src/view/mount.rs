//! Mounting the view: checks on the mountpoint, the in-process mount used by jobs
//! ([`MountedView`], unmounted on drop), and the foreground loop of `snapveil mount`.
//!
//! Mounts use fusermount3's `auto_unmount`: fusermount stays alive beside us and
//! unmounts the moment our process dies, even by SIGKILL, so a crashed run never leaves
//! a dead "transport endpoint is not connected" mount behind.

use super::fuse::{Caching, Served, VeilFs};
use super::ring;
use super::{ExportedConf, Tree, ViewCore, ViewError};
use crate::crypto::{KeyConfig, Keys, MasterKey};
use fuser::{MountOption, Session};
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{path}: source does not exist or cannot be read: {source}")]
    Source {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: source is not a directory")]
    SourceNotDir { path: PathBuf },
    #[error("{path}: mountpoint does not exist or cannot be read: {source}")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: mountpoint is not a directory")]
    MountpointNotDir { path: PathBuf },
    #[error("{path}: mountpoint is busy (something is already mounted there)")]
    Busy { path: PathBuf },
    #[error("{path}: mountpoint is not empty")]
    NotEmpty { path: PathBuf },
    #[error("{path}: {source}")]
    View { path: PathBuf, source: ViewError },
    #[error("{path}: mounting failed: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the mount did not answer: {reason}")]
    NoAnswer { path: PathBuf, reason: String },
    #[error("{path}: not a snapveil mount")]
    NotOurs { path: PathBuf },
    #[error("{path}: unmount failed: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Everything that defines a view besides its source.
pub struct ViewOptions {
    pub key: KeyConfig,
    pub master: MasterKey,
    /// gitignore-style patterns on plaintext paths.
    pub excludes: Vec<String>,
    pub access: Access,
    /// Whether the source can change while mounted ([`Caching`]).
    pub caching: Caching,
}

/// Who sees a mount and how it is named. The default is private: only the mounting
/// user (a job's own rsync, a pull's rsync) reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Other users may read it; with default_permissions the kernel still applies the
    /// source's modes (or the forced owner), so each sees what it could read in clear.
    pub allow_other: bool,
    /// Every entry presented as owned by (uid, gid): a pulling account reads it all.
    pub force_owner: Option<(u32, u32)>,
    /// Shown by mount and df; the subtype stays `snapveil`, which cleanup recognizes.
    pub fsname: Option<String>,
}

impl Access {
    /// What `snapveil mount` and `open` always did: other users allowed when root.
    pub fn shared_if_root() -> Access {
        Access {
            allow_other: nix::unistd::geteuid().is_root(),
            ..Access::default()
        }
    }
}

/// Our mounts carry this subtype (and, unless told otherwise, fsname), so that cleanup
/// recognizes them and nothing else.
const FSNAME: &str = "snapveil";

fn mount_options(access: &Access) -> Vec<MountOption> {
    let mut o = vec![
        MountOption::RO,
        MountOption::FSName(access.fsname.clone().unwrap_or_else(|| FSNAME.into())),
        MountOption::Subtype(FSNAME.into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
        MountOption::AutoUnmount,
    ];
    if access.allow_other {
        o.push(MountOption::AllowOther);
    }
    o
}

/// Anchored excludes that keep a view of `source` from showing its own `mountpoint`
/// (recursion into itself) and the directories of its `key_files` (the passfile), when
/// they lie inside `source`; a key file right in the source's root is hidden alone.
pub fn self_excludes(source: &Path, mountpoint: &Path, key_files: &[&Path]) -> Vec<String> {
    let root = canonical(source);
    let mut hidden = vec![mountpoint.to_path_buf()];
    for f in key_files {
        match f.parent() {
            Some(d) if canonical(d) != root => hidden.push(d.to_path_buf()),
            _ => hidden.push(f.to_path_buf()),
        }
    }
    anchored(&root, &hidden)
}

fn anchored(root: &Path, hidden: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for h in hidden {
        let p = canonical(h);
        let Ok(rel) = p.strip_prefix(root) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let mut pat = String::from("/");
        for c in rel.to_string_lossy().chars() {
            if "\\*?[]".contains(c) {
                pat.push('\\');
            }
            pat.push(c);
        }
        if pat.ends_with(' ') {
            pat.insert(pat.len() - 1, '\\');
        }
        if !out.contains(&pat) {
            out.push(pat);
        }
    }
    out
}

/// One line of /proc/self/mountinfo.
struct MountLine {
    point: PathBuf,
    fstype: String,
    /// " MAJ:MIN ROOT POINT " as the kernel writes it: what tells this very mount from
    /// any other in the table (its device number is unique while it is mounted).
    id: String,
}

fn mounts() -> Vec<MountLine> {
    mount_lines(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

fn mount_lines(text: &str) -> Vec<MountLine> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountLine {
                point: PathBuf::from(unescape(f.get(4)?)),
                fstype: f.get(sep + 1)?.to_string(),
                id: format!(" {} {} {} ", f.get(2)?, f.get(3)?, f[4]),
            })
        })
        .collect()
}

/// The mount table's identity ([`MountLine::id`]) of the snapveil mount at `canonical`
/// (the topmost there). Takes a canonical path and looks at nothing but the table: the
/// mount may not answer yet.
fn mount_id(text: &str, canonical: &Path) -> Option<String> {
    mount_lines(text)
        .into_iter()
        .rev()
        .find(|m| m.point == canonical)
        .filter(|m| is_ours(&m.fstype))
        .map(|m| m.id)
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn canonical(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The fstype mounted exactly at `path`, if any.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    let p = canonical(path);
    mounts()
        .into_iter()
        .rev()
        .find(|m| m.point == p)
        .map(|m| m.fstype)
}

fn is_ours(fstype: &str) -> bool {
    fstype == "fuse.snapveil"
}

/// Checks that SOURCE is a readable directory and MOUNTPOINT an empty, unused directory.
///
/// # Errors
/// The first problem found, naming the path.
pub fn check_paths(source: &Path, mountpoint: &Path) -> Result<(), MountError> {
    let m = fs::metadata(source).map_err(|e| MountError::Source {
        path: source.into(),
        source: e,
    })?;
    if !m.is_dir() {
        return Err(MountError::SourceNotDir {
            path: source.into(),
        });
    }
    let m = fs::metadata(mountpoint).map_err(|e| MountError::Mountpoint {
        path: mountpoint.into(),
        source: e,
    })?;
    if !m.is_dir() {
        return Err(MountError::MountpointNotDir {
            path: mountpoint.into(),
        });
    }
    if mounted_fstype(mountpoint).is_some() {
        return Err(MountError::Busy {
            path: mountpoint.into(),
        });
    }
    let mut rd = fs::read_dir(mountpoint).map_err(|e| MountError::Mountpoint {
        path: mountpoint.into(),
        source: e,
    })?;
    if rd.next().is_some() {
        return Err(MountError::NotEmpty {
            path: mountpoint.into(),
        });
    }
    Ok(())
}

fn build_core(source: &Path, opts: ViewOptions) -> Result<(Arc<ViewCore>, Access), MountError> {
    let keys = Keys::new(&opts.master, opts.key.flags);
    drop(opts.master);
    tracing::debug!(engine = ?keys.engine(), "content encryption");
    let conf = ExportedConf {
        bytes: Arc::from(opts.key.raw.clone()),
        stat_path: opts.key.path.clone(),
    };
    let core =
        ViewCore::new(source, keys, Some(conf), &opts.excludes).map_err(|e| MountError::View {
            path: source.into(),
            source: e,
        })?;
    Ok((Arc::new(core), opts.access))
}

/// Blocks until the kernel has talked to the session and the mountpoint shows the view.
fn wait_answer(mountpoint: &Path, init: mpsc::Receiver<()>) -> Result<(), MountError> {
    init.recv_timeout(Duration::from_secs(30))
        .map_err(|_| MountError::NoAnswer {
            path: mountpoint.into(),
            reason: "no FUSE init within 30 s".into(),
        })?;
    let parent = mountpoint.parent().unwrap_or(Path::new("/"));
    let pdev = fs::metadata(parent).map(|m| m.dev()).unwrap_or(0);
    match fs::metadata(mountpoint) {
        Ok(m) if m.dev() != pdev => Ok(()),
        Ok(_) => Err(MountError::NoAnswer {
            path: mountpoint.into(),
            reason: "mountpoint still shows the parent filesystem".into(),
        }),
        Err(e) => Err(MountError::NoAnswer {
            path: mountpoint.into(),
            reason: e.to_string(),
        }),
    }
}

/// A FUSE mount starts with the kernel's default readahead of 128 KiB, so a sequential
/// reader's requests arrive 128 KiB (32 blocks) at a time. At 1 MiB each request carries
/// 256 blocks to encrypt in parallel and the per-request cost is paid a quarter as often:
/// 8-10% more throughput on a 1 GiB read here. Best effort: it needs root (sysfs).
fn raise_readahead(mountpoint: &Path) {
    let Ok(m) = fs::metadata(mountpoint) else {
        return;
    };
    let dev = m.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = fs::write(&knob, "1024") {
        tracing::debug!(knob, "readahead left at the default: {e}");
    }
}

/// A view mounted by this process, served on background threads. Dropping it unmounts.
pub struct MountedView {
    /// The thread serving the session ([`run_session`]).
    session: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    mountpoint: PathBuf,
    /// What the session serves, for walks in this process ([`ViewCore::walk`]).
    core: Arc<ViewCore>,
}

impl MountedView {
    /// Mounts and returns once the mount answers.
    ///
    /// # Errors
    /// Bad source or mountpoint, exclude patterns, or the mount itself failing.
    pub fn mount(source: &Path, mountpoint: &Path, opts: ViewOptions) -> Result<Self, MountError> {
        check_paths(source, mountpoint)?;
        let caching = opts.caching;
        let (core, access) = build_core(source, opts)?;
        let (tx, rx) = mpsc::channel();
        let fs = VeilFs::new(Arc::clone(&core), caching)
            .force_owner(access.force_owner)
            .on_init(move || {
                let _ = tx.send(());
            });
        let (session, fs, canonical) = new_session(fs, mountpoint, &access)?;
        let owner = session_owner(&access);
        let bg = std::thread::Builder::new()
            .name("snapveil-fuse".into())
            .spawn(move || run_session(session, fs, owner, &canonical))
            .map_err(|e| MountError::Mount {
                path: mountpoint.into(),
                source: e,
            })?;
        let view = MountedView {
            session: Some(bg),
            mountpoint: mountpoint.into(),
            core,
        };
        wait_answer(mountpoint, rx)?;
        raise_readahead(mountpoint);
        tracing::info!(source = %source.display(), mountpoint = %mountpoint.display(), ?caching, "encrypted view mounted");
        Ok(view)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The view's core: what the mount shows, for this process to walk without the kernel.
    pub fn core(&self) -> &ViewCore {
        &self.core
    }

    /// Unmounts and waits for the serving thread to end.
    ///
    /// # Errors
    /// When the mountpoint is still mounted afterwards (e.g. busy).
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<(), MountError> {
        let Some(bg) = self.session.take() else {
            return Ok(());
        };
        // Unmount ourselves first (auto_unmount would only detach lazily when fusermount
        // notices), then let the session loop see ENODEV and end.
        let r = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty());
        if let Err(e) = r {
            if mounted_fstype(&self.mountpoint).is_some() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "unmount failed ({e}); detaching lazily");
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        match bg.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE session ended with {e}")
            }
            Err(_) => {
                tracing::error!(mountpoint = %self.mountpoint.display(), "FUSE session thread panicked")
            }
        }
        if mounted_fstype(&self.mountpoint).is_some_and(|t| is_ours(&t)) {
            return Err(MountError::Unmount {
                path: self.mountpoint.clone(),
                source: std::io::Error::other("still mounted"),
            });
        }
        tracing::info!(mountpoint = %self.mountpoint.display(), "encrypted view unmounted");
        Ok(())
    }
}

impl Drop for MountedView {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            tracing::error!("{e}");
        }
    }
}

/// A mounted session, its view and its mountpoint's canonical path ([`new_session`]).
type NewSession<T> = (Session<Served<T>>, Arc<VeilFs<T>>, PathBuf);

/// The FUSE session serving `fs` at `mountpoint` (mounted), its read-ahead connected
/// to the kernel's page cache before any request is served, the view, and the
/// mountpoint's canonical path (found before the mount: afterwards, a look at it would
/// wait for the session), for [`run_session`].
fn new_session<T: Tree>(
    fs: VeilFs<T>,
    mountpoint: &Path,
    access: &Access,
) -> Result<NewSession<T>, MountError> {
    let canonical = fs::canonicalize(mountpoint).map_err(|e| MountError::Mount {
        path: mountpoint.into(),
        source: e,
    })?;
    let pages = fs.kernel_pages();
    let fs = Arc::new(fs);
    let session = Session::new(Served(Arc::clone(&fs)), mountpoint, &mount_options(access))
        .map_err(|e| MountError::Mount {
            path: mountpoint.into(),
            source: e,
        })?;
    if let Some(p) = pages {
        p.connect(session.notifier());
    }
    Ok((session, fs, canonical))
}

/// Who may use a mount, as fuser's own loop enforces it ([`ring::Owner`]): without
/// `allow_other`, only the user who mounted it.
fn session_owner(access: &Access) -> ring::Owner {
    (!access.allow_other).then(|| nix::unistd::geteuid().as_raw())
}

/// Serves the session until it is unmounted: over io_uring where the kernel offers it
/// ([`ring`]), else by fuser's loop. Either way the session is dropped at the end, which
/// is what releases fuser's hold on the mount.
fn run_session<T: Tree>(
    mut session: Session<Served<T>>,
    fs: Arc<VeilFs<T>>,
    owner: ring::Owner,
    mountpoint: &Path,
) -> std::io::Result<()> {
    if ring::wanted() {
        // fusermount3 would not unmount this view if the process were killed: without
        // a guardian, no ring.
        let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let guardian = mount_id(&table, mountpoint)
            .ok_or_else(|| std::io::Error::other("not in /proc/self/mountinfo"))
            .and_then(|id| ring::Guardian::spawn(mountpoint, &id));
        match guardian {
            Ok(guardian) => {
                let dev = session.as_fd().try_clone_to_owned()?;
                let r = ring::serve(fs, dev, owner);
                drop(guardian);
                return r;
            }
            Err(e) => tracing::warn!(
                mountpoint = %mountpoint.display(),
                "FUSE over io_uring not used: no guardian for the mount: {e}"
            ),
        }
    }
    drop(fs);
    session.run()
}

/// Serves the view in this thread until it is unmounted (`snapveil umount`,
/// `fusermount3 -u`) or SIGTERM/SIGINT/SIGHUP arrives, which unmounts cleanly.
/// `ready` is called once the mount answers.
///
/// # Errors
/// Bad paths, the mount failing, or the session loop failing.
pub fn run_foreground(
    source: &Path,
    mountpoint: &Path,
    opts: ViewOptions,
    ready: impl FnOnce() + Send + 'static,
) -> Result<(), MountError> {
    check_paths(source, mountpoint)?;
    let caching = opts.caching;
    let (core, access) = build_core(source, opts)?;
    tracing::info!(source = %source.display(), mountpoint = %mountpoint.display(), ?caching, "serving encrypted view");
    serve(core, caching, mountpoint, &access, ready)
}

/// Serves any [`Tree`] at `mountpoint` in this thread until it is unmounted or a
/// terminating signal arrives (which unmounts cleanly).
///
/// # Errors
/// The mount or the session loop failing.
pub fn serve<T: Tree>(
    core: Arc<T>,
    caching: Caching,
    mountpoint: &Path,
    access: &Access,
    ready: impl FnOnce() + Send + 'static,
) -> Result<(), MountError> {
    let mp = mountpoint.to_path_buf();
    let fs = VeilFs::new(core, caching)
        .force_owner(access.force_owner)
        .on_init(move || {
            // Called on the session thread during INIT: check the answer from another
            // thread, since our own stat would wait for this very loop.
            std::thread::spawn(move || {
                for _ in 0..300 {
                    if mounted_fstype(&mp).is_some() && fs::metadata(&mp).is_ok() {
                        raise_readahead(&mp);
                        ready();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        });
    let (mut session, fs, canonical) = new_session(fs, mountpoint, access)?;
    let mut unmounter = session.unmount_callable();
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP]).map_err(
            |e| MountError::Mount {
                path: mountpoint.into(),
                source: e,
            },
        )?;
    let handle = signals.handle();
    let mp = mountpoint.to_path_buf();
    let waiter = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "signal received; unmounting {}", mp.display());
            if nix::mount::umount2(&mp, nix::mount::MntFlags::empty()).is_err() {
                let _ = unmounter.unmount();
            }
        }
    });
    let r = run_session(session, fs, session_owner(access), &canonical);
    handle.close();
    let _ = waiter.join();
    r.map_err(|e| MountError::Mount {
        path: mountpoint.into(),
        source: e,
    })
}

/// Unmounts a snapveil view at `mountpoint`, refusing anything else.
///
/// # Errors
/// Not a snapveil mount, or the unmount failing (e.g. busy).
pub fn unmount_path(mountpoint: &Path) -> Result<(), MountError> {
    match mounted_fstype(mountpoint) {
        Some(t) if is_ours(&t) => {}
        _ => {
            return Err(MountError::NotOurs {
                path: mountpoint.into(),
            })
        }
    }
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()).map_err(|e| {
        MountError::Unmount {
            path: mountpoint.into(),
            source: std::io::Error::from_raw_os_error(e as i32),
        }
    })
}

/// Removes a snapveil mount left at `mountpoint` by a killed run (lazily, so a hung
/// one cannot block). Returns whether there was one. Leaves other filesystems alone.
///
/// # Errors
/// When a stale mount exists and cannot be detached.
pub fn cleanup_stale_mount(mountpoint: &Path) -> Result<bool, MountError> {
    match mounted_fstype(mountpoint) {
        Some(t) if is_ours(&t) => {
            tracing::warn!(mountpoint = %mountpoint.display(), "removing a stale snapveil mount");
            nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                MountError::Unmount {
                    path: mountpoint.into(),
                    source: std::io::Error::from_raw_os_error(e as i32),
                }
            })?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mount is known by its own line: device, root and the mountpoint as the kernel
    /// escapes it; the topmost of several at one path; none when another filesystem is
    /// on top or there is none.
    #[test]
    fn a_mount_is_known_by_its_device_at_its_mountpoint() {
        let table = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
            90 30 0:61 / /tmp/a\\040b rw,nosuid,relatime shared:50 - fuse.snapveil snapveil ro\n\
            91 30 0:62 / /tmp/a\\040b rw,nosuid - fuse.snapveil snapveil ro\n\
            92 30 7:1 / /tmp/c rw - btrfs /dev/loop1 rw\n\
            93 30 0:63 / /tmp/d rw - fuse.snapveil snapveil ro\n\
            94 30 7:2 / /tmp/d rw - btrfs /dev/loop2 rw\n";
        assert_eq!(
            mount_id(table, Path::new("/tmp/a b")).as_deref(),
            Some(" 0:62 / /tmp/a\\040b ")
        );
        assert_eq!(mount_id(table, Path::new("/tmp/c")), None);
        assert_eq!(mount_id(table, Path::new("/tmp/d")), None);
        assert_eq!(mount_id(table, Path::new("/tmp/a")), None);
    }

    /// The mount point and key directories below the source become anchored, escaped
    /// excludes; a key file in the root is hidden alone; paths outside hide nothing.
    #[test]
    fn self_excludes_hide_what_lies_below_the_source() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        for p in ["srv/pull/root", ".nobackup", "we*ird [x]"] {
            fs::create_dir_all(src.join(p)).unwrap();
        }
        fs::write(src.join("root.pass"), "p").unwrap();
        let got = self_excludes(
            &src,
            &src.join("srv/pull/root"),
            &[
                &src.join(".nobackup/k.conf"),
                &src.join(".nobackup/k.pass"),
                &src.join("we*ird [x]/k.conf"),
                &src.join("root.pass"),
                &d.path().join("k.conf"),
            ],
        );
        assert_eq!(
            got,
            [
                "/srv/pull/root",
                "/.nobackup",
                "/we\\*ird \\[x\\]",
                "/root.pass"
            ]
        );
        let mut b = ignore::gitignore::GitignoreBuilder::new(&src);
        b.add_line(None, &got[2]).unwrap();
        let gi = b.build().unwrap();
        assert!(gi.matched(src.join("we*ird [x]"), true).is_ignore());
        assert!(!gi.matched(src.join("weXird x"), true).is_ignore());
    }
}
