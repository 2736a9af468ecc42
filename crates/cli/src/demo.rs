//! `livepage demo`: the main scenario on embedded defaults.

use std::process::ExitCode;

use crate::bench::faults::{self, FaultsArgs, Path, Strategy};

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    if !json {
        println!("== livepage probe ==");
    }
    let code = crate::probe::run(json)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    if !json {
        println!("\n== fault serving: livepage kernel layer vs a raw libc loop ==");
    }
    let args = FaultsArgs {
        threads: vec![1, 4],
        handlers: vec![1, 2],
        strategies: vec![Strategy::Read, Strategy::SameCpu],
        paths: vec![Path::AnonCopy, Path::ShmemContinue],
        pages: 2048,
        reps: 1,
        json,
    };
    let rows = faults::run(&args)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", faults::render(&rows));
    }
    Ok(ExitCode::SUCCESS)
}
