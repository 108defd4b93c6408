//! Where a target is: a directory here, a path over ssh, or an rsync daemon module; and how
//! rsync names a place below it. Parsed once (from the config, or from `prune --target`),
//! used by the [`super::Target`] handle for every transport. A `zfs://` address is not a
//! directory at all but a dataset that `zfs receive` writes (raw ZFS mode only,
//! [`crate::zfs_send::receive`]); rsync never sees it.

use std::path::PathBuf;

/// Where backups go. Pull kinds (a backup server reading our view) come later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Local(PathBuf),
    Ssh {
        user: Option<String>,
        host: String,
        path: String,
    },
    RsyncDaemon {
        host: String,
        port: Option<u16>,
        module: String,
        path: String,
    },
    /// `zfs://[USER@]HOST[:PORT]/POOL/PATH`, or `zfs:///POOL/PATH` (no host): received on
    /// this machine, e.g. into a second local pool.
    Zfs(ZfsAddress),
}

/// A dataset that receives raw ZFS streams, here (`host: None`) or over ssh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZfsAddress {
    pub user: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dataset: String,
}

impl ZfsAddress {
    /// The same place for another dataset below this one (a job under a default target).
    pub fn child(&self, name: &str) -> ZfsAddress {
        ZfsAddress {
            dataset: format!("{}/{name}", self.dataset),
            ..self.clone()
        }
    }

    /// `user@host` for ssh; `None` for a local receive.
    pub fn ssh_dest(&self) -> Option<String> {
        let h = self.host.as_ref()?;
        Some(match &self.user {
            Some(u) => format!("{u}@{h}"),
            None => h.clone(),
        })
    }

    /// Parses what follows `zfs://`.
    fn parse(rest: &str) -> Result<ZfsAddress, String> {
        const FORM: &str = "zfs://[USER@]HOST[:PORT]/POOL/PATH or zfs:///POOL/PATH expected";
        let (authority, dataset) = rest.split_once('/').ok_or(FORM)?;
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or("an IPv6 host needs its closing ']'")?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(FORM.into()),
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = port
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("bad port {p:?}")),
            })
            .transpose()?;
        if host.is_empty() && (user.is_some() || port.is_some()) {
            return Err(format!("a user or port needs a host: {FORM}"));
        }
        let bad_host = |c: char| !(c.is_ascii_alphanumeric() || "-._:".contains(c));
        if host.starts_with('-') || host.chars().any(bad_host) {
            return Err(format!("bad host {host:?}"));
        }
        if let Some(u) = user {
            if u.is_empty()
                || u.starts_with('-')
                || u.chars()
                    .any(|c| !(c.is_ascii_alphanumeric() || "-._".contains(c)))
            {
                return Err(format!("bad user {u:?}"));
            }
        }
        check_dataset(dataset)?;
        Ok(ZfsAddress {
            user: user.map(str::to_string),
            host: (!host.is_empty()).then(|| host.to_string()),
            port,
            dataset: dataset.to_string(),
        })
    }
}

/// A dataset name as ZFS takes it: `POOL/PATH`, components of letters, digits and
/// `_-.:`, none empty, and no snapshot (`@`) or bookmark (`#`) part.
///
/// # Errors
/// What is wrong with it, as text for the config error.
pub fn check_dataset(ds: &str) -> Result<(), String> {
    if ds.is_empty() {
        return Err("no dataset: zfs://HOST/POOL/PATH".into());
    }
    for c in ds.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!("dataset {ds:?}: empty, '.' or '..' component"));
        }
        if let Some(bad) = c
            .chars()
            .find(|ch| !(ch.is_ascii_alphanumeric() || "_-.:".contains(*ch)))
        {
            return Err(format!(
                "dataset {ds:?}: {bad:?} is not allowed (letters, digits, '_', '-', '.', ':')"
            ));
        }
    }
    if ds.starts_with('-') {
        return Err(format!("dataset {ds:?} must not start with '-'"));
    }
    Ok(())
}

impl std::fmt::Display for ZfsAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = self
            .user
            .as_ref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let h = match &self.host {
            Some(h) if h.contains(':') => format!("[{h}]"),
            Some(h) => h.clone(),
            None => String::new(),
        };
        let p = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        write!(f, "zfs://{u}{h}{p}/{}", self.dataset)
    }
}

