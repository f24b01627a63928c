//! `sandfork-e2e-bench`: how long a fork takes through Kubernetes, from the
//! create request of a SandboxBranch to the watch event that shows it
//! `Ready`, with a StopAndCopy baseline in the same run. It starts the
//! environment of the end-to-end tests (or uses `SANDFORK_E2E_KUBECONFIG`),
//! runs one source Sandbox in a namespace of its own, forks it one fork at a
//! time, and tears everything down, also when interrupted. See
//! `e2e/README.md`.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use sandfork_e2e::bench::{self, Options, Report};
use sandfork_e2e::env::{Env, Mode, Profile};
use sandfork_e2e::{fanout, namespace};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{oneshot, watch};

#[derive(Debug, Parser)]
#[command(
    name = "sandfork-e2e-bench",
    about = "Times SandboxBranches from create to Ready through the API server, against a StopAndCopy baseline"
)]
struct Args {
    /// Live forks to time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    forks: u32,
    /// StopAndCopy forks to time as the baseline [default: --forks; 0: none].
    #[arg(long)]
    baseline_forks: Option<u32>,
    /// Guest memory of the source Sandbox, MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// The source's built-in guest [default: Counter; with --branches: Idle].
    #[arg(long, value_parser = ["Counter", "Dirty", "Idle"])]
    guest: Option<String>,
    /// Instead of timing forks one at a time, time one SandboxBranch of this
    /// many branches (1 to 64) until all are Ready, with the node's memory
    /// added, against as many plain Pods started at once.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    branches: Option<u32>,
    /// With --branches: each branch Pod's memory request for its guest, MiB
    /// (`branchMemoryRequestMiB`).
    #[arg(long, default_value_t = 32)]
    branch_memory_request_mib: u64,
    /// Print one JSON object on stdout instead of a summary.
    #[arg(long)]
    json: bool,
    /// Add each fork's timeline to the JSON.
    #[arg(long)]
    timelines: bool,
    /// Build the local operator and agent with the dev profile instead of
    /// release (quicker to build, slower to run).
    #[arg(long)]
    dev_binaries: bool,
}

/// The signal that interrupted the run, once there is one.
type Stop = watch::Receiver<Option<&'static str>>;

