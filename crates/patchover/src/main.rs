//! `patchover`: the CLI (and later the daemon) in one binary.
//!
//! Raw arguments are parsed by clap into [`Cli`]; each verb group lives in its own file under
//! `cmd/` and gets a [`cmd::Ctx`] with the global flags. Errors are printed once, here, with
//! their whole chain, and mapped to exit codes in [`exit_code`].

mod cmd;
mod logs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "patchover",
    version,
    about = "Patch a running service without stopping it."
)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "PATCHOVER_CONFIG", default_value = patchover_core::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Print machine-readable JSON instead of tables and progress.
    #[arg(long, global = true)]
    json: bool,
    /// Do not use the daemon: act in this process even when `patchover serve` answers on its
    /// socket (by default verbs the daemon serves go through it when it runs).
    #[arg(long, global = true)]
    direct: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Logical computers: the resource table and their lifecycle.
    #[command(subcommand)]
    Lc(cmd::lc::LcCmd),
    /// Build LC images.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Copy a live disk with its write history.
    #[command(subcommand)]
    Disk(cmd::disk::DiskCmd),
    /// Switch the service's network path between LCs.
    #[command(subcommand)]
    Net(cmd::net::NetCmd),
    /// Drive an HTTP load at a constant rate and record every request's outcome.
    Load(cmd::load::LoadArgs),
    /// Benchmarks that print their figures against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
    /// Signed patch bundles.
    #[command(subcommand)]
    Bundle(cmd::bundle::BundleCmd),
    /// The patch table.
    #[command(subcommand)]
    Patches(cmd::patches::PatchesCmd),
    /// The patch monitor: poll feeds, mail notices, act on authenticated approvals.
    #[command(subcommand)]
    Monitor(cmd::monitor::MonitorCmd),
    /// Patch feeds: publish a signed index for a directory of bundles.
    #[command(subcommand)]
    Feed(cmd::feed::FeedCmd),
    /// Compute the approval code for a decision on a challenge (the administrator's side).
    ApprovalCode(cmd::approval::ApprovalCodeArgs),
    /// Give a decision on an approval challenge on the host.
    Approve(cmd::approval::ApproveArgs),
    /// The whole story on this host: two LCs, the demo service patched from 1.0.0 to 1.0.1
    /// under load, and the report (failed requests, lost writes, pause, versions).
    Demo(cmd::demo::DemoArgs),
    /// Patch a running LC without stopping its service (the whole cycle).
    Patch(cmd::patch::PatchArgs),
    /// Hand the service back to the LC an earlier patch run kept.
    Rollback(cmd::patch::RollbackArgs),
    /// The run journal.
    #[command(subcommand)]
    Runs(cmd::patch::RunsCmd),
    /// The service address.
    #[command(subcommand)]
    Service(cmd::patch::ServiceCmd),
    /// The daemon: the REST API on a Unix socket (and TCP), metrics, events, the monitor.
    Serve(cmd::serve::ServeArgs),
    /// One screen: LCs with role and state, the service and whether it answers, the last
    /// runs, pending and approved patches, the monitor and the daemon.
    Status,
    /// Check the kernel features and programs patchover relies on, each with what to do when
    /// it is missing; exit code 1 when something the config needs is missing.
    Doctor,
    /// The config file.
    #[command(subcommand)]
    Config(cmd::config::ConfigCmd),
    /// Internal: run by patchover itself to start and enter LCs.
    #[command(subcommand, hide = true)]
    Internal(cmd::internal::InternalCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = logs::init();
    let ctx = cmd::Ctx {
        config_path: cli.config,
        json: cli.json,
        quiet: false,
        direct: cli.direct,
    };
    let result = match cli.command {
        Command::Lc(c) => cmd::lc::run(c, &ctx),
        Command::Image(c) => cmd::image::run(c, &ctx),
        Command::Disk(c) => cmd::disk::run(c, &ctx),
        Command::Net(c) => cmd::net::run(c, &ctx),
        Command::Load(a) => cmd::load::run(a, &ctx),
        Command::Bench(c) => cmd::bench::run(c, &ctx),
        Command::Bundle(c) => cmd::bundle::run(c, &ctx),
        Command::Patches(c) => cmd::patches::run(c, &ctx),
        Command::Monitor(c) => cmd::monitor::run(c, &ctx),
        Command::Feed(c) => cmd::feed::run(c, &ctx),
        Command::ApprovalCode(a) => cmd::approval::run_code(a, &ctx),
        Command::Approve(a) => cmd::approval::run_approve(a, &ctx),
        Command::Demo(a) => cmd::demo::run(a, &ctx),
        Command::Patch(a) => cmd::patch::run_patch(a, &ctx),
        Command::Rollback(a) => cmd::patch::run_rollback(a, &ctx),
        Command::Runs(c) => cmd::patch::run_runs(c, &ctx),
        Command::Service(c) => cmd::patch::run_service(c, &ctx),
        Command::Serve(a) => cmd::serve::run(a, &ctx),
        Command::Status => cmd::status::run(&ctx),
        Command::Doctor => cmd::doctor::run(&ctx),
        Command::Config(c) => cmd::config::run(c, &ctx),
        Command::Internal(c) => cmd::internal::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if ctx.json {
                let out = serde_json::json!({
                    "error": format!("{e:#}"),
                    "code": exit_code(&e),
                });
                println!("{out}");
            } else {
                eprintln!("error: {e:#}");
            }
            if log == logs::LogSink::Journald {
                // The journal also gets the failure as an entry of its own, at priority err.
                tracing::error!(exit_code = exit_code(&e), error = %format!("{e:#}"), "patchover failed");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The one place errors become exit codes: the kind of the first cause that has one
/// ([`patchover_app::ErrorKind`]): 2 for bad input (config, unknown LC, wrong state, a run
/// still going), 1 for everything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    cmd::error_kind(e).exit_code()
}