impl Address {
    /// The rsync destination for a path below the target root (`sub` without leading /).
    /// A `zfs://` address is no rsync destination: it gives its own name, which rsync
    /// would refuse (no transport reaches one: raw jobs branch before).
    pub fn rsync_dest(&self, sub: &str) -> String {
        let join = |base: &str| {
            if sub.is_empty() {
                format!("{}/", base.trim_end_matches('/'))
            } else {
                format!("{}/{}", base.trim_end_matches('/'), sub)
            }
        };
        match self {
            Address::Local(p) => join(&p.to_string_lossy()),
            Address::Ssh { user, host, path } => {
                let u = user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
                format!("{u}{host}:{}", join(path))
            }
            Address::RsyncDaemon {
                host,
                port,
                module,
                path,
            } => {
                let p = port.map(|p| format!(":{p}")).unwrap_or_default();
                let base = if path.is_empty() {
                    module.clone()
                } else {
                    format!("{module}/{path}")
                };
                format!("rsync://{host}{p}/{}", join(&base))
            }
            Address::Zfs(z) => z.to_string(),
        }
    }

    /// The `zfs://` dataset, if this is one.
    pub fn zfs(&self) -> Option<&ZfsAddress> {
        match self {
            Address::Zfs(z) => Some(z),
            _ => None,
        }
    }
}

