//! snapveil as a mount helper: `mount -t fuse.snapveil SOURCE MOUNTPOINT -o OPTIONS` and
//! `/etc/fstab` lines of type `fuse.snapveil`.
//!
//! mount(8) runs `/sbin/mount.fuse.snapveil SOURCE MOUNTPOINT -o OPTIONS` when that
//! exists (the package links it to snapveil), and otherwise fuse3's `mount.fuse3`, which
//! runs `snapveil SOURCE MOUNTPOINT -o OPTIONS` through `/bin/sh` with a sanitized PATH.
//! Both shapes are recognised here ([`helper_args`]) before clap sees the command line.
//! The options map onto `snapveil mount --background`: the helper returns once the mount
//! answers, the daemon serves it until `umount`.

use super::{usage, Outcome};
use crate::cli::{KeyArgs, MountArgs};
use anyhow::Result;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The name the package installs for mount(8): `/sbin/mount.fuse.snapveil`.
pub const HELPER_NAME: &str = "mount.fuse.snapveil";

/// Options mount(8), mount.fuse3 or systemd may pass that concern them, not the view:
/// accepted and ignored. `rw` is what libmount passes when a line does not say `ro`;
/// the view is read-only whatever it says.
const IGNORED: &[&str] = &[
    "rw",
    "ro",
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "async",
    "sync",
    "silent",
    "loud",
    "default_permissions",
];

/// True when this command line is a mount helper call: invoked as
/// `mount.fuse.snapveil`, or `snapveil SOURCE MOUNTPOINT -o ...` where SOURCE is no
/// subcommand (what mount.fuse3 runs).
pub fn helper_args(argv: &[OsString]) -> bool {
    let name = argv
        .first()
        .map(|a| {
            let b = a.as_bytes();
            let base = b.rsplit(|c| *c == b'/').next().unwrap_or(b);
            base.to_vec()
        })
        .unwrap_or_default();
    if name.starts_with(b"mount.") {
        return true;
    }
    let Some(first) = argv.get(1) else {
        return false;
    };
    // mount.fuse3 always passes `-o` (config= and passfile= are required anyway), so a
    // mistyped subcommand with two arguments stays clap's error.
    let has_o = argv[2..].iter().any(|a| a.as_bytes().starts_with(b"-o"));
    if first.as_bytes().starts_with(b"-") || argv.len() < 3 || !has_o {
        return false;
    }
    let sub = first.to_string_lossy();
    let known = <crate::cli::Cli as clap::CommandFactory>::command()
        .get_subcommands()
        .any(|c| c.get_name() == sub || c.get_all_aliases().any(|a| a == sub))
        || sub == "help";
    !known
}

/// What a helper call asks for.
#[derive(Debug)]
pub struct HelperCall {
    pub mount: MountArgs,
    /// `-f`: check everything, mount nothing (mount(8)'s fake mode).
    pub fake: bool,
    pub verbose: bool,
}

fn bad(msg: String) -> anyhow::Error {
    usage(format!("{HELPER_NAME}: {msg}"))
}

/// Parses `SOURCE MOUNTPOINT [-o OPTIONS]... [-n] [-v] [-s] [-f] [-t TYPE]`.
///
/// # Errors
/// A usage error naming the unknown option, the missing `config`/`passfile`, or the
/// bad value.
pub fn parse(argv: &[OsString]) -> Result<HelperCall> {
    let mut pos: Vec<PathBuf> = Vec::new();
    let mut opts: Vec<String> = Vec::new();
    let (mut fake, mut verbose) = (false, false);
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match s.as_ref() {
            "-o" => {
                let v = it
                    .next()
                    .ok_or_else(|| bad("-o needs a value".into()))?
                    .to_str()
                    .ok_or_else(|| bad("options must be UTF-8".into()))?;
                opts.push(v.to_string());
            }
            "-t" => {
                let t = it.next().ok_or_else(|| bad("-t needs a value".into()))?;
                if t != "snapveil" && t != "fuse.snapveil" {
                    return Err(bad(format!("type {t:?} is not snapveil")));
                }
            }
            "-n" | "-s" => {}
            "-v" => verbose = true,
            "-f" => fake = true,
            o if o.starts_with("-o") => opts.push(o[2..].to_string()),
            o if o.starts_with('-') => return Err(bad(format!("unknown flag {o}"))),
            _ => pos.push(PathBuf::from(a)),
        }
    }
    let [source, mountpoint]: [PathBuf; 2] = pos
        .try_into()
        .map_err(|_| bad("usage: SOURCE MOUNTPOINT -o config=FILE,passfile=FILE[,...]".into()))?;
    let (mut config, mut passfile, mut exclude) = (None, None, Vec::new());
    let (mut force_owner, mut allow_other, mut fsname) = (None, false, None);
    for o in opts
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        };
        let need = |v: Option<&str>| {
            v.filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| bad(format!("option {k} needs a value ({k}=...)")))
        };
        match k {
            "config" => config = Some(PathBuf::from(need(v)?)),
            "passfile" => passfile = Some(PathBuf::from(need(v)?)),
            "exclude" => exclude.push(need(v)?),
            "force_owner" => {
                let v = need(v)?;
                super::mount::parse_owner("force_owner", &v)?;
                force_owner = Some(v);
            }
            "fsname" => fsname = Some(need(v)?),
            "allow_other" if v.is_none() => allow_other = true,
            "comment" | "subtype" => {}
            _ if v.is_none() && IGNORED.contains(&k) => {}
            _ if k.starts_with("x-") => {}
            _ => return Err(bad(format!("unknown option {o:?}"))),
        }
    }
    let config = config.ok_or_else(|| bad("option config=FILE is missing".into()))?;
    let passfile = passfile.ok_or_else(|| bad("option passfile=FILE is missing".into()))?;
    Ok(HelperCall {
        mount: MountArgs {
            key: KeyArgs { config, passfile },
            exclude,
            background: true,
            force_owner,
            allow_other,
            fsname,
            // A persistent mount reads the live source: changes must show.
            frozen: false,
            source,
            mountpoint,
        },
        fake,
        verbose,
    })
}