fn main() -> ExitCode {
    let args = Args::parse();
    match run_interruptibly(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sandfork-e2e-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark on a thread of its own while this one waits for
/// SIGINT or SIGTERM; a signal makes the benchmark stop and tear down (the
/// environment's `Drop`) instead of ending the process on the spot.
fn run_interruptibly(args: Args) -> anyhow::Result<()> {
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut interrupt, mut terminate) = signals.block_on(async {
        anyhow::Ok((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    let (stop_tx, stop_rx) = watch::channel(None);
    let (done_tx, mut done_rx) = oneshot::channel();
    let worker = std::thread::spawn(move || {
        let result = run(&args, stop_rx);
        let _ = done_tx.send(());
        result
    });
    signals.block_on(async {
        loop {
            let name = tokio::select! {
                _ = &mut done_rx => break,
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            eprintln!("bench: {name}: stopping and tearing down");
            stop_tx.send_replace(Some(name));
        }
    });
    worker
        .join()
        .map_err(|_| anyhow!("the benchmark thread panicked"))?
}

fn run(args: &Args, mut stop: Stop) -> anyhow::Result<()> {
    let interrupted = |stop: &Stop| match *stop.borrow() {
        Some(signal) => bail!("interrupted by {signal}"),
        None => Ok(()),
    };
    // Dropped on every way out of this function: that tears it down.
    let profile = if args.dev_binaries {
        Profile::Dev
    } else {
        Profile::Release
    };
    let env = Env::start_with(profile)?;
    interrupted(&stop)?;
    env.start_workloads()?;
    interrupted(&stop)?;
    let default_guest = if args.branches.is_some() {
        "Idle"
    } else {
        "Counter"
    };
    let guest = args.guest.clone().unwrap_or_else(|| default_guest.into());
    let options = Options {
        forks: args.forks,
        baseline_forks: args.baseline_forks.unwrap_or(args.forks),
        memory_mib: args.memory_mib,
        guest: guest.clone(),
    };
    let fan_out = args.branches.map(|branches| fanout::Options {
        branches,
        memory_mib: args.memory_mib,
        guest,
        branch_memory_request_mib: args.branch_memory_request_mib,
    });
    let measured = env.block_on(async {
        let client = env.client();
        let ns = namespace::create(&client, "bench").await?;
        eprintln!("bench: namespace {ns}");
        let work = async {
            match &fan_out {
                Some(fan_out) => fanout::run(&env, &ns, fan_out).await.map(Measured::FanOut),
                None => bench::run(&env, &ns, &options).await.map(Measured::Forks),
            }
        };
        let outcome = tokio::select! {
            result = work => result,
            _ = stop.wait_for(Option::is_some) => Err(anyhow!("interrupted")),
        };
        let was_interrupted = stop.borrow().is_some();
        if outcome.is_err() && !was_interrupted {
            eprintln!("{}", env.diagnostics(&ns));
        }
        // After an interrupt the local cluster goes down with the namespace.
        if !(was_interrupted && env.mode == Mode::Local) {
            namespace::delete(&client, &ns, Duration::from_secs(180))
                .await
                .context("deleting the benchmark's namespace")?;
        }
        outcome
    })?;

    let extra = json!({
        "cluster": match env.mode { Mode::Local => "local", Mode::External => "external" },
        "binaries": match (&env.mode, profile) {
            (Mode::External, _) => "the cluster's",
            (Mode::Local, Profile::Release) => "release",
            (Mode::Local, Profile::Dev) => "dev",
        },
    });
    let (out, report) = match measured {
        Measured::Forks(report) => (report.to_json(extra, args.timelines), Some(report)),
        Measured::FanOut(mut out) => {
            if let (Some(out), serde_json::Value::Object(extra)) = (out.as_object_mut(), extra) {
                out.extend(extra);
            }
            (out, None)
        }
    };
    match (args.json, report) {
        (true, _) => println!("{}", serde_json::to_string(&out)?),
        (false, Some(report)) => print_summary(&report, &out),
        (false, None) => println!("{}", serde_json::to_string_pretty(&out)?),
    }
    Ok(())
}

/// What a run measured: forks one at a time, or one fan-out.
enum Measured {
    Forks(Report),
    FanOut(serde_json::Value),
}

fn print_summary(report: &Report, out: &serde_json::Value) {
    let number = |key: &str| {
        out[key]
            .as_f64()
            .map(|v| format!("{v:.1} ms"))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{} forks of a {} MiB {} Sandbox on {}, apply to Ready through the API server:",
        report.options.forks, report.options.memory_mib, report.options.guest, report.node
    );
    println!(
        "  Live, warm   p50 {:>10}  p90 {:>10}  ({} of {} in warm Pods)",
        number("apply_to_ready_ms_p50"),
        number("apply_to_ready_ms_p90"),
        out["warm_forks_in_warm_pods"],
        report.options.forks
    );
    println!(
        "  Live, cold   p50 {:>10}  p90 {:>10}  (p50 ratio {})",
        number("cold_apply_to_ready_ms_p50"),
        number("cold_apply_to_ready_ms_p90"),
        out["cold_over_warm_p50_ratio"]
    );
    println!("  plain Pod    p50 {:>10}", number("pod_start_ms_p50"),);
    if report.options.baseline_forks > 0 {
        println!(
            "  StopAndCopy  p50 {:>10}  p90 {:>10}  ({} forks; p50 ratio {})",
            number("stop_and_copy_apply_to_ready_ms_p50"),
            number("stop_and_copy_apply_to_ready_ms_p90"),
            report.options.baseline_forks,
            out["stop_and_copy_to_live_p50_ratio"]
        );
    }
    println!(
        "  a write {} ms, its watch event {} ms after it was sent (medians)",
        report.api_write_ms_p50, report.watch_delivery_ms_p50
    );
    for (mode, breakdown) in out["breakdown_ms_p50"].as_object().into_iter().flatten() {
        println!("  breakdown, {mode} (medians, ms):");
        for (name, value) in breakdown.as_object().into_iter().flatten() {
            println!("    {name:<40} {value}");
        }
    }
}
