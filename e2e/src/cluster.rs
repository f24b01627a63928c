//! The local control plane of `e2e/cluster/local-cluster.sh`, stopped when
//! dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

pub struct LocalCluster {
    script: PathBuf,
    dir: PathBuf,
    running: bool,
}

impl LocalCluster {
    /// Starts a cluster whose state lives in `dir`; its log goes to `log`.
    pub fn up(repo: &Path, dir: &Path, log: &Path) -> anyhow::Result<Self> {
        let script = repo.join("e2e/cluster/local-cluster.sh");
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        // From here on, dropping `cluster` stops whatever `up` started.
        let mut cluster = Self {
            script,
            dir: dir.to_path_buf(),
            running: true,
        };
        let status = Command::new(&cluster.script)
            .arg("up")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .status()
            .with_context(|| format!("cannot start {}", cluster.script.display()))?;
        if !status.success() {
            cluster.down();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("local-cluster.sh up failed ({status}):\n{log}");
        }
        Ok(cluster)
    }

    /// The admin kubeconfig (group system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The CA that signed the API server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the cluster; safe to repeat.
    pub fn down(&mut self) {
        if !std::mem::take(&mut self.running) {
            return;
        }
        let result = Command::new(&self.script)
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !result.as_ref().is_ok_and(|status| status.success()) {
            eprintln!(
                "e2e: local-cluster.sh down {} failed: {result:?}",
                self.dir.display()
            );
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.down();
    }
}
