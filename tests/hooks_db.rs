//! The shipped database hooks against real servers (tests/ops.rs pins their protocol
//! against recording stand-ins): MariaDB's `mysql-flush-lock` really blocks writes while
//! held and a `snapveil run` with it yields a datadir that a second server starts from and
//! reads; PostgreSQL's `postgresql` hook really checkpoints and its dumps load back.
//! Each server is private to the test (its own datadir and socket, no network) and is
//! stopped by a guard, whatever the test does.

use crate::util::btrfs::BtrfsLoop;
use crate::util::fuse::gocryptfs_forward;
use crate::util::setup::{wait_for, Setup};
use crate::util::{ok, require_tool, run};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn hook(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hooks")
        .join(name)
}

/// Small InnoDB files (the defaults make a 100 MB datadir): the test backs it up through
/// the view of a debug build.
const SMALL: [&str; 5] = [
    "--innodb-log-file-size=4M",
    "--innodb-buffer-pool-size=8M",
    "--innodb-data-file-path=ibdata1:2M:autoextend",
    "--innodb-temp-data-file-path=ibtmp1:1M:autoextend",
    "--innodb-autoextend-increment=1",
];

/// A private mariadbd on `datadir`, listening on a socket only; killed on drop.
struct Mariadb {
    child: Child,
    socket: PathBuf,
}

