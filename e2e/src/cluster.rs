//! The local cluster of `e2e/cluster/local-cluster.sh` (control plane and
//! nodes), stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::env::Binaries;
use crate::tools;

/// The chart's default state directory of the agent, on each node.
const AGENT_STATE_DIR: &str = "/dev/shm/sandfork";

/// One node of the local cluster, from its `node.env`.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub ip: String,
    /// Its network namespace (`/run/netns/...`).
    pub netns: PathBuf,
    /// The process that holds its mount namespace.
    pub holder_pid: u32,
}

impl Node {
    /// The agent's state directory on this node, seen from this host
    /// through the node's mount namespace (its /dev/shm is its own).
    pub fn state_dir(&self) -> Option<PathBuf> {
        let dir = PathBuf::from(format!("/proc/{}/root{AGENT_STATE_DIR}", self.holder_pid));
        dir.is_dir().then_some(dir)
    }
}

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

    /// The node called `name`, while the cluster runs.
    pub fn node(&self, name: &str) -> Option<Node> {
        let text =
            std::fs::read_to_string(self.dir.join("nodes").join(name).join("node.env")).ok()?;
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        Some(Node {
            name: name.to_string(),
            ip: field("NODE_IP")?,
            netns: Path::new("/run/netns").join(field("NODE_NETNS")?),
            holder_pid: field("NODE_HOLDER_PID")?.parse().ok()?,
        })
    }

    /// Packs the operator and agent binaries as the images the chart's
    /// default values name (`sandfork/operator` and `sandfork/agent`, tag
    /// the chart's appVersion) and imports them into every node.
    /// The agent image goes in a second time as tag `<appVersion>` +
    /// `UPGRADE_TAG_SUFFIX`: a changed agent image to upgrade to.
    pub fn load_chart_images(&self, repo: &Path, binaries: &Binaries) -> anyhow::Result<()> {
        let tag = chart_app_version(&repo.join("charts/sandfork/Chart.yaml"))?;
        for (image, tag, program) in [
            ("operator", tag.clone(), &binaries.operator),
            ("agent", tag.clone(), &binaries.agent),
            (
                "agent",
                format!("{tag}{UPGRADE_TAG_SUFFIX}"),
                &binaries.agent,
            ),
        ] {
            tools::run(
                Command::new(&self.script)
                    .arg("image")
                    .arg(&self.dir)
                    .arg(format!("docker.io/sandfork/{image}:{tag}"))
                    .arg(program),
            )
            .with_context(|| format!("importing the {image} image into the nodes"))?;
        }
        Ok(())
    }

    /// Packs `program` (any file) as image `name` and imports it into every
    /// node.
    pub fn import_image(&self, name: &str, program: &Path) -> anyhow::Result<()> {
        tools::run(
            Command::new(&self.script)
                .arg("image")
                .arg(&self.dir)
                .arg(name)
                .arg(program),
        )
        .with_context(|| format!("importing image {name} into the nodes"))?;
        Ok(())
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

/// `appVersion` of a Chart.yaml.
/// What the second tag of the agent image ends with (see `load_chart_images`).
pub const UPGRADE_TAG_SUFFIX: &str = "-upgrade";

/// The chart's appVersion: the tag of its default images.
pub fn chart_app_version(chart: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(chart).with_context(|| format!("reading {}", chart.display()))?;
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)?;
    value["appVersion"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{} has no appVersion", chart.display()))
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.down();
    }
}
