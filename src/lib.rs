//! snapveil: snapshot → encrypted reverse view → rsync generations.
//!
//! The modules mirror the pipeline: `snapshot` freezes a source, `crypto` holds the
//! gocryptfs-compatible transforms and the rules for reading an encrypted copy (file I/O
//! only for the key config and a copy's `gocryptfs.diriv` and long-name files), `view`
//! presents a frozen tree encrypted over FUSE, `exec` is the one seam through which every external command runs. `target` owns
//! the backup target: its layout (`current/`, `generations/`, `runs/`, `manifests/`), its
//! records and restore points, and the ways to reach it (a local path, rsync over ssh or
//! rrsync, a daemon); `stamp` names runs. `job` runs a configured job; `prune` plans by
//! `retention`, `verify` and `restore` read back, each through one `target::Target`;
//! `decrypt` reads a copy on disk.
//!
//! The command line: `cli` declares it (clap, no logic), [`run`] hands each subcommand's
//! arguments to its module under `commands` (one per subcommand), and `commands` is the
//! only code that reads `cli` types, prints reports and decides the exit status (0
//! success, 1 the work failed, 2 usage or config error; see `error` and `snapveil(8)`).
//! Everything below `commands` takes plain parameters.

pub mod changes;
pub mod cli;
mod commands;
pub mod config;
pub mod crypto;
pub mod decrypt;
pub mod docs;
pub mod error;
pub mod exec;
pub mod hooks;
pub mod job;
pub mod leb128;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod prune;
pub mod pull;
pub mod restore;
pub mod retention;
pub mod scratch;
pub mod signals;
pub mod snapshot;
pub mod stamp;
pub mod status;
pub mod target;
pub mod verify;
pub mod view;
pub mod zfs_send;

use std::process::ExitCode;

/// When `argv` is a mount helper call (`mount -t fuse.snapveil`, an fstab line), runs
/// it and returns its exit status; `None` for an ordinary command line.
pub fn run_mount_helper(argv: &[std::ffi::OsString]) -> Option<ExitCode> {
    if !commands::mount_helper::helper_args(argv) {
        return None;
    }
    logging::init(logging::LogFormat::Plain, 0);
    Some(commands::exit_code(commands::mount_helper::run(argv)))
}

/// Runs one CLI invocation and returns its exit status; errors are printed on stderr
/// here (by `commands::exit_code`). `runner` executes every external command.
pub fn run(runner: &dyn exec::Runner, cli: cli::Cli) -> ExitCode {
    use cli::Command as C;
    let result = match cli.command {
        C::Init(a) => commands::init::run(runner, a),
        C::Mount(a) => commands::mount::run(runner, a),
        C::Umount(a) => commands::umount::run(runner, a),
        C::Decrypt(a) => commands::decrypt::run(runner, a),
        C::Open(a) => commands::open::run(runner, a),
        C::Run(a) => commands::run::run(runner, a),
        C::CheckConfig(a) => commands::check_config::run(runner, a),
        C::Status(a) => commands::status::run(runner, a),
        C::List(a) => commands::list::run(runner, a),
        C::Prune(a) => commands::prune::run(runner, a),
        C::Verify(a) => commands::verify::run(runner, a),
        C::Restore(a) => commands::restore::run(runner, a),
        C::Snapshot(a) => commands::snapshot::run(runner, a),
        C::Cleanup(a) => commands::cleanup::run(runner, a),
        C::ServePull(a) => commands::serve_pull::run(runner, a),
        C::MountUnit(a) => commands::mount_unit::run(runner, a),
    };
    commands::exit_code(result)
}

/// `snapveil gen-docs DIR` (hidden; for the package build): man pages and completions
/// from [`cli::Cli`]'s command tree. Prints the files written.
pub fn gen_docs(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    match docs::write_all(cli::Cli::command(), dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "snapveil: error: writing man pages and completions to {}: {e}",
                dir.display()
            );
            ExitCode::from(error::EXIT_FAILURE)
        }
    }
}
