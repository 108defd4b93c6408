//! Where a target is: a directory here, a path over ssh, or an rsync daemon module; and how
//! rsync names a place below it. Parsed once (from the config, or from `prune --target`),
//! used by the [`super::Target`] handle for every transport.

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
}

impl Address {
    /// The rsync destination for a path below the target root (`sub` without leading /).
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
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.rsync_dest("");
        f.write_str(s.trim_end_matches('/'))
    }
}

impl Address {
    /// Parses a config's `target`: an absolute path, `[USER@]HOST:PATH` (ssh) or
    /// `rsync://HOST[:PORT]/MODULE[/PATH]`; `..` is refused everywhere.
    ///
    /// # Errors
    /// What form was expected, as text for the config error.
    pub fn parse(s: &str) -> Result<Address, String> {
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

    /// `user@host` of an ssh target.
    pub fn ssh_dest(&self) -> Option<String> {
        match self {
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
}
