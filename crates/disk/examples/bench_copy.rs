//! The copy benchmark without the `patchover` binary (same code as `patchover bench copy`):
//! `cargo run --release -p patchover-disk --example bench_copy -- [--quick]`.

use patchover_disk::bench::{self, BenchConfig, WriterSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--internal-writer") {
        let spec: WriterSpec = serde_json::from_str(&args[i + 1])?;
        println!("{}", serde_json::to_string(&bench::writer_main(&spec)?)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let cmd = vec![exe.into_os_string(), "--internal-writer".into()];
    let cfg = if args.iter().any(|a| a == "--quick") {
        BenchConfig::quick(cmd)
    } else {
        BenchConfig::full(cmd)
    };
    let r = bench::run(&cfg, &|s| eprintln!("… {s}"))?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
