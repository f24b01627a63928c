//! `sandfork-agent`: the Sandfork node agent and its local command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sandfork_bench::BenchArgs;
use sandfork_node_agent::manager::{Manager, SandboxSpec, SandboxState};
use sandfork_node_agent::{state_dir, vmhost};
use sandfork_vmm::capture::CaptureMode;
use sandfork_vmm::guest::{DirtyPattern, Workload};

#[derive(Parser)]
#[command(
    name = "sandfork-agent",
    version,
    about = "Sandfork node agent: run, capture and branch KVM sandboxes"
)]
struct Cli {
    /// Where sandboxes and captures live (use a tmpfs: captures hold guest memory).
    #[arg(
        long,
        global = true,
        env = "SANDFORK_STATE_DIR",
        default_value = "/run/sandfork"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a sandbox.
    Run {
        name: String,
        /// Built-in workload, or `flat` with --image.
        #[arg(long, value_enum, default_value = "counter")]
        guest: GuestKind,
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// For `dirty`: which pages it writes.
        #[arg(long, value_enum, default_value = "random")]
        pattern: DirtyPattern,
        /// For `dirty`: pages written per second (0: as fast as it can).
        #[arg(long, default_value_t = 0)]
        pages_per_second: u64,
        /// For `flat`: a flat 64-bit binary, loaded and entered at 1 MiB.
        #[arg(long)]
        image: Option<PathBuf>,
    },
    /// List sandboxes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox.
    Status { name: String },
    /// Capture a running sandbox.
    Capture {
        sandbox: String,
        /// Name of the capture.
        capture: String,
        #[arg(long, value_enum, default_value = "live")]
        mode: CaptureMode,
        /// For the counter guest: check that the capture is consistent.
        #[arg(long)]
        verify: bool,
        /// Print the capture once the sandbox runs again (branches can start
        /// at once), then stay until the memory copy is complete: this
        /// process maps the capture's memory, which the copy fills.
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a new sandbox from a capture.
    Branch { capture: String, name: String },
    /// Stop a sandbox and free everything it holds.
    Delete { name: String },
    /// List captures.
    Captures,
    /// Delete a capture (branches already started keep running).
    DeleteCapture { name: String },
    /// Write a capture to a portable snapshot file (mode 0600).
    Export { capture: String, file: PathBuf },
    /// Read a snapshot file into a new capture.
    Import { file: PathBuf, capture: String },
    /// Measure capture and restore on this machine; see the README.
    Bench(BenchArgs),
    /// Open /dev/kvm and /dev/userfaultfd read-write and say whether each
    /// worked; exits non-zero when one did not (e.g. in a Pod without the
    /// `sandfork.dev/kvm` resource). Needs no state directory.
    CheckDevices,
    /// Serve the gRPC API to the operator (mutual TLS) and keep this node's Lease.
    Serve(Box<sandfork_node_agent::service::ServeConfig>),
    /// Run one sandbox's VMM: serve a control socket in --dir and run the VM
    /// the agent starts there (the container of a sandbox Pod, or a process
    /// the agent starts itself). Needs no state directory.
    VmHost {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Exit 0 if the VMM serving --dir answers (a warm Pod's startup probe).
    VmHostProbe {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GuestKind {
    Counter,
    Dirty,
    Idle,
    Flat,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // VM logs end up in status messages: no colour codes outside a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::VmHost { dir } => Ok(vmhost::serve(&dir)?),
        Command::VmHostProbe { dir } => Ok(vmhost::probe(&dir)?),
        Command::Bench(args) => {
            sandfork_bench::run_with(&args, sandfork_node_agent::vmm_bench::measure)
        }
        Command::CheckDevices => check_devices(),
        Command::Serve(config) => Ok(sandfork_node_agent::service::run(
            config.with_state_dir(cli.state_dir),
        )?),
        command => run_local(&cli.state_dir, command),
    }
}

fn run_local(root: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let manager = Manager::open(root)
        .with_context(|| format!("cannot use state directory {}", root.display()))?;
    match command {
        Command::Run {
            name,
            guest,
            memory_mib,
            vcpus,
            pattern,
            pages_per_second,
            image,
        } => {
            let workload = match (guest, image) {
                (GuestKind::Counter, None) => Workload::Counter,
                (GuestKind::Idle, None) => Workload::Idle,
                (GuestKind::Dirty, None) => Workload::Dirty {
                    pattern,
                    pages_per_second,
                },
                (GuestKind::Flat, Some(path)) => Workload::Flat { path },
                (GuestKind::Flat, None) => anyhow::bail!("--guest flat needs --image FILE"),
                (_, Some(_)) => anyhow::bail!("--image is only for --guest flat"),
            };
            let info = manager.run(&SandboxSpec {
                name,
                memory_mib,
                vcpus,
                workload,
            })?;
            print_json(&info)
        }
        Command::List { json: true } => print_json(&manager.list()?),
        Command::List { json: false } => {
            println!(
                "{:<24} {:<8} {:>8} {:>5} {:<10} {:<20} ORIGIN",
                "NAME", "STATE", "MEMORY", "VCPUS", "GUEST", "REPORTS"
            );
            for info in manager.list()? {
                let state = match &info.state {
                    SandboxState::Running => "Running",
                    SandboxState::Failed { .. } => "Failed",
                };
                let guest = match &info.workload {
                    Workload::Counter => "counter",
                    Workload::Dirty { .. } => "dirty",
                    Workload::Idle => "idle",
                    Workload::Flat { .. } => "flat",
                };
                println!(
                    "{:<24} {:<8} {:>7}M {:>5} {:<10} {:<20} {}",
                    info.name,
                    state,
                    info.memory_mib,
                    info.vcpus,
                    guest,
                    format!("{:?}", info.reports),
                    info.origin.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        Command::Status { name } => print_json(&manager.status(&name)?),
        Command::Capture {
            sandbox,
            capture,
            mode,
            verify,
            no_wait,
        } => {
            let captured = manager.capture(&sandbox, &capture, mode, verify, !no_wait)?;
            print_json(&captured)?;
            if !captured.memory_complete {
                wait_for_copy(&manager, &capture)?;
            }
            Ok(())
        }
        Command::Branch { capture, name } => print_json(&manager.branch(&name, &capture)?),
        Command::Delete { name } => Ok(manager.delete(&name)?),
        Command::Captures => print_json(&manager.list_captures()?),
        Command::DeleteCapture { name } => Ok(manager.delete_capture(&name)?),
        Command::Export { capture, file } => {
            sandfork_node_agent::manager::validate_name(&capture)?;
            Ok(state_dir::capture(root, &capture).export(&file)?)
        }
        Command::Import { file, capture } => {
            sandfork_node_agent::manager::validate_name(&capture)?;
            state_dir::capture(root, &capture).import(&file)?;
            Ok(())
        }
        Command::Bench(_)
        | Command::CheckDevices
        | Command::Serve(_)
        | Command::VmHost { .. }
        | Command::VmHostProbe { .. } => {
            unreachable!("handled in main")
        }
    }
}

/// Waits until capture `name`'s memory copy is complete; an error if the
/// capture went away (its copy failed).
fn wait_for_copy(manager: &Manager, name: &str) -> anyhow::Result<()> {
    loop {
        match manager
            .list_captures()?
            .into_iter()
            .find(|c| c.name == name)
        {
            Some(capture) if capture.memory_complete => return Ok(()),
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(25)),
            None => anyhow::bail!("capture {name} went away before its copy completed"),
        }
    }
}

/// `check-devices`: one line per device on stdout, an error if one failed.
fn check_devices() -> anyhow::Result<()> {
    let devices = sandfork_node_agent::service::health::check();
    println!(
        "uid {} gid {}",
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw()
    );
    for (path, result) in [
        (sandfork_vmm::devices::KVM, &devices.kvm),
        (sandfork_vmm::devices::USERFAULTFD, &devices.userfaultfd),
    ] {
        match result {
            Ok(()) => println!("{path}: opened read-write"),
            Err(err) => println!("{path}: {err}"),
        }
    }
    anyhow::ensure!(
        devices.all_ok(),
        "not every device opens read-write: {devices:?}"
    );
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