impl Mariadb {
    /// Creates the datadir (system tables) when it is empty, then starts the server.
    fn start(datadir: &Path, run_dir: &Path) -> Mariadb {
        if fs::read_dir(datadir).map_or(true, |mut d| d.next().is_none()) {
            ok(Command::new("mariadb-install-db")
                .args(["--no-defaults", "--user=root", "--skip-test-db"])
                .args(SMALL)
                .arg(format!("--datadir={}", datadir.display())));
        }
        fs::create_dir_all(run_dir).unwrap();
        let socket = run_dir.join("mysqld.sock");
        let child = Command::new("mariadbd")
            .args(["--no-defaults", "--user=root", "--skip-networking"])
            .args(SMALL)
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                run_dir.join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                run_dir.join("error.log").display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting mariadbd");
        let db = Mariadb { child, socket };
        wait_for(60, "mariadbd answers on its socket", || {
            db.client()
                .arg("-e")
                .arg("SELECT 1")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        db
    }

    /// The arguments that point a client (and the hook) at this server.
    fn args(&self) -> Vec<String> {
        vec![
            "--no-defaults".into(),
            format!("--socket={}", self.socket.display()),
            "--user=root".into(),
        ]
    }

    fn client(&self) -> Command {
        let mut c = Command::new("mariadb");
        c.args(self.args()).args(["--batch", "--skip-column-names"]);
        c
    }

    fn sql(&self, q: &str) -> String {
        ok(self.client().arg("-e").arg(q)).trim().to_string()
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..300 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The held hook takes FLUSH TABLES WITH READ LOCK on a real server: a write waits (and
/// times out) while the hook holds, and goes through once snapveil closes its stdin. Then a
/// `snapveil run` with the hook backs up the live datadir from a btrfs snapshot, and a
/// second server started on the decrypted backup has every committed row.
#[test]
fn mariadb_flush_lock_holds_writes_and_the_backup_starts_as_a_server() {
    if !require_tool("mariadbd") || !require_tool("mariadb-install-db") {
        return;
    }
    let Some(b) = BtrfsLoop::new() else { return };
    let src = b.subvolume("db");
    let datadir = src.join("mysql");
    fs::create_dir_all(&datadir).unwrap();
    let s = Setup::new();
    let db = Mariadb::start(&datadir, &s.path("run"));
    db.sql("CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; CREATE TABLE shop.a (id INT) ENGINE=Aria;");
    db.sql("INSERT INTO shop.t VALUES (1,'one'),(2,'two'); INSERT INTO shop.a VALUES (1);");

    // The hook alone: READY only once the lock is held.
    let mut held = Command::new(hook("mysql-flush-lock"))
        .args(db.args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(held.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "READY\n");
    let blocked = run(db
        .client()
        .arg("-e")
        .arg("SET SESSION lock_wait_timeout=1; INSERT INTO shop.t VALUES (3,'three')"));
    assert!(
        !blocked.status.success()
            && String::from_utf8_lossy(&blocked.stderr).contains("Lock wait timeout"),
        "a write while the hook holds the lock must wait: {blocked:?}"
    );
    drop(held.stdin.take());
    let st = held.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(held.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(st.success(), "{err}");
    assert!(err.contains("tables locked"), "{err}");
    db.sql("INSERT INTO shop.t VALUES (3,'three')");

    // A run with the hook held around the snapshot, the server still running.
    let target = s.path("target");
    let hooks = format!(
        "[[job.hooks]]\nphase = \"pre_snapshot\"\ncommand = [{:?}, {}]\nheld = true\ntimeout = \"60s\"\n",
        hook("mysql-flush-lock").display().to_string(),
        db.args()
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s.write_config(&[s.job(
        "db",
        &format!("btrfs:{}", src.display()),
        target.to_str().unwrap(),
        &hooks,
    )]);
    s.run_ok(&[]);
    s.assert_clean("db", &b);
    // Written after the snapshot: must not be in the backup.
    db.sql("INSERT INTO shop.t VALUES (4,'after')");
    drop(db);

    // Restored with stock gocryptfs, as the README's restore does without snapveil.
    let restored = s.path("restored");
    {
        let plain = gocryptfs_forward(&s.pass, &target.join("current"), &s.path("plain"));
        ok(Command::new("cp")
            .arg("-a")
            .arg(plain.path.join("mysql"))
            .arg(&restored));
    }
    let back = Mariadb::start(&restored, &s.path("run2"));
    assert_eq!(
        back.sql("SELECT GROUP_CONCAT(v ORDER BY id) FROM shop.t"),
        "one,two,three"
    );
    assert_eq!(back.sql("SELECT COUNT(*) FROM shop.a"), "1");
    assert_eq!(
        back.sql("CHECK TABLE shop.t, shop.a")
            .matches("\tOK")
            .count(),
        2
    );
}

/// A private PostgreSQL cluster (owned by the `postgres` user, as Debian runs it), on a
/// socket directory only; stopped on drop.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
}

impl Postgres {
    fn start(dir: &Path) -> Option<Postgres> {
        let bin = fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()?;
        fs::create_dir_all(dir).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        ok(Command::new("chown").arg("postgres:postgres").arg(dir));
        let pg = Postgres {
            data: dir.join("data"),
            sock: dir.to_path_buf(),
            bin,
        };
        ok(pg
            .as_postgres("initdb")
            .args(["-A", "peer", "-U", "postgres", "-D"])
            .arg(&pg.data));
        ok(pg
            .as_postgres("pg_ctl")
            .args(["-w", "-t", "60", "-l"])
            .arg(dir.join("log"))
            .arg("-D")
            .arg(&pg.data)
            .arg("-o")
            .arg(format!("-c listen_addresses='' -k {}", pg.sock.display()))
            .arg("start"));
        Some(pg)
    }

    fn as_postgres(&self, prog: &str) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(self.bin.join(prog));
        c.current_dir("/");
        c
    }

    fn sql(&self, db: &str, q: &str) -> String {
        ok(self
            .as_postgres("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .args(["-d", db, "-c", q]))
        .trim()
        .to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
    }
}

/// `postgresql checkpoint` runs a real CHECKPOINT (the server's count of requested
/// checkpoints goes up); `postgresql dump` writes a whole-cluster dump (root-only, no
/// temp file left) that loads back into the server after the database was dropped;
/// `dump-db -Fc` writes an archive `pg_restore` lists.
#[test]
fn postgresql_hook_checkpoints_and_dumps_a_real_cluster() {
    if !require_tool("runuser") {
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("snapveil-pg-")
        .tempdir()
        .unwrap();
    let Some(pg) = Postgres::start(&work.path().join("pg")) else {
        panic!("PostgreSQL is not installed: run `make deps`");
    };
    pg.sql("postgres", "CREATE DATABASE shop");
    pg.sql(
        "shop",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1,'one'),(2,'two')",
    );
    let host = pg.sock.display().to_string();
    let hook_ok = |args: &[&str]| {
        let o = run(Command::new(hook("postgresql")).args(args));
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    let before: u64 = pg
        .sql("postgres", "SELECT checkpoints_req FROM pg_stat_bgwriter")
        .parse()
        .unwrap();
    let err = hook_ok(&["checkpoint", "-h", &host]);
    assert!(err.contains("CHECKPOINT done"), "{err}");
    let after: u64 = pg
        .sql("postgres", "SELECT checkpoints_req FROM pg_stat_bgwriter")
        .parse()
        .unwrap();
    assert!(after > before, "checkpoints_req {before} -> {after}");

    let out = work.path().join("dumps");
    fs::create_dir(&out).unwrap();
    let dump = out.join("all.sql");
    hook_ok(&["dump", dump.to_str().unwrap(), "-h", &host]);
    assert_eq!(fs::metadata(&dump).unwrap().permissions().mode() & 0o077, 0);
    assert!(!out.join("all.sql.tmp").exists());
    let text = fs::read_to_string(&dump).unwrap();
    assert!(
        text.contains("CREATE DATABASE shop"),
        "pg_dumpall output expected"
    );
    // It loads back: drop the database, feed the dump to psql (as root opens the file).
    pg.sql("postgres", "DROP DATABASE shop");
    let mut psql = pg
        .as_postgres("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=0",
            "-h",
            &host,
            "-d",
            "postgres",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    psql.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    psql.wait().unwrap();
    assert_eq!(
        pg.sql("shop", "SELECT string_agg(v, ',' ORDER BY id) FROM t"),
        "one,two"
    );

    let one = out.join("shop.dump");
    hook_ok(&["dump-db", "shop", one.to_str().unwrap(), "-Fc", "-h", &host]);
    let list = ok(Command::new(pg.bin.join("pg_restore"))
        .arg("--list")
        .arg(&one));
    assert!(list.contains("TABLE public t"), "{list}");
}
