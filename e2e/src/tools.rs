//! kubectl and helm, and running commands with useful errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The command-line tools the tests call.
#[derive(Clone, Debug)]
pub struct Tools {
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl Tools {
    /// The pinned kubectl and helm of `e2e/tools/build-tools.sh` (which
    /// builds them once when they are not cached).
    pub fn pinned(repo: &Path) -> anyhow::Result<Self> {
        let script = repo.join("e2e/tools/build-tools.sh");
        // Its progress goes to stderr: a first build takes many minutes.
        let output = Command::new(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot start {}", script.display()))?;
        if !output.status.success() {
            bail!("{} failed ({})", script.display(), output.status);
        }
        let out = String::from_utf8_lossy(&output.stdout);
        let var = |name: &str| {
            exported(&out, name).with_context(|| format!("{} printed no {name}", script.display()))
        };
        Ok(Self {
            kubectl: PathBuf::from(var("SANDFORK_K8S_BIN")?).join("kubectl"),
            helm: PathBuf::from(var("SANDFORK_HELM_BIN")?).join("helm"),
        })
    }

    /// kubectl and helm from `SANDFORK_E2E_KUBECTL` / `SANDFORK_E2E_HELM`, or `PATH`.
    pub fn from_env() -> Self {
        let pick = |var: &str, default: &str| {
            PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.into()))
        };
        Self {
            kubectl: pick("SANDFORK_E2E_KUBECTL", "kubectl"),
            helm: pick("SANDFORK_E2E_HELM", "helm"),
        }
    }

    pub fn kubectl(&self, kubeconfig: &Path) -> Command {
        let mut command = Command::new(&self.kubectl);
        command.arg("--kubeconfig").arg(kubeconfig);
        command
    }

    pub fn helm(&self, kubeconfig: &Path) -> Command {
        let mut command = Command::new(&self.helm);
        command.arg("--kubeconfig").arg(kubeconfig);
        command
    }
}

/// The value of `export NAME='value'` in shell output.
fn exported(out: &str, name: &str) -> Option<String> {
    out.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix("export ")?
            .strip_prefix(name)?
            .strip_prefix('=')?;
        Some(value.trim_matches('\'').trim_matches('"').to_string())
    })
}

/// Runs `command`; its stdout, or an error that shows the command and its stderr.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    run_with_input(command, None)
}

/// Like [`run`], writing `input` to the command's stdin.
pub fn run_with_input(command: &mut Command, input: Option<&str>) -> anyhow::Result<String> {
    let shown = format!("{command:?}");
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    // Written from a thread, so that a command that answers before it has
    // read everything cannot block on a full stdout pipe.
    let writer = input.map(|input| {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input = input.to_string();
        std::thread::spawn(move || stdin.write_all(input.as_bytes()))
    });
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    if let Some(writer) = writer {
        writer
            .join()
            .expect("stdin writer")
            .with_context(|| format!("writing to {shown}"))?;
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            stdout
        );
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_export_lines() {
        let out = "export SANDFORK_K8S_BIN='/c/k8s/bin'\nexport PATH='/x':\"$PATH\"\n";
        assert_eq!(
            exported(out, "SANDFORK_K8S_BIN").as_deref(),
            Some("/c/k8s/bin")
        );
        assert_eq!(exported(out, "SANDFORK_K8S"), None);
    }
}