impl Address {
    /// `--backup-dir` for run `stamp`: `TARGET/generations/STAMP/`, written so that the
    /// receiving side resolves it to exactly that place. rsync resolves a relative
    /// backup dir against the destination (`current/`), but a daemon sanitizes `..` away
    /// (which would put generations *inside* `current/`) and rrsync refuses it; both
    /// anchor an absolute path at the module or restricted directory. So: absolute
    /// wherever the target path is absolute or daemon-relative, `../` only for an ssh path
    /// relative to the remote home.
    pub fn backup_dir(&self, stamp: &str) -> String {
        match self {
            Address::Local(p) => format!(
                "{}/generations/{stamp}",
                p.to_string_lossy().trim_end_matches('/')
            ),
            Address::Ssh { path, .. } if path.starts_with('/') => {
                format!("{}/generations/{stamp}", path.trim_end_matches('/'))
            }
            Address::Ssh { .. } => format!("../generations/{stamp}"),
            Address::RsyncDaemon { path, .. } => {
                let p = path.trim_matches('/');
                if p.is_empty() {
                    format!("/generations/{stamp}")
                } else {
                    format!("/{p}/generations/{stamp}")
                }
            }
            Address::Zfs(z) => format!("{z}@{stamp}"),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Address::Zfs(z) = self {
            return z.fmt(f);
        }
        let s = self.rsync_dest("");
        f.write_str(s.trim_end_matches('/'))
    }
}

impl Address {
    /// Parses a config's `target`: an absolute path, `[USER@]HOST:PATH` (ssh),
    /// `rsync://HOST[:PORT]/MODULE[/PATH]` or `zfs://[USER@]HOST[:PORT]/POOL/PATH`
    /// (`zfs:///POOL/PATH`: this machine); `..` is refused everywhere.
    ///
    /// # Errors
    /// What form was expected, as text for the config error.
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(rest) = s.strip_prefix("zfs://") {
            return ZfsAddress::parse(rest).map(Address::Zfs);
        }
        if let Some(rest) = s.strip_prefix("rsync://") {
            let (hostport, path) = rest
                .split_once('/')
                .ok_or("rsync://HOST/MODULE[/PATH] expected")?;
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    h,
                    Some(p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
                ),
                None => (hostport, None),
            };
            let (module, path) = path.split_once('/').unwrap_or((path, ""));
            if host.is_empty() || module.is_empty() {
                return Err("rsync://HOST/MODULE[/PATH] expected".into());
            }
            return Ok(Address::RsyncDaemon {
                host: host.into(),
                port,
                module: module.into(),
                path: path.trim_matches('/').into(),
            });
        }
        if s.starts_with('/') {
            if s.split('/').any(|c| c == "..") {
                return Err("'..' is not allowed in a target path".into());
            }
            return Ok(Address::Local(PathBuf::from(s)));
        }
        if let Some((userhost, path)) = s.split_once(':') {
            let (user, host) = match userhost.split_once('@') {
                Some((u, h)) => (Some(u.to_string()), h),
                None => (None, userhost),
            };
            if host.is_empty() || path.is_empty() || host.contains('/') {
                return Err("[USER@]HOST:PATH expected".into());
            }
            if path.split('/').any(|c| c == "..") {
                return Err("'..' is not allowed in a target path".into());
            }
            return Ok(Address::Ssh {
                user,
                host: host.into(),
                path: path.into(),
            });
        }
        Err("expected an absolute path, [USER@]HOST:PATH or rsync://HOST/MODULE/PATH".into())
    }

    /// Parses `prune --target`: also `HOST::MODULE[/PATH]` for a daemon and a relative
    /// local path (write `./a:b` for a local name with a colon). Anything that is not a
    /// daemon or `[USER@]HOST:PATH` is a local path.
    pub fn parse_cli(s: &str) -> Address {
        if let Some((host, rest)) = s.split_once("::").filter(|_| !s.starts_with("rsync://")) {
            let (module, path) = rest.split_once('/').unwrap_or((rest, ""));
            return Address::RsyncDaemon {
                host: host.into(),
                port: None,
                module: module.into(),
                path: path.trim_matches('/').into(),
            };
        }
        if s.starts_with("rsync://") {
            if let Ok(a) = Address::parse(s) {
                return a;
            }
        }
        match s.split_once(':') {
            Some((remote, path)) if !remote.is_empty() && !remote.contains('/') => {
                let (user, host) = match remote.rsplit_once('@') {
                    Some((u, h)) => (Some(u.to_string()), h.to_string()),
                    None => (None, remote.to_string()),
                };
                Address::Ssh {
                    user,
                    host,
                    path: path.into(),
                }
            }
            _ => Address::Local(PathBuf::from(s)),
        }
    }

    /// `user@host` of an ssh target (or of a remote `zfs://` one).
    pub fn ssh_dest(&self) -> Option<String> {
        match self {
            Address::Zfs(z) => z.ssh_dest(),
            Address::Ssh { user, host, .. } => Some(match user {
                Some(u) => format!("{u}@{host}"),
                None => host.clone(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `prune --target` forms (the config's are tested with the config).
    #[test]
    fn cli_forms() {
        assert_eq!(
            Address::parse_cli("/srv/t"),
            Address::Local("/srv/t".into())
        );
        assert_eq!(Address::parse_cli("./a:b"), Address::Local("./a:b".into()));
        assert_eq!(
            Address::parse_cli("bk@host:/srv/t"),
            Address::Ssh {
                user: Some("bk".into()),
                host: "host".into(),
                path: "/srv/t".into(),
            }
        );
        let daemon = Address::parse_cli("rsync://h:873/m/p");
        assert_eq!(
            daemon,
            Address::RsyncDaemon {
                host: "h".into(),
                port: Some(873),
                module: "m".into(),
                path: "p".into()
            }
        );
        assert_eq!(daemon.rsync_dest(""), "rsync://h:873/m/p/");
        let short = Address::parse_cli("h::m/p");
        assert_eq!(short.rsync_dest("runs/"), "rsync://h/m/p/runs/");
    }

    #[test]
    fn zfs_forms() {
        let z = |s: &str| match Address::parse(s) {
            Ok(Address::Zfs(z)) => z,
            other => panic!("{s}: {other:?}"),
        };
        let a = z("zfs://backup@nas:2222/pool2/bk/db");
        assert_eq!(
            a,
            ZfsAddress {
                user: Some("backup".into()),
                host: Some("nas".into()),
                port: Some(2222),
                dataset: "pool2/bk/db".into()
            }
        );
        assert_eq!(a.to_string(), "zfs://backup@nas:2222/pool2/bk/db");
        assert_eq!(a.ssh_dest().as_deref(), Some("backup@nas"));
        let local = z("zfs:///tank2/bk");
        assert_eq!(local.host, None);
        assert_eq!(local.ssh_dest(), None);
        assert_eq!(local.to_string(), "zfs:///tank2/bk");
        assert_eq!(local.child("j").dataset, "tank2/bk/j");
        let v6 = z("zfs://[::1]:22/p/d");
        assert_eq!(v6.host.as_deref(), Some("::1"));
        assert_eq!(v6.to_string(), "zfs://[::1]:22/p/d");
        for (bad, why) in [
            ("zfs://host", "expected"),
            ("zfs://host/", "no dataset"),
            ("zfs://host/pool//x", "empty"),
            ("zfs://host/pool/../x", "'..'"),
            ("zfs://host/pool/a@snap", "'@'"),
            ("zfs://host/pool/a b", "' '"),
            ("zfs://host:99999/pool", "bad port"),
            ("zfs://host:x/pool", "bad port"),
            ("zfs://u@/pool", "needs a host"),
            ("zfs://-oProxyCommand=x/pool", "bad host"),
            ("zfs://-u@h/pool", "bad user"),
            ("zfs://h/-pool", "'-'"),
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
