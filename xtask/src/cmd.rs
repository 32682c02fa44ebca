//! Running commands: every command is echoed, as a line that can be pasted into a shell, before
//! it runs.

use std::ffi::OsString;
use std::process::{Command, Stdio};

/// A command line to echo and run: the program, its arguments and extra environment variables.
#[derive(Debug, Clone)]
pub(crate) struct Cmd {
    program: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

/// What a captured run produced.
#[derive(Debug)]
pub(crate) struct Captured {
    pub(crate) success: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Cmd {
    /// A command running `program`.
    pub(crate) fn new(program: &str) -> Self {
        Self {
            program: program.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// `cargo` with the given arguments. It runs the cargo that runs xtask (`$CARGO`), so the
    /// toolchain pinned in rust-toolchain.toml is used throughout; the echo says `cargo`.
    pub(crate) fn cargo(args: &[&str]) -> Self {
        Self::new("cargo").args(args)
    }

    /// Appends arguments.
    pub(crate) fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|arg| (*arg).to_owned()));
        self
    }

    /// Sets an environment variable for this command only.
    pub(crate) fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The command as a shell line: `KEY="v a l" program arg ...`.
    pub(crate) fn display(&self) -> String {
        let mut words: Vec<String> = self
            .envs
            .iter()
            .map(|(key, value)| format!("{key}={}", quote(value)))
            .collect();
        words.push(self.program.clone());
        words.extend(self.args.iter().map(|arg| quote(arg)));
        words.join(" ")
    }

    fn command(&self) -> Command {
        let program: OsString = if self.program == "cargo" {
            std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
        } else {
            self.program.clone().into()
        };
        let mut command = Command::new(program);
        command.args(&self.args);
        for (key, value) in &self.envs {
            command.env(key, value);
        }
        command
    }

    /// Echoes the command, runs it with inherited stdio, and fails unless it exits with 0.
    pub(crate) fn run(&self) -> Result<(), String> {
        eprintln!("$ {}", self.display());
        match self.command().status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("`{}` exited with {status}", self.display())),
            Err(err) => Err(format!("cannot run `{}`: {err}", self.display())),
        }
    }

    /// Echoes the command, runs it with stdout and stderr captured, and returns what it printed
    /// whether or not it succeeded. Only failing to start at all is an error.
    pub(crate) fn capture(&self) -> Result<Captured, String> {
        eprintln!("$ {}", self.display());
        self.capture_quietly()
    }

    /// Like [`Cmd::capture`] without the echo, for probes that only read system state.
    pub(crate) fn capture_quietly(&self) -> Result<Captured, String> {
        let output = self
            .command()
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("cannot run `{}`: {err}", self.display()))?;
        Ok(Captured {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Quotes a word for a POSIX shell when it needs it.
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Runs each command in turn, all of them even after a failure, and reports every failure.
pub(crate) fn run_all(cmds: &[Cmd]) -> Result<(), String> {
    let failures: Vec<String> = cmds.iter().filter_map(|cmd| cmd.run().err()).collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_env_values_with_spaces() {
        let cmd =
            Cmd::cargo(&["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings");
        assert_eq!(
            cmd.display(),
            "RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps"
        );
    }

    #[test]
    fn display_leaves_plain_words_alone() {
        let cmd = Cmd::cargo(&["test", "-p", "vu-daemon", "--features", "xen,postcopy"]);
        assert_eq!(
            cmd.display(),
            "cargo test -p vu-daemon --features xen,postcopy"
        );
    }

    #[test]
    fn display_quotes_empty_words() {
        assert_eq!(Cmd::new("echo").args(&[""]).display(), "echo \"\"");
    }

    #[test]
    fn capture_returns_output_of_a_failing_command() {
        let captured = Cmd::new("sh")
            .args(&["-c", "echo out; echo err >&2; exit 3"])
            .capture_quietly()
            .unwrap();
        assert!(!captured.success);
        assert_eq!(captured.stdout, "out\n");
        assert_eq!(captured.stderr, "err\n");
    }
}
