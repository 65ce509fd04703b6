//! `copy_once` from the command line, without the `patchover` binary:
//! `cargo run --release -p patchover-disk --example copy -- SRC DST`.

use patchover_disk::{CopyOptions, NoProgress, copy_once};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let [_, src, dst] = a.as_slice() else {
        return Err("usage: copy SRC DST".into());
    };
    let opts = CopyOptions {
        sync: false,
        ..CopyOptions::default()
    };
    let r = copy_once(src.as_ref(), dst.as_ref(), &opts, &NoProgress)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