/// Runs a helper call: checks, then leaves the daemon serving and returns once the
/// mount answers (what mount(8) expects).
///
/// # Errors
/// Usage errors (exit 2) and mount failures (exit 1).
pub fn run(argv: &[OsString]) -> Result<Outcome> {
    let call = parse(argv)?;
    if call.fake {
        crate::view::mount::check_paths(&call.mount.source, &call.mount.mountpoint)?;
        return Ok(Outcome::Success);
    }
    super::mount::background(&call.mount, call.verbose)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn argv(v: &[&str]) -> Vec<OsString> {
        v.iter().map(|s| OsStr::new(s).to_owned()).collect()
    }

    #[test]
    fn both_invocation_shapes_are_recognised() {
        assert!(helper_args(&argv(&[
            "/sbin/mount.fuse.snapveil",
            "/",
            "/mnt",
            "-o",
            "x"
        ])));
        assert!(helper_args(&argv(&["snapveil", "/", "/mnt", "-o", "ro"])));
        assert!(!helper_args(&argv(&["snapveil", "/src", "/mnt"])));
        assert!(!helper_args(&argv(&["snapveil", "rnu", "home"])));
        assert!(!helper_args(&argv(&["snapveil", "mount", "/src", "/mnt"])));
        assert!(!helper_args(&argv(&["snapveil", "run", "home"])));
        assert!(!helper_args(&argv(&["snapveil", "--help"])));
        assert!(!helper_args(&argv(&["snapveil", "help", "run"])));
        assert!(!helper_args(&argv(&["snapveil", "status"])));
    }

    #[test]
    fn fstab_options_map_onto_mount() {
        // What libmount passes for an fstab line without `ro` (it adds `rw`).
        let c = parse(&argv(&[
            "snapveil",
            "/",
            "/home/remotebackup/rootfs",
            "-o",
            "rw,config=/k/a.conf,passfile=/k/a.pass,exclude=.nobackup,exclude=/home/x,\
             force_owner=1000:1000,allow_other,fsname=snapveil-root,nofail,_netdev,x-systemd.automount",
        ]))
        .unwrap();
        assert_eq!(c.mount.key.config, PathBuf::from("/k/a.conf"));
        assert_eq!(c.mount.key.passfile, PathBuf::from("/k/a.pass"));
        assert_eq!(c.mount.exclude, [".nobackup", "/home/x"]);
        assert_eq!(c.mount.force_owner.as_deref(), Some("1000:1000"));
        assert!(c.mount.allow_other && c.mount.background && !c.fake);
        assert_eq!(c.mount.fsname.as_deref(), Some("snapveil-root"));
        assert_eq!(
            c.mount.mountpoint,
            PathBuf::from("/home/remotebackup/rootfs")
        );
        let f = parse(&argv(&[
            "mount.fuse.snapveil",
            "/s",
            "/m",
            "-f",
            "-n",
            "-oconfig=/c,passfile=/p",
        ]))
        .unwrap();
        assert!(f.fake);
    }

    #[test]
    fn bad_options_are_named() {
        let e = |a: &[&str]| parse(&argv(a)).unwrap_err().to_string();
        assert!(e(&[
            "snapveil",
            "/s",
            "/m",
            "-o",
            "config=/c,passfile=/p,reverse"
        ])
        .contains("unknown option \"reverse\""));
        assert!(e(&[
            "snapveil",
            "/s",
            "/m",
            "-o",
            "config=/c,passfile=/p,frobnicate=1"
        ])
        .contains("\"frobnicate=1\""));
        assert!(
            e(&["snapveil", "/s", "/m", "-o", "passfile=/p"]).contains("config=FILE is missing")
        );
        assert!(
            e(&["snapveil", "/s", "/m", "-o", "config=/c"]).contains("passfile=FILE is missing")
        );
        assert!(e(&[
            "snapveil",
            "/s",
            "/m",
            "-o",
            "config=/c,passfile=/p,force_owner=me"
        ])
        .contains("force_owner: \"me\" is not UID:GID"));
        assert!(e(&["snapveil", "/s", "/m", "-o", "config=,passfile=/p"])
            .contains("config needs a value"));
        assert!(e(&["snapveil", "/s", "-o", "config=/c,passfile=/p"]).contains("usage"));
        assert!(e(&["snapveil", "/s", "/m", "-t", "ext4"]).contains("\"ext4\""));
    }
}
