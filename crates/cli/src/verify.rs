//! `livepage verify`: every checksum of an image and of its parents.

use std::path::Path;
use std::process::ExitCode;

use livepage_image::Chain;

pub fn verify(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let chain = Chain::open(path)?;
    let checked = chain.verify()?;
    let img = chain.head();
    let n = chain.images().len();
    if json {
        println!(
            "{}",
            serde_json::json!({"path": path.display().to_string(), "ok": true, "pages_checked": checked, "id": img.id().to_string(), "chain_length": n})
        );
    } else {
        println!(
            "{}: ok ({checked} data pages checked in {n} image(s) of the chain; headers, indexes and VM state intact; id {})",
            path.display(),
            img.id()
        );
    }
    Ok(ExitCode::SUCCESS)
}
