//! Man pages and shell completions, generated from the clap command tree (`cli::Cli`), so
//! they cannot drift from the commands: `snapveil(8)`, one `snapveil-SUBCOMMAND(8)` per
//! visible subcommand at any depth, and bash, zsh and fish completions. The package build
//! (`scripts/build-deb.sh`) runs `snapveil gen-docs DIR` with the binary it packages.
//!
//! Only what clap cannot know is written by hand, as roff beside this file: the pipeline
//! in `description.roff` (appended to the DESCRIPTION clap renders from `long_about`) and
//! FILES, ENVIRONMENT, LOGS, EXIT STATUS and SEE ALSO in `sections.roff`. Nothing here
//! names a subcommand or a flag: a new one appears in the pages and completions as soon
//! as `cli` declares it.

use clap::Command;
use clap_complete::Shell;
use clap_mangen::Man;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const SECTION: &str = "8";
const MANUAL: &str = "System Administration";
const DESCRIPTION: &str = include_str!("description.roff");
const SECTIONS: &str = include_str!("sections.roff");

/// The shells completions are written for, and each file's path under `completions/`
/// (the name each shell's vendor directory expects).
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash/snapveil"),
    (Shell::Zsh, "zsh/_snapveil"),
    (Shell::Fish, "fish/snapveil.fish"),
];

/// Writes `DIR/man8/*.8` and `DIR/completions/{bash,zsh,fish}/…` for `cmd` (the
/// user-facing tree, `Cli::command()`), creating the directories; returns the files.
///
/// # Errors
/// Creating a directory or writing a file failed.
pub fn write_all(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    // Sets each subcommand's display name ("snapveil-run"), which names its page.
    cmd.build();
    let mut written = Vec::new();
    let man_dir = dir.join(format!("man{SECTION}"));
    std::fs::create_dir_all(&man_dir)?;
    let path = man_dir.join(format!("{}.{SECTION}", cmd.get_name()));
    std::fs::write(&path, top_page(&cmd)?)?;
    written.push(path);
    sub_pages(&cmd, &man_dir, &mut written)?;
    let name = cmd.get_name().to_string();
    for (shell, file) in COMPLETIONS {
        let path = dir.join("completions").join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut out);
        std::fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}

fn man(cmd: &Command) -> Man {
    let source = format!(
        "{} {}",
        cmd.get_bin_name().unwrap_or(cmd.get_name()),
        version(cmd)
    );
    Man::new(cmd.clone())
        .section(SECTION)
        .manual(MANUAL)
        .source(source)
}

fn version(cmd: &Command) -> String {
    cmd.get_version()
        .unwrap_or(env!("CARGO_PKG_VERSION"))
        .to_string()
}

/// `snapveil(8)`: clap's sections with the hand-written ones in their usual places.
fn top_page(cmd: &Command) -> io::Result<Vec<u8>> {
    let m = man(cmd);
    let mut out = Vec::new();
    m.render_title(&mut out)?;
    m.render_name_section(&mut out)?;
    m.render_synopsis_section(&mut out)?;
    m.render_description_section(&mut out)?;
    out.write_all(DESCRIPTION.as_bytes())?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        m.render_options_section(&mut out)?;
    }
    m.render_subcommands_section(&mut out)?;
    out.write_all(SECTIONS.as_bytes())?;
    m.render_version_section(&mut out)?;
    Ok(out)
}

/// One page per visible subcommand, recursively; each points back to `snapveil(8)` for
/// what all commands share.
fn sub_pages(parent: &Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in parent.get_subcommands().filter(|s| !s.is_hide_set()) {
        let m = man(sub);
        let mut out = Vec::new();
        m.render(&mut out)?;
        writeln!(
            out,
            ".SH EXIT STATUS\n0 success, 1 the work failed, 2 usage or config error: see\n.BR snapveil ({SECTION}).\n.SH SEE ALSO\n.BR snapveil ({SECTION})"
        )?;
        let path = dir.join(m.get_filename());
        std::fs::write(&path, out)?;
        written.push(path);
        sub_pages(sub, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every visible subcommand (at any depth) with its visible long flags.
    fn tree(cmd: &Command, prefix: &str, out: &mut Vec<(String, Vec<String>)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{prefix}-{}", sub.get_name());
            let longs = sub
                .get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect();
            out.push((name.clone(), longs));
            tree(sub, &name, out);
        }
    }

    /// The pages and completions name every subcommand and every flag of the tree: a
    /// subcommand or flag the generator skipped fails here.
    #[test]
    fn pages_and_completions_cover_every_subcommand_and_flag() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = crate::cli::Cli::command();
        write_all(cmd.clone(), dir.path()).unwrap();
        let mut built = cmd.clone().disable_help_subcommand(true);
        built.build();
        let mut subs = Vec::new();
        tree(&built, "snapveil", &mut subs);
        assert!(subs.len() >= 14, "{subs:?}");
        let top = std::fs::read_to_string(dir.path().join("man8/snapveil.8")).unwrap();
        let comp: Vec<(Shell, String)> = COMPLETIONS
            .iter()
            .map(|(s, f)| {
                (
                    *s,
                    std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap(),
                )
            })
            .collect();
        for a in built.get_arguments().filter_map(|a| a.get_long()) {
            assert!(
                top.contains(&format!("\\-\\-{}", a.replace('-', "\\-"))),
                "snapveil.8 lacks --{a}"
            );
        }
        for (page, longs) in &subs {
            let text = std::fs::read_to_string(dir.path().join(format!("man8/{page}.8")))
                .unwrap_or_else(|e| panic!("no page for {page}: {e}"));
            let sub = page.rsplit('-').next().unwrap();
            let word = page.trim_start_matches("snapveil-");
            // roff escapes '-' as "\-"
            assert!(
                top.contains(&format!("{}({SECTION})", page.replace('-', "\\-"))),
                "snapveil.8 does not list {page}"
            );
            for (shell, c) in &comp {
                assert!(
                    c.contains(word),
                    "{shell} completion lacks the subcommand {word}"
                );
            }
            for long in longs {
                let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(text.contains(&roff), "{page}.8 lacks --{long}");
                for (shell, c) in &comp {
                    let ok = match shell {
                        Shell::Fish => c.contains(&format!("-l {long}")),
                        _ => c.contains(&format!("--{long}")),
                    };
                    assert!(ok, "{shell} completion lacks --{long} of {sub}");
                }
            }
        }
    }
}
